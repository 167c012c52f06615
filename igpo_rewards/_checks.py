"""Input checks shared by the public functions.

Two kinds:

* static checks (shapes, dtypes, option strings, gamma's range) look only at metadata and
  always run, jit or not;
* value checks (NaN/inf, prefix masks, index ranges) read the data, which costs a host sync
  on an accelerator. They run when ``validate=True`` (the default) and the array is concrete;
  under ``jax.jit``/``vmap`` or ``torch.compile`` tracing they are skipped, because no
  exception can be raised from inside a compiled program.

Every error names the argument and what was seen.
"""

from __future__ import annotations

from typing import Any, Sequence

from igpo_rewards.backends import Backend

Array = Any


def check_choice(argument: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")


def check_gamma(gamma: Any) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a Python float in [0, 1], got {type(gamma).__name__} {gamma!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")


def check_nonnegative_number(argument: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "int" if integer else "number"
        raise ValueError(f"{argument} must be a non-negative {kind}, got {value!r}")


def check_weight(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{argument} must be a finite Python number, got {value!r}")


def check_ndim(argument: str, x: Array, ndim: int, dims: str) -> None:
    if len(x.shape) != ndim:
        raise ValueError(f"{argument} must have shape [{dims}] ({ndim} dims), got shape {tuple(x.shape)}")


def check_same_shape(argument: str, x: Array, reference_argument: str, reference: Array) -> None:
    if tuple(x.shape) != tuple(reference.shape):
        raise ValueError(
            f"{argument} must have the shape of {reference_argument} {tuple(reference.shape)}, "
            f"got {tuple(x.shape)}"
        )


def check_length(argument: str, x: Array, length: int, reference: str) -> None:
    if len(x.shape) != 1 or x.shape[0] != length:
        raise ValueError(
            f"{argument} must have shape [B] with B = {length} (from {reference}), got shape {tuple(x.shape)}"
        )


def check_numeric(backend: Backend, argument: str, x: Array) -> None:
    if not (backend.is_floating(x) or backend.is_integer(x) or backend.is_bool(x)):
        raise TypeError(f"{argument} must hold real numbers, got dtype {x.dtype}")


def as_mask(backend: Backend, argument: str, mask: Array, *, validate: bool) -> Array:
    """A bool mask from a bool array or one of 0/1 numbers."""
    if backend.is_bool(mask):
        return mask
    check_numeric(backend, argument, mask)
    if validate and backend.is_concrete(mask) and backend.any((mask != 0) & (mask != 1)):
        values = sorted(set(backend.to_numpy(mask).ravel().tolist()))[:6]
        raise ValueError(f"{argument} must hold only 0/1 (or bool), saw values {values}")
    return mask != 0


def check_no_nan(backend: Backend, argument: str, x: Array, where: Array | None, *, allow_neg_inf: bool) -> None:
    """NaN (and +inf; -inf too unless allowed) at the positions ``where`` marks is an error."""
    if not backend.is_concrete(x) or not backend.is_floating(x):
        return
    bad = backend.isnan(x) | (x == float("inf"))
    if not allow_neg_inf:
        bad = bad | (x == float("-inf"))
    if where is not None:
        bad = bad & where
    if backend.any(bad):
        import numpy as np

        positions = np.argwhere(backend.to_numpy(bad))[:5].tolist()
        allowed = "finite values or -inf" if allow_neg_inf else "finite values"
        raise ValueError(f"{argument} must hold {allowed} at valid positions; found NaN/inf at indices {positions}")


def check_prefix_mask(backend: Backend, argument: str, mask: Array) -> None:
    """Each row must look like 1..1 0..0 (valid turns first, padding after)."""
    if not backend.is_concrete(mask) or mask.shape[-1] < 2:
        return
    bad = mask[..., 1:] & ~mask[..., :-1]
    if backend.any(bad):
        import numpy as np

        rows = np.argwhere(np.any(backend.to_numpy(bad), axis=-1))[:5].ravel().tolist()
        row_values = backend.to_numpy(mask[rows[0]]).astype(int).tolist()
        raise ValueError(
            f"{argument} must be a prefix mask per rollout (valid turns first, then padding); "
            f"rows {rows} are not, e.g. row {rows[0]} = {row_values}"
        )


def check_group_ids(backend: Backend, group_ids: Array, num_rollouts: int) -> None:
    check_length("group_ids", group_ids, num_rollouts, "the rollout dimension")
    if backend.name != "numpy" and not backend.is_integer(group_ids):
        raise TypeError(
            f"group_ids must be an integer array on the {backend.name} backend, got dtype {group_ids.dtype} "
            f"(string/object ids are accepted on the NumPy path; map them to ints first, e.g. "
            f"np.unique(uids, return_inverse=True)[1])"
        )
