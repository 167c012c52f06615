"""Input checks shared by every layer: the core functions, the agent, the integrations and the
reference trainer's config all check their arguments with these, so one rule holds everywhere.

Two kinds:

* static checks (shapes, dtypes, option strings, hyperparameters) look only at metadata and
  always run, jit or not;
* value checks (NaN/inf, prefix masks, index ranges) read the data, which costs a host sync
  on an accelerator. They run when ``validate=True`` (the default) and the array is concrete;
  under ``jax.jit``/``vmap`` or ``torch.compile`` tracing they are skipped, because no
  exception can be raised from inside a compiled program.

One rule everywhere: a value of the wrong type is a ``TypeError``, a value of the right type
that is out of range (NaN, inf, negative, not one of the options) is a ``ValueError``. Every
message names the caller's argument and what was seen.

Hyperparameters are Python numbers or NumPy scalars (``np.float32(0.9)`` is accepted like
``0.9``); bools, strings, arrays and tensors are not numbers here. The checks return them as
Python ``float``/``int``, so that no NumPy scalar reaches the array math (where it could
promote a float32 tensor).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from igpo_rewards.backends import Backend

Array = Any


def _type_name(value: Any) -> str:
    return type(value).__name__


def _what_to_do(argument: str, value: Any) -> str:
    """The fix for an array passed where a Python number belongs: a traced value under
    ``jax.jit``/``torch.compile`` cannot be one, a concrete 0-d array can be read with ``.item()``."""
    module = type(value).__module__.split(".")[0]
    if module not in ("jax", "jaxlib", "torch", "numpy"):
        return ""
    if any(word in type(value).__name__ for word in ("Tracer", "Proxy", "Fake")):  # jax.jit, torch.compile
        return (
            f"; {argument} is a hyperparameter, a static Python number: under jax.jit close over it "
            f"(jax.jit(lambda x: f(x, {argument}={argument}))) or mark it static (jax.jit(f, static_argnames="
            f"['{argument}'])) instead of passing it as a traced argument"
        )
    return f"; {argument} is a hyperparameter, a Python number: pass {argument}.item() instead of an array"


def real_number(argument: str, value: Any) -> float:
    """A finite real number (Python or NumPy scalar) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a real number (a Python or NumPy scalar), got {_type_name(value)} {value!r:.80}"
            f"{_what_to_do(argument, value)}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{argument} must be finite, got {value!r}")
    return value


def check_real(
    argument: str, value: Any, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    """A finite real number in [low, high] (``(low, high]`` with ``open_low``), as a Python float."""
    value = real_number(argument, value)
    if value < low or value > high or (open_low and value == low):
        if high == math.inf:
            bound = f"> {low}" if open_low else f">= {low}"
        elif low == -math.inf:
            bound = f"<= {high}"
        else:
            bound = f"in {'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{argument} must be {bound}, got {value!r}")
    return value


def check_weight(argument: str, value: Any) -> float:
    """A reward weight or a log-prob floor: any finite real number."""
    return real_number(argument, value)


def check_gamma(gamma: Any) -> float:
    gamma = real_number("gamma", gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return gamma


def check_eps(eps: Any) -> float:
    eps = real_number("eps", eps)
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return eps


def check_int(argument: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or NumPy; not a bool) in [minimum, maximum], as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int, got {_type_name(value)} {value!r:.80}{_what_to_do(argument, value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{argument} must be <= {maximum}, got {value!r}")
    return int(value)


def check_count(argument: str, value: Any) -> int:
    """A non-negative integer (Python or NumPy) as a Python int."""
    return check_int(argument, value, minimum=0)


def check_positive_count(argument: str, value: Any) -> int:
    """An integer >= 1 (Python or NumPy) as a Python int."""
    return check_int(argument, value, minimum=1)


def check_optional_positive_count(argument: str, value: Any) -> int | None:
    """None, or an integer >= 1."""
    return None if value is None else check_positive_count(argument, value)


def check_str(argument: str, value: Any, *, what: str = "a str") -> str:
    """A str (``what`` says what it names, e.g. "a dataset column")."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be {what}, got {_type_name(value)} {value!r:.80}")
    return value


def check_flag(argument: str, value: Any) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{argument} must be a bool, got {_type_name(value)} {value!r:.80}{_what_to_do(argument, value)}")
    return bool(value)


def check_choice(argument: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, one of {list(choices)}, got {_type_name(value)} {value!r}")
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")
    return value


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

        positions = np.argwhere(backend.to_numpy(bad))[:5]
        positions = positions.ravel().tolist() if len(x.shape) == 1 else positions.tolist()
        allowed = "finite values or -inf" if allow_neg_inf else "finite values"
        place = "at valid positions" if where is not None else "everywhere"
        raise ValueError(f"{argument} must hold {allowed} {place}; found NaN/inf at indices {positions}")


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
