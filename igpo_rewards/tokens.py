"""Section 5 of the spec: from turns to tokens, and the verl/SkyRL token-level layout.

Shapes: B rollouts, T turns (padded), S response tokens. In verl's layout a
``response_mask`` [B, S] marks generated tokens with 1 and observation/tool/padding tokens
with 0, so each maximal run of 1s is one turn.
"""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks
from igpo_rewards.backends import Backend, get_backend
from igpo_rewards.normalization import group_normalize
from igpo_rewards.returns import discounted_returns

Array = Any


def _response_mask(backend: Backend, response_mask: Array, *, validate: bool, like: Array | None = None) -> Array:
    response_mask = backend.asarray(response_mask, like=like)
    _checks.check_ndim("response_mask", response_mask, 2, "B, S")
    return _checks.as_mask(backend, "response_mask", response_mask, validate=validate)


def _run_starts_and_ends(backend: Backend, mask: Array) -> tuple[Array, Array]:
    """Bool [B, S] arrays marking the first and the last token of every run of 1s."""
    edge = backend.zeros((mask.shape[0], 1), mask.dtype, like=mask)
    previous = backend.concat([edge, mask[:, :-1]], axis=1)
    following = backend.concat([mask[:, 1:], edge], axis=1)
    return mask & ~previous, mask & ~following


def _turn_index(backend: Backend, mask: Array, starts: Array) -> Array:
    run_number = backend.cumsum(backend.astype(starts, backend.index_dtype()), axis=1) - 1
    return backend.where(mask, run_number, -1)


def turn_index_from_response_mask(response_mask: Array, *, validate: bool = True) -> Array:
    """Numbers the turns of a verl-style response mask: each maximal run of 1s is one turn.

    Args:
      response_mask: [B, S] 1 (or True) on generated tokens, 0 on observation, tool and
        padding tokens.
      validate: check that the mask holds only 0/1.

    Returns:
      [B, S] integer array (int64 on NumPy/Torch, JAX's default int): the turn (0, 1, ...) of
      each generated token, -1 on every other token. A row of zeros is all -1.

    Example:
      >>> turn_index_from_response_mask([[1, 1, 0, 0, 1, 0, 1, 1, 0, 0]])
      array([[ 0,  0, -1, -1,  1, -1,  2,  2, -1, -1]])
    """
    backend = get_backend(response_mask=response_mask)
    mask = _response_mask(backend, response_mask, validate=validate)
    starts, _ = _run_starts_and_ends(backend, mask)
    return _turn_index(backend, mask, starts)


def broadcast_to_tokens(
    turn_values: Array, token_turn_index: Array, *, turn_mask: Array | None = None, validate: bool = True
) -> Array:
    """Gives every token the value of its turn: out[b, s] = turn_values[b, token_turn_index[b, s]].

    Tokens with index -1 (prompt, observation, padding) get 0.

    Args:
      turn_values: [B, T] per-turn values, e.g. advantages.
      token_turn_index: [B, S] integer turn of each token, -1 for none (see
        :func:`turn_index_from_response_mask`).
      turn_mask: optional [B, T] prefix mask; when given, every index must point at a valid
        turn of its rollout (index < n_b).
      validate: check that indices lie in [-1, T) (and below n_b with ``turn_mask``). With
        ``validate=False`` (or under jit) an index >= T reads 0 instead of raising.

    Returns:
      [B, S] array, dtype of ``turn_values``.

    Example:
      >>> import numpy as np
      >>> broadcast_to_tokens(np.array([[0.5, -1.0]]), [[0, 0, -1, 1, -1]])
      array([[ 0.5,  0.5,  0. , -1. ,  0. ]])
    """
    backend = get_backend(turn_values=turn_values, token_turn_index=token_turn_index, turn_mask=turn_mask)
    turn_values = backend.asarray(turn_values)
    token_turn_index = backend.asarray(token_turn_index, like=turn_values)
    _checks.check_ndim("turn_values", turn_values, 2, "B, T")
    _checks.check_ndim("token_turn_index", token_turn_index, 2, "B, S")
    if token_turn_index.shape[0] != turn_values.shape[0]:
        raise ValueError(
            f"token_turn_index must have shape [B, S] with B = {turn_values.shape[0]} (from turn_values "
            f"{tuple(turn_values.shape)}), got {tuple(token_turn_index.shape)}"
        )
    if not backend.is_integer(token_turn_index):
        raise TypeError(f"token_turn_index must be an integer array, got dtype {token_turn_index.dtype}")
    _checks.check_numeric(backend, "turn_values", turn_values)
    num_turns = turn_values.shape[1]
    if validate and backend.is_concrete(token_turn_index):
        limit = num_turns
        limit_text = f"T = {num_turns} (turn_values {tuple(turn_values.shape)})"
        if turn_mask is not None:
            turn_mask = backend.asarray(turn_mask, like=turn_values)
            _checks.check_same_shape("turn_mask", turn_mask, "turn_values", turn_values)
            turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=True)
            _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
            limit = backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1)[:, None]
            limit_text = "the rollout's number of valid turns n_b (turn_mask row sums)"
        bad = (token_turn_index < -1) | (token_turn_index >= limit)
        if backend.any(bad):
            import numpy as np

            rows = np.argwhere(backend.to_numpy(bad))[:5].tolist()
            raise ValueError(f"token_turn_index must lie in [-1, {limit_text}); out of range at (row, token) {rows}")
    if num_turns == 0:
        return backend.zeros(token_turn_index.shape, turn_values.dtype, like=turn_values)
    readable = (token_turn_index >= 0) & (token_turn_index < num_turns)
    safe_index = backend.where(readable, token_turn_index, 0)
    gathered = backend.take_along_axis(turn_values, safe_index, axis=1)
    return backend.where(readable, gathered, 0)


def place_turn_rewards(
    turn_rewards: Array, response_mask: Array, *, turn_mask: Array | None = None, validate: bool = True
) -> Array:
    """Writes each turn's reward at the last token of its run: the inverse of the reading that
    :func:`advantages_from_token_rewards` does (for a reward manager or an agent loop that
    fills verl's ``token_level_scores`` / ``rm_scores``).

    Args:
      turn_rewards: [B, T] reward of each turn.
      response_mask: [B, S] verl response mask; run j of row b is turn j.
      turn_mask: optional [B, T] prefix mask; when given, each row must have exactly n_b runs.
      validate: check that no reward is lost: a row with more runs than T is an error, and
        (without ``turn_mask``) a nonzero reward at a turn the row has no run for is an error.

    Returns:
      [B, S] token-level rewards, dtype of ``turn_rewards``: turn_rewards[b, j] at the last
      token of run j, 0 elsewhere.

    Example:
      >>> import numpy as np
      >>> place_turn_rewards(np.array([[0.25, 1.0]]), [[1, 1, 0, 0, 1, 1, 0]])
      array([[0.  , 0.25, 0.  , 0.  , 0.  , 1.  , 0.  ]])
    """
    backend = get_backend(turn_rewards=turn_rewards, response_mask=response_mask, turn_mask=turn_mask)
    turn_rewards = backend.asarray(turn_rewards)
    _checks.check_ndim("turn_rewards", turn_rewards, 2, "B, T")
    _checks.check_numeric(backend, "turn_rewards", turn_rewards)
    mask = _response_mask(backend, response_mask, validate=validate, like=turn_rewards)
    if mask.shape[0] != turn_rewards.shape[0]:
        raise ValueError(
            f"response_mask must have shape [B, S] with B = {turn_rewards.shape[0]} (from turn_rewards "
            f"{tuple(turn_rewards.shape)}), got {tuple(mask.shape)}"
        )
    starts, ends = _run_starts_and_ends(backend, mask)
    index = _turn_index(backend, mask, starts)
    if validate and backend.is_concrete(mask):
        runs = backend.sum(backend.astype(starts, backend.index_dtype()), axis=1)
        _check_runs_fit(backend, runs, turn_rewards, turn_mask)
    return broadcast_to_tokens(turn_rewards, backend.where(ends, index, -1), validate=False)


def _check_runs_fit(backend: Backend, runs: Array, turn_rewards: Array, turn_mask: Array | None) -> None:
    import numpy as np

    num_turns = turn_rewards.shape[1]
    if backend.any(runs > num_turns):
        rows = np.flatnonzero(backend.to_numpy(runs) > num_turns)[:5].tolist()
        raise ValueError(
            f"response_mask has more runs of 1s (turns) than turn_rewards has columns (T = {num_turns}) "
            f"in rows {rows}: runs {backend.to_numpy(runs)[rows].tolist()}"
        )
    turn_position = backend.arange(num_turns, like=turn_rewards)[None, :]
    if turn_mask is not None:
        turn_mask = _checks.as_mask(backend, "turn_mask", backend.asarray(turn_mask, like=turn_rewards), validate=True)
        _checks.check_same_shape("turn_mask", turn_mask, "turn_rewards", turn_rewards)
        counts = backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1)
        if backend.any(counts != runs):
            rows = np.flatnonzero(backend.to_numpy(counts != runs))[:5].tolist()
            raise ValueError(
                f"response_mask runs must equal turn_mask's valid turns per row; rows {rows} have runs "
                f"{backend.to_numpy(runs)[rows].tolist()} but n_b {backend.to_numpy(counts)[rows].tolist()}"
            )
    else:
        lost = (turn_position >= runs[:, None]) & (turn_rewards != 0)
        if backend.any(lost):
            cells = np.argwhere(backend.to_numpy(lost))[:5].tolist()
            raise ValueError(
                f"turn_rewards has nonzero rewards at (row, turn) {cells} but response_mask has no run of "
                f"1s for those turns: they would be lost"
            )


def advantages_from_token_rewards(
    token_level_rewards: Array,
    response_mask: Array,
    group_ids: Array,
    *,
    gamma: float = 1.0,
    mode: str = "joint",
    weighting: str = "turn",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    max_turns: int | None = None,
    validate: bool = True,
) -> Array:
    r"""IGPO token advantages from verl/SkyRL's token-level layout.

    Reads the turn rewards r_{b,j} off ``token_level_rewards`` and runs
    :func:`group_normalize`, :func:`discounted_returns` and :func:`broadcast_to_tokens`:

    .. math:: A_{b,s} = \sum_{k \ge j(s)} \gamma^{k - j(s)} \hat A_{b,k}, \quad j(s) = \text{turn of token } s

    Turn detection uses ``response_mask`` alone: run j of 1s is turn j, and its reward is read
    at the run's last token. The final turn also collects any reward on 0-mask tokens after the
    last run (verl's reward managers put the outcome at the last non-padding token, which is an
    observation token when a rollout ends on one). Turns are never found by ``reward != 0``: an
    exact-zero information gain is a real value. Rewards on other tokens of a run (e.g. a
    per-token KL penalty from use_kl_in_reward) are not part of the turn reward; use the KL
    as a loss term instead, as the paper does.

    Args:
      token_level_rewards: [B, S] rewards, each turn's at the last token of its run.
      response_mask: [B, S] 1 on generated tokens, 0 on observation/tool/padding tokens.
      group_ids: [B] group (question) of each rollout, e.g. verl's uid.
      gamma, mode, weighting, scale, eps, ddof: as in :func:`igpo_advantages`.
      max_turns: T, the number of turn slots. None counts the runs (a host sync, so pass it
        on GPUs and under jax.jit, where it is required).
      validate: value checks: NaN/inf in rewards at read positions, a nonzero reward on a
        0-mask token before the last run (it would be lost), more runs than ``max_turns``.

    Returns:
      [B, S] advantages, dtype of ``token_level_rewards``; 0 on every 0-mask token and on rows
      with no generated token.

    Example:
      >>> import numpy as np
      >>> mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
      >>> rewards = np.array([[0.0, 0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
      >>> np.round(advantages_from_token_rewards(rewards, mask, [0, 0]), 4)  # pool {0.5, 1, 0}
      array([[ 1.2247,  1.2247,  0.    ,  1.2247,  0.    ],
             [-1.2247,  0.    ,  0.    ,  0.    ,  0.    ]])
    """
    backend = get_backend(token_level_rewards=token_level_rewards, response_mask=response_mask, group_ids=group_ids)
    rewards = backend.asarray(token_level_rewards)
    _checks.check_ndim("token_level_rewards", rewards, 2, "B, S")
    _checks.check_numeric(backend, "token_level_rewards", rewards)
    rewards = backend.astype(rewards, backend.float_dtype(rewards))
    mask = _response_mask(backend, response_mask, validate=validate, like=rewards)
    _checks.check_same_shape("response_mask", mask, "token_level_rewards", rewards)
    if max_turns is not None:
        _checks.check_nonnegative_number("max_turns", max_turns, integer=True)
    num_rollouts = rewards.shape[0]

    starts, ends = _run_starts_and_ends(backend, mask)
    index = _turn_index(backend, mask, starts)
    runs = backend.sum(backend.astype(starts, backend.index_dtype()), axis=1)
    if max_turns is None:
        if not backend.is_concrete(mask):
            raise ValueError("max_turns is required under jit/tracing (the number of turns must be static)")
        max_turns = int(backend.to_numpy(runs).max()) if num_rollouts else 0

    # Tokens after a row's last generated token (cumulative count already at the row total).
    generated = backend.astype(mask, backend.index_dtype())
    generated_total = backend.sum(generated, axis=1)[:, None]
    trailing = ~mask & (backend.cumsum(generated, axis=1) == generated_total)
    read_turn = backend.where(ends, index, backend.where(trailing & (runs[:, None] > 0), runs[:, None] - 1, -1))
    if validate and backend.is_concrete(rewards):
        _checks.check_no_nan(backend, "token_level_rewards", rewards, read_turn >= 0, allow_neg_inf=False)
        _check_nothing_lost(backend, rewards, mask, trailing, runs, max_turns)

    readable = (read_turn >= 0) & (read_turn < max_turns)
    num_slots = num_rollouts * max_turns  # slot b * T + j holds r_{b,j}; slot num_slots is a dump
    row_offset = backend.arange(num_rollouts, like=rewards)[:, None] * max_turns
    slot = backend.where(readable, row_offset + read_turn, num_slots)
    turn_rewards = backend.segment_sum(
        backend.where(readable, rewards, 0.0).reshape(-1), slot.reshape(-1), num_slots + 1
    )[:num_slots].reshape(num_rollouts, max_turns)
    turn_mask = backend.arange(max_turns, like=rewards)[None, :] < runs[:, None]

    normalized = group_normalize(
        turn_rewards, turn_mask, group_ids, mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof,
        validate=False,
    )
    advantages = discounted_returns(normalized, turn_mask, gamma=gamma, validate=False)
    return broadcast_to_tokens(advantages, index, validate=False)


def _check_nothing_lost(backend: Backend, rewards: Array, mask: Array, trailing: Array, runs: Array, max_turns: int) -> None:
    import numpy as np

    inside_observation = ~mask & ~trailing & (rewards != 0)
    if backend.any(inside_observation):
        cells = np.argwhere(backend.to_numpy(inside_observation))[:5].tolist()
        raise ValueError(
            f"token_level_rewards has nonzero rewards on 0-mask tokens between turns at (row, token) {cells}; "
            f"turn rewards belong at the last token of their run of 1s in response_mask"
        )
    if backend.any(runs > max_turns):
        rows = np.flatnonzero(backend.to_numpy(runs) > max_turns)[:5].tolist()
        raise ValueError(
            f"response_mask has more runs of 1s than max_turns = {max_turns} in rows {rows} "
            f"(runs {backend.to_numpy(runs)[rows].tolist()})"
        )
