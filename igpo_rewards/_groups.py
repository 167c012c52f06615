"""Group ids: which group (question) each rollout belongs to, as the pool statistics need it.

A batch's groups are given in one of two ways (exactly one per call):

* ``group_size=G``: the layout verl and TRL produce, G contiguous rollouts per group (rows
  0..G-1 are one question, G..2G-1 the next, ...). The [B, ...] arrays are then a
  [Q, G, ...] view and the pool statistics are plain reductions over it (``einops``), with no
  factorization, no sort and shapes known from B and G alone.
* ``group_ids``: one id per rollout, in any order. Group ids are host metadata in every RL
  stack (verl's ``uid`` column is a NumPy object array of strings, TRL numbers its prompts in
  Python), so they are accepted in two forms on every backend:

  - host data: a list/tuple or a NumPy array of any sortable ids (ints, strings, verl's object
    array of uids). They are factorized on the host with ``np.unique`` and the dense ids
    0 .. K-1 are copied to the arrays' device (a host -> device copy, never a device sync).
    Under ``jax.jit`` they are constants of the compiled program.
  - an integer array of the arrays' own library (a torch Tensor next to torch inputs, a JAX
    array, traced or not, next to JAX inputs). They stay on the device and are factorized
    there with a sort into at most B segments (static shapes, no host sync).

  Anything else (float or string tensors, ids of another array library) is a ``TypeError`` that
  says what to pass instead. Float (and bool) ids are refused in every form, host or device:
  ids are identifiers, and 1.0 next to 1 or a rounding residue must not decide a group.

A batch whose every group holds a single rollout (``group_size=1``, every id distinct) gets a
:class:`~igpo_rewards.SingleRolloutGroupWarning`: nothing is normalized against a peer.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from igpo_rewards import _checks
from igpo_rewards._warnings import SingleRolloutGroupWarning
from igpo_rewards.backends import Backend, backend_name_of

Array = Any


class Groups(NamedTuple):
    """The groups of a batch: ``group_size`` G (contiguous layout), or ``dense_ids`` [B] ints in
    [0, num_segments) (``None`` with ``group_size``)."""

    dense_ids: Array | None
    num_segments: int
    """The number of groups (B / G, or K for host ids); B, an upper bound known from the shapes,
    for device ids, in which case some segments stay empty."""
    group_size: int | None = None


def dispatch(group_ids: Any) -> dict[str, Any]:
    """The keyword to add to ``get_backend``: device ids take part in choosing the backend (and
    mixing libraries is an error naming them); host ids (lists, NumPy) go with any backend."""
    if backend_name_of(group_ids, argument="group_ids") in ("torch", "jax"):
        return {"group_ids": group_ids}
    return {}


def resolve(
    backend: Backend, group_ids: Any, num_rollouts: int, *, group_size: Any, like: Array, validate: bool = True
) -> Groups:
    """Checks ``group_ids`` or ``group_size`` against B = ``num_rollouts`` (see the module doc);
    warns when every group is a single rollout (for device ids only with ``validate``: it reads them)."""
    if (group_ids is None) == (group_size is None):
        given = "both" if group_ids is not None else "neither"
        raise TypeError(
            f"pass exactly one of group_ids (one id per rollout) and group_size (G contiguous rollouts per "
            f"group); got {given}"
        )
    if group_size is not None:
        groups = _contiguous(group_size, num_rollouts)
        if groups.group_size == 1 and num_rollouts > 0:
            _warn_single_rollout_groups(num_rollouts, "group_size=1")
        return groups
    if backend_name_of(group_ids, argument="group_ids") in (None, "numpy"):
        host_ids = _host_ids(group_ids)
        if host_ids is not None:
            _checks.check_length("group_ids", host_ids, num_rollouts, "the rollout dimension")
            dense, count = _factorize_on_host(host_ids)
            if count == num_rollouts > 0:
                _warn_single_rollout_groups(num_rollouts, "every group id is distinct")
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
    if validate and num_rollouts > 0 and backend.is_concrete(dense):
        members = backend.segment_sum(backend.astype(dense >= 0, backend.index_dtype()), dense, count)
        if not backend.any(members > 1):
            _warn_single_rollout_groups(num_rollouts, "every group id is distinct")
    return Groups(dense, count)


def _warn_single_rollout_groups(num_rollouts: int, why: str) -> None:
    warnings.warn(
        f"every group of this batch of {num_rollouts} rollouts holds a single rollout ({why}): with no peer in its "
        f"group, GRPO's advantages are all 0, IGPO's too for one-turn rollouts, and a multi-turn rollout is "
        f"compared only with its own turns. Sample G >= 2 rollouts per question (TRL's num_generations, verl's "
        f"rollout.n) and pass one id per question, not per rollout",
        SingleRolloutGroupWarning,
        stacklevel=4,
    )


def _contiguous(group_size: Any, num_rollouts: int) -> Groups:
    group_size = _checks.check_positive_count("group_size", group_size)
    if num_rollouts % group_size:
        raise ValueError(
            f"group_size = {group_size} must divide the number of rollouts B = {num_rollouts} (G contiguous "
            f"rollouts per group); pass group_ids for groups of unequal sizes"
        )
    return Groups(None, num_rollouts // group_size, group_size)


def contiguous_group_size(dense_ids: np.ndarray) -> int | None:
    """G when host group ids numbered in order of first appearance (0, 0, 1, 1, ...) are G
    contiguous rollouts per group, all groups of the same size; None otherwise. O(B) on the host.

    Example:
      >>> contiguous_group_size(np.array([0, 0, 1, 1, 2, 2])), contiguous_group_size(np.array([0, 1, 0, 1]))
      (2, None)
    """
    dense_ids = np.asarray(dense_ids).reshape(-1)
    if dense_ids.size == 0:
        return None
    num_groups = int(dense_ids.max()) + 1
    if dense_ids.size % num_groups:
        return None
    group_size = dense_ids.size // num_groups
    expected = np.arange(dense_ids.size) // group_size
    return group_size if np.array_equal(dense_ids, expected) else None


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
    if ids.dtype.kind in "fcb":
        raise TypeError(
            f"group_ids must be integer or string ids (one per question), got dtype {ids.dtype}; map them to ints "
            f"first (e.g. np.asarray(ids).astype(np.int64)): float ids are refused in every form, as they are in "
            f"tensors"
        )
    try:
        uniques, inverse = np.unique(ids, return_inverse=True)
    except TypeError as error:
        raise TypeError(
            f"group_ids must be ids that sort together (all ints or all strings), got dtype {ids.dtype}: {error}"
        ) from error
    return inverse.reshape(-1).astype(np.int64, copy=False), len(uniques)
