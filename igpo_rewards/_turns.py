"""Turn bookkeeping shared by the equations: converting inputs, turn counts, final turns."""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks
from igpo_rewards.backends import Backend

Array = Any


def turn_values_and_mask(
    backend: Backend,
    values_argument: str,
    values: Array,
    turn_mask: Array,
    *,
    validate: bool,
    allow_neg_inf: bool,
    float_dtype: Any = None,
) -> tuple[Array, Array]:
    """Converts a [B, T] value array and its turn mask; checks shapes, dtype, prefix and NaN.

    Returns (values as float, turn_mask as bool). Values at padded turns are not checked and
    never used.
    """
    values = backend.asarray(values)
    turn_mask = backend.asarray(turn_mask, like=values)
    _checks.check_ndim(values_argument, values, 2, "B, T")
    _checks.check_same_shape("turn_mask", turn_mask, values_argument, values)
    _checks.check_numeric(backend, values_argument, values)
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    values = backend.astype(values, float_dtype or backend.float_dtype(values))
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
        _checks.check_no_nan(backend, values_argument, values, turn_mask, allow_neg_inf=allow_neg_inf)
    return values, turn_mask


def num_turns(backend: Backend, turn_mask: Array) -> Array:
    """n_i, the number of valid turns of each rollout: [B, T] bool -> [B] int."""
    return backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1)


def final_turn_mask(backend: Backend, turn_mask: Array) -> Array:
    """True at j = n_i - 1, the final (answer) turn of each rollout: [B, T] bool -> [B, T] bool."""
    turn_position = backend.arange(turn_mask.shape[1], like=turn_mask)[None, :]
    return turn_mask & (turn_position == (num_turns(backend, turn_mask) - 1)[:, None])
