"""Turn bookkeeping shared by the equations: converting inputs, turn counts, final turns, runs.

The public wrappers (with their checks) are in :mod:`igpo_rewards.turns`; these helpers work on
checked arrays of one backend.
"""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks
from igpo_rewards.backends import Backend

Array = Any


def leading_length(value: Any) -> int | None:
    """B of a [B] argument before conversion (an array's first dim, a list's length), None if unknown."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) == 1 else None
    try:
        return len(value)
    except TypeError:
        return None


def check_turn_shapes(
    values_argument: str, values: Array, turn_mask: Array, *, num_rollouts: int | None = None, rollouts_from: str = ""
) -> None:
    """``values`` and ``turn_mask`` must both be [B, T]; a transposed one is named as such.

    ``num_rollouts`` (B as another argument, ``rollouts_from``, gives it) tells which of the two
    is transposed when their shapes are each other's reverse.
    """
    _checks.check_ndim(values_argument, values, 2, "B, T")
    shape, mask_shape = tuple(values.shape), tuple(turn_mask.shape)
    if mask_shape == shape:
        return
    if len(mask_shape) == 2 and mask_shape == shape[::-1]:
        if num_rollouts is not None and num_rollouts in shape and shape[0] != num_rollouts:
            raise ValueError(
                f"{values_argument} must be [B, T] = {mask_shape} like turn_mask (B = {num_rollouts} from "
                f"{rollouts_from}), got {shape}: {values_argument} looks transposed (pass {values_argument}.T)"
            )
        if num_rollouts is not None and shape[0] == num_rollouts:
            raise ValueError(
                f"turn_mask must be [B, T] = {shape} like {values_argument} (B = {num_rollouts} from {rollouts_from}), "
                f"got {mask_shape}: turn_mask looks transposed (pass turn_mask.T)"
            )
        raise ValueError(
            f"turn_mask must have the shape of {values_argument} {shape}, got {mask_shape}: one of them is "
            f"transposed (both are [B, T], B rollouts by T turns)"
        )
    _checks.check_same_shape("turn_mask", turn_mask, values_argument, values)


def check_log_probabilities(backend: Backend, argument: str, values: Array, where: Array) -> None:
    """Log-probabilities are <= 0: a positive value (at a position ``where`` marks) is an error that
    names the likely mix-up, probabilities passed instead of log-probabilities. A value check."""
    if not backend.is_concrete(values) or not backend.is_floating(values):
        return
    positive = (values > 0) & where
    if backend.any(positive):
        import numpy as np

        cells = np.argwhere(backend.to_numpy(positive))[:5]
        first = float(backend.to_numpy(values)[tuple(cells[0])])
        raise ValueError(
            f"{argument} must hold log-probabilities (<= 0) at valid positions; found positive values at "
            f"{cells.tolist()}, e.g. {first!r}: were probabilities passed instead of log-probabilities? "
            f"Pass log(p) (np.log / torch.log)"
        )


def turn_values_and_mask(
    backend: Backend,
    values_argument: str,
    values: Array,
    turn_mask: Array,
    *,
    validate: bool,
    allow_neg_inf: bool,
    log_probabilities: bool = False,
    num_rollouts: int | None = None,
    rollouts_from: str = "",
    float_dtype: Any = None,
) -> tuple[Array, Array]:
    """Converts a [B, T] value array and its turn mask; checks shapes, dtype, prefix and NaN (and,
    with ``log_probabilities``, that no valid value is positive).

    Returns (values as float, turn_mask as bool). Values at padded turns are not checked and
    never used.
    """
    values = backend.asarray(values)
    turn_mask = backend.asarray(turn_mask, like=values)
    check_turn_shapes(values_argument, values, turn_mask, num_rollouts=num_rollouts, rollouts_from=rollouts_from)
    _checks.check_numeric(backend, values_argument, values)
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    values = backend.astype(values, float_dtype or backend.float_dtype(values))
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
        _checks.check_no_nan(backend, values_argument, values, turn_mask, allow_neg_inf=allow_neg_inf)
        if log_probabilities:
            check_log_probabilities(backend, values_argument, values, turn_mask)
    return values, turn_mask


def num_turns(backend: Backend, turn_mask: Array) -> Array:
    """n_i, the number of valid turns of each rollout: [B, T] bool -> [B] int."""
    return backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1)


def final_turn_mask(backend: Backend, turn_mask: Array) -> Array:
    """True at j = n_i - 1, the final (answer) turn of each rollout: [B, T] bool -> [B, T] bool."""
    turn_position = backend.arange(turn_mask.shape[1], like=turn_mask)[None, :]
    return turn_mask & (turn_position == (num_turns(backend, turn_mask) - 1)[:, None])


def check_max_turns(backend: Backend, turn_mask: Array, max_turns: int | None, *, validate: bool) -> None:
    """No rollout may have more than ``max_turns`` valid turns (a value check, skipped, with no
    host sync, when the T = ``turn_mask.shape[1]`` slots already fit in ``max_turns``)."""
    if max_turns is None or turn_mask.shape[1] <= max_turns or not validate or not backend.is_concrete(turn_mask):
        return
    counts = num_turns(backend, turn_mask)
    if backend.any(counts > max_turns):
        import numpy as np

        counts = backend.to_numpy(counts)
        rows = np.flatnonzero(counts > max_turns)[:5].tolist()
        raise ValueError(
            f"max_turns = {max_turns} (the most turns a rollout may have), but rollouts {rows} have "
            f"{counts[rows].tolist()} turns (turn_mask row sums); raise max_turns or cap the rollouts' turns"
        )


def response_mask(backend: Backend, mask: Array, *, validate: bool, like: Array | None = None) -> Array:
    """A verl ``response_mask`` [B, S] (bool or 0/1) as a bool array."""
    mask = backend.asarray(mask, like=like)
    _checks.check_ndim("response_mask", mask, 2, "B, S")
    return _checks.as_mask(backend, "response_mask", mask, validate=validate)


def run_starts_and_ends(backend: Backend, mask: Array) -> tuple[Array, Array]:
    """Bool [B, S] arrays marking the first and the last token of every run of 1s (turn)."""
    edge = backend.zeros((mask.shape[0], 1), mask.dtype, like=mask)
    previous = backend.concat([edge, mask[:, :-1]], axis=1)
    following = backend.concat([mask[:, 1:], edge], axis=1)
    return mask & ~previous, mask & ~following
