"""Group ids: which group (question) each rollout belongs to, as the pool statistics need it.

Group ids are host metadata in every RL stack (verl's ``uid`` column is a NumPy object array of
strings, TRL numbers its prompts in Python), so they are accepted in two forms on every backend:

* host data: a list/tuple or a NumPy array of any sortable ids (ints, strings, verl's object
  array of uids). They are factorized on the host with ``np.unique`` and the dense ids
  0 .. K-1 are copied to the arrays' device (a host -> device copy, never a device sync). Under
  ``jax.jit`` they are constants of the compiled program.
* an integer array of the arrays' own library (a torch Tensor next to torch inputs, a JAX array,
  traced or not, next to JAX inputs). They stay on the device and are factorized there with a
  sort into at most B segments (static shapes, no host sync).

Anything else (float or string tensors, ids of another array library) is a ``TypeError`` that
says what to pass instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from igpo_rewards import _checks
from igpo_rewards.backends import Backend, backend_name_of

Array = Any


class Groups(NamedTuple):
    """Dense group ids of a batch: ``dense_ids`` [B] ints in [0, num_segments)."""

    dense_ids: Array
    num_segments: int
    """The number of groups for host ids; B (an upper bound known from the shapes) for device ids,
    in which case some segments stay empty."""


def dispatch(group_ids: Any) -> dict[str, Any]:
    """The keyword to add to ``get_backend``: device ids take part in choosing the backend (and
    mixing libraries is an error naming them); host ids (lists, NumPy) go with any backend."""
    if backend_name_of(group_ids, argument="group_ids") in ("torch", "jax"):
        return {"group_ids": group_ids}
    return {}


def resolve(backend: Backend, group_ids: Any, num_rollouts: int, *, like: Array) -> Groups:
    """Checks ``group_ids`` against B = ``num_rollouts`` and factorizes them (see the module doc)."""
    if backend_name_of(group_ids, argument="group_ids") in (None, "numpy"):
        host_ids = _host_ids(group_ids)
        if host_ids is not None:
            _checks.check_length("group_ids", host_ids, num_rollouts, "the rollout dimension")
            dense, count = _factorize_on_host(host_ids)
            return Groups(backend.asarray(dense, like=like), count)
        group_ids = backend.asarray(group_ids, like=like)  # e.g. a list of traced scalars under jit
    _checks.check_length("group_ids", group_ids, num_rollouts, "the rollout dimension")
    if not backend.is_integer(group_ids):
        raise TypeError(
            f"group_ids given as a {backend.name} array must hold integers, got dtype {group_ids.dtype}; "
            f"pass string or other ids as a list or a NumPy array (factorized on the host), or map them to "
            f"ints first"
        )
    dense, count = backend.factorize(group_ids)
    return Groups(dense, count)


def _host_ids(group_ids: Any) -> np.ndarray | None:
    """``group_ids`` as a NumPy array, or None when it is a sequence of device values (tracers)."""
    if isinstance(group_ids, np.ndarray):
        return group_ids
    try:
        ids = np.asarray(group_ids)
    except Exception:  # jax's TracerArrayConversionError, a CUDA tensor, ...: not host data
        return None
    if ids.dtype.kind in "US" and isinstance(group_ids, (list, tuple)):
        # np.asarray turns [1, "a"] into strings, so 1 and "1" would become one group.
        kinds = {type(uid).__name__ for uid in group_ids}
        if len(kinds) > 1:
            raise TypeError(f"group_ids must be ids that sort together (all ints or all strings), got {sorted(kinds)}")
    return ids


def _factorize_on_host(ids: np.ndarray) -> tuple[np.ndarray, int]:
    if ids.dtype.kind in "fc" and np.isnan(ids).any():
        rows = np.flatnonzero(np.isnan(ids))[:5].tolist()
        raise ValueError(f"group_ids must not hold NaN; found NaN at rollouts {rows}")
    try:
        uniques, inverse = np.unique(ids, return_inverse=True)
    except TypeError as error:
        raise TypeError(
            f"group_ids must be ids that sort together (all ints or all strings), got dtype {ids.dtype}: {error}"
        ) from error
    return inverse.reshape(-1).astype(np.int64, copy=False), len(uniques)
