"""Section 5 of the spec: from turns to tokens, and the verl/SkyRL token-level layout.

Shapes: B rollouts, T turns (padded), S response tokens. In verl's layout a
``response_mask`` [B, S] marks generated tokens with 1 and observation/tool/padding tokens
with 0, so each maximal run of 1s is one turn.

Two formulations, chosen by the backend (``Backend.host_numpy``), give the same results:

* run-length (NumPy arrays, and torch CPU tensors through zero-copy NumPy views): a row
  holds a handful of runs (one per turn and per observation), so the [B, S] arrays are
  read once to find the run boundaries, all the bookkeeping happens on the few runs, and the
  output is written once with ``np.repeat``. Sizes depend on the data.
* static-shape (JAX under jit or not, torch on accelerators, under torch.compile or with
  autograd): a prefix count numbers the runs, a row-wise binary search finds each run's last
  token, and one gather from a [B, T + 2] table writes the output. No host sync, no
  scatter, shapes known in advance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from igpo_rewards import _checks, _groups, _turns
from igpo_rewards.backends import Backend, get_backend
from igpo_rewards.normalization import normalization_options, normalize
from igpo_rewards.returns import accumulate, accumulation_options

Array = Any


def _turn_index(backend: Backend, mask: Array, starts: Array) -> Array:
    run_number = backend.astype(backend.prefix_count(starts), backend.index_dtype()) - 1
    return backend.where(mask, run_number, -1)


def _turn_mask_like(backend: Backend, turn_mask: Array, argument: str, values: Array, *, validate: bool) -> Array:
    """An optional ``turn_mask`` argument as a bool [B, T] mask of ``values``' shape (prefix checked)."""
    turn_mask = backend.asarray(turn_mask, like=values)
    _checks.check_same_shape("turn_mask", turn_mask, argument, values)
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
    return turn_mask


def _is_empty(x: Array) -> bool:
    return 0 in tuple(x.shape)


def _turn_table(backend: Backend, turn_values: Array) -> Array:
    """[B, T + 2] table: column j + 1 holds turn j, columns 0 and T + 1 hold 0."""
    zero = backend.zeros((turn_values.shape[0], 1), turn_values.dtype, like=turn_values)
    return backend.concat([zero, turn_values, zero], axis=1)


# -- run-length formulation (NumPy) ---------------------------------------------------------


class _Runs(NamedTuple):
    """The maximal runs of equal values in each row of a [B, S] NumPy array (B, S >= 1).

    Runs are listed in row-major order; R = number of runs (a run never spans two rows).
    """

    starts: np.ndarray  # [R] flat (row-major) position of each run's first token
    lengths: np.ndarray  # [R]
    rows: np.ndarray  # [R] row of each run
    first: np.ndarray  # [B] index of each row's first run
    shape: tuple[int, int]

    @property
    def last(self) -> np.ndarray:
        """[B] index of each row's last run."""
        return np.append(self.first[1:], len(self.starts)) - 1

    @property
    def ends(self) -> np.ndarray:
        """[R] flat position of each run's last token."""
        return self.starts + self.lengths - 1

    def expand(self, run_values: np.ndarray) -> np.ndarray:
        """[B, S] array holding run_values[r] on every token of run r."""
        return np.repeat(run_values, self.lengths).reshape(self.shape)


def _find_runs(flat: np.ndarray, shape: tuple[int, int]) -> _Runs:
    num_rows, length = shape
    new_run = np.empty(flat.shape[0], dtype=bool)
    new_run[0] = True
    np.not_equal(flat[1:], flat[:-1], out=new_run[1:])
    new_run[::length] = True  # every row starts a run
    starts = np.flatnonzero(new_run)
    return _Runs(
        starts=starts,
        lengths=np.diff(starts, append=flat.shape[0]),
        rows=starts // length,
        first=np.searchsorted(starts, np.arange(num_rows) * length),
        shape=shape,
    )


def _turn_of_runs(runs: _Runs, generated: np.ndarray) -> np.ndarray:
    """[R] int64: for a run of 1s its turn (0, 1, ... within its row); for a run of 0s the turn
    of the last run of 1s before it in its row (-1 if none), e.g. the final turn for the
    tokens after the last turn."""
    seen = np.cumsum(generated, dtype=np.int64)
    before_row = seen[runs.first] - generated[runs.first]
    return seen - before_row[runs.rows] - 1


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
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(response_mask=response_mask)
    mask = _turns.response_mask(backend, response_mask, validate=validate)
    host = None if _is_empty(mask) else backend.host_numpy(mask)
    if host is not None:
        flat = host[0].reshape(-1)
        runs = _find_runs(flat, host[0].shape)
        generated = flat[runs.starts]
        turn = np.where(generated, _turn_of_runs(runs, generated), -1)
        return backend.from_host(runs.expand(turn), like=mask)
    starts, _ = _turns.run_starts_and_ends(backend, mask)
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
      turn_mask: optional [B, T] prefix mask of the valid turns: tokens of a padded turn get 0
        (as in the float64 reference), and with ``validate`` an index pointing at one
        (index >= n_b) is an error, since the token layout and the turn mask disagree.
      validate: check that indices lie in [-1, T) (and below n_b with ``turn_mask``). With
        ``validate=False`` (or under jit) an index >= T reads 0 instead of raising.

    Returns:
      [B, S] array, dtype of ``turn_values``.

    Example:
      >>> import numpy as np
      >>> broadcast_to_tokens(np.array([[0.5, -1.0]]), [[0, 0, -1, 1, -1]])
      array([[ 0.5,  0.5,  0. , -1. ,  0. ]])
    """
    validate = _checks.check_flag("validate", validate)
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
    checked = validate and backend.is_concrete(token_turn_index)
    limit = num_turns
    limit_text = f"T = {num_turns} (turn_values {tuple(turn_values.shape)})"
    if turn_mask is not None:
        turn_mask = _turn_mask_like(backend, turn_mask, "turn_values", turn_values, validate=checked)
        turn_values = backend.where(turn_mask, turn_values, 0)
        if checked:
            limit = backend.sum(backend.astype(turn_mask, backend.index_dtype()), axis=1)[:, None]
            limit_text = "the rollout's number of valid turns n_b (turn_mask row sums)"
    host = None if _is_empty(token_turn_index) else backend.host_numpy(turn_values, token_turn_index)
    if host is not None:
        values, index = host
        flat = index.reshape(-1)
        runs = _find_runs(flat, index.shape)
        run_turn = flat[runs.starts]  # one check and one read per run of equal indices
        if checked:
            limit = limit if isinstance(limit, int) else backend.to_numpy(limit)
            run_limit = limit if isinstance(limit, int) else limit[runs.rows, 0]
            if np.any((run_turn < -1) | (run_turn >= run_limit)):
                _raise_index_out_of_range(index, limit, limit_text)
        if num_turns == 0:
            run_values = np.zeros(len(run_turn), dtype=values.dtype)
        else:
            readable = (run_turn >= 0) & (run_turn < num_turns)
            run_values = np.where(readable, values[runs.rows, np.where(readable, run_turn, 0)], 0)
        return backend.from_host(runs.expand(run_values), like=turn_values)

    if checked:
        bad = (token_turn_index < -1) | (token_turn_index >= limit)
        if backend.any(bad):
            limit = limit if isinstance(limit, int) else backend.to_numpy(limit)
            _raise_index_out_of_range(backend.to_numpy(token_turn_index), limit, limit_text)
    if num_turns == 0:
        return backend.zeros(token_turn_index.shape, turn_values.dtype, like=turn_values)
    slot = backend.clip(token_turn_index, -1, num_turns) + 1
    return backend.gather_rows(_turn_table(backend, turn_values), slot)


def _raise_index_out_of_range(index: np.ndarray, limit: Any, limit_text: str) -> None:
    rows = np.argwhere((index < -1) | (index >= limit))[:5].tolist()
    raise ValueError(f"token_turn_index must lie in [-1, {limit_text}); out of range at (row, token) {rows}")


def place_turn_rewards(
    turn_rewards: Array, response_mask: Array, *, turn_mask: Array | None = None, validate: bool = True
) -> Array:
    """Writes each turn's reward at the last token of its run: the inverse of the reading that
    :func:`advantages_from_token_rewards` does (for a reward manager or an agent loop that
    fills verl's ``token_level_scores`` / ``rm_scores``).

    Args:
      turn_rewards: [B, T] reward of each turn.
      response_mask: [B, S] verl response mask; run j of row b is turn j.
      turn_mask: optional [B, T] prefix mask of the valid turns: only their rewards are placed
        (as in the float64 reference), and with ``validate`` each row must have exactly n_b runs.
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
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(turn_rewards=turn_rewards, response_mask=response_mask, turn_mask=turn_mask)
    turn_rewards = backend.asarray(turn_rewards)
    _checks.check_ndim("turn_rewards", turn_rewards, 2, "B, T")
    _checks.check_numeric(backend, "turn_rewards", turn_rewards)
    mask = _turns.response_mask(backend, response_mask, validate=validate, like=turn_rewards)
    if turn_mask is not None:
        checked = validate and backend.is_concrete(turn_rewards)
        turn_mask = _turn_mask_like(backend, turn_mask, "turn_rewards", turn_rewards, validate=checked)
        turn_rewards = backend.where(turn_mask, turn_rewards, 0)
    if mask.shape[0] != turn_rewards.shape[0]:
        raise ValueError(
            f"response_mask must have shape [B, S] with B = {turn_rewards.shape[0]} (from turn_rewards "
            f"{tuple(turn_rewards.shape)}), got {tuple(mask.shape)}"
        )
    starts, ends = _turns.run_starts_and_ends(backend, mask)
    index = _turn_index(backend, mask, starts)
    if validate and backend.is_concrete(mask):
        runs = backend.sum(backend.astype(starts, backend.index_dtype()), axis=1)
        _check_runs_fit(backend, runs, turn_rewards, turn_mask)
    return broadcast_to_tokens(turn_rewards, backend.where(ends, index, -1), validate=False)


def _check_runs_fit(backend: Backend, runs: Array, turn_rewards: Array, turn_mask: Array | None) -> None:
    num_turns = turn_rewards.shape[1]
    if backend.any(runs > num_turns):
        rows = np.flatnonzero(backend.to_numpy(runs) > num_turns)[:5].tolist()
        raise ValueError(
            f"response_mask has more runs of 1s (turns) than turn_rewards has columns (T = {num_turns}) "
            f"in rows {rows}: runs {backend.to_numpy(runs)[rows].tolist()}"
        )
    turn_position = backend.arange(num_turns, like=turn_rewards)[None, :]
    if turn_mask is not None:
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
    group_ids: Array | None = None,
    *,
    group_size: int | None = None,
    gamma: float = 1.0,
    mode: str = "joint",
    weighting: str = "turn",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    accumulation: str = "discounted",
    ig_advantage_scale: float = 1.0,
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
    exact-zero information gain is a real value. A reward on any other token would be lost, so
    under ``validate`` it is an error: on a 0-mask token between turns, on a token of a run
    other than its last (e.g. a per-token KL penalty from use_kl_in_reward: use the KL as a
    loss term instead, as the paper does), or in a row without a generated token.

    Args:
      token_level_rewards: [B, S] rewards, each turn's at the last token of its run.
      response_mask: [B, S] 1 on generated tokens, 0 on observation/tool/padding tokens.
      group_ids: [B] group (question) of each rollout, e.g. verl's uid (any form that
        :func:`group_normalize` takes, NumPy object arrays of strings included).
      group_size: G, instead of ``group_ids``, when the rows are G contiguous rollouts per
        question (verl repeats each prompt ``rollout.n`` times in a row); B a multiple of G.
      gamma, mode, weighting, scale, eps, ddof: as in :func:`igpo_advantages`.
      accumulation, ig_advantage_scale: as in :func:`igpo_advantages` ("sqrt_n" takes the
        rewards of every turn but the final one as the IG entries).
      max_turns: the most turns a rollout may have (the same meaning as everywhere,
        :class:`IGPOSettings`), also T, the number of turn slots of the turn arrays: a row with
        more runs is an error (under ``validate``). None counts the runs (a host sync, so pass
        it on GPUs and under jax.jit, where it is required).
      validate: value checks: NaN/inf in rewards at read positions; nothing lost, i.e. no
        nonzero reward on a 0-mask token before the last run, on a generated token before the
        last token of its run, or in a row with no generated token; no more runs than
        ``max_turns``. Each is a ``ValueError`` naming the (row, token) cells.

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
    options = normalization_options(mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof)
    returns_options = accumulation_options(gamma=gamma, accumulation=accumulation, ig_advantage_scale=ig_advantage_scale)
    validate = _checks.check_flag("validate", validate)
    if max_turns is not None:
        max_turns = _checks.check_count("max_turns", max_turns)
    backend = get_backend(
        token_level_rewards=token_level_rewards, response_mask=response_mask, **_groups.dispatch(group_ids)
    )
    rewards = backend.asarray(token_level_rewards)
    _checks.check_ndim("token_level_rewards", rewards, 2, "B, S")
    _checks.check_numeric(backend, "token_level_rewards", rewards)
    rewards = backend.astype(rewards, backend.float_dtype(rewards))
    mask = _turns.response_mask(backend, response_mask, validate=validate, like=rewards)
    _checks.check_same_shape("response_mask", mask, "token_level_rewards", rewards)
    num_rollouts, num_tokens = rewards.shape
    groups = _groups.resolve(
        backend, group_ids, num_rollouts, group_size=group_size, like=rewards, validate=validate
    )
    if max_turns is None and not backend.is_concrete(mask):
        raise ValueError("max_turns is required under jit/tracing (the number of turns must be static)")
    if num_rollouts == 0 or num_tokens == 0:
        return backend.zeros((num_rollouts, num_tokens), rewards.dtype, like=rewards)

    host = backend.host_numpy(rewards, mask)
    if host is not None:
        turn_rewards, runs, layout = _turn_rewards_from_runs(*host, max_turns=max_turns, validate=validate)
        max_turns = turn_rewards.shape[1]
        turn_rewards = backend.from_host(turn_rewards, like=rewards)
        runs = backend.from_host(runs, like=rewards)
    else:
        turn_rewards, runs, count = _turn_rewards_static(backend, rewards, mask, max_turns, validate=validate)
        max_turns = turn_rewards.shape[1]
    turn_mask = backend.arange(max_turns, like=rewards)[None, :] < runs[:, None]

    normalized = normalize(backend, turn_rewards, turn_mask, groups, **options)
    advantages = accumulate(backend, normalized, turn_mask, **returns_options)
    if host is not None:
        runs_of_mask, generated, turn = layout
        run_values = np.zeros(len(turn), dtype=host[0].dtype)
        has_value = generated & (turn < max_turns)
        run_values[has_value] = backend.to_numpy(advantages)[runs_of_mask.rows[has_value], turn[has_value]]
        return backend.from_host(runs_of_mask.expand(run_values), like=rewards)
    slot = backend.where(mask, backend.clip(count, 0, max_turns + 1), 0)  # run k -> column k
    return backend.gather_rows(_turn_table(backend, advantages), slot)


def _turn_rewards_from_runs(
    rewards: np.ndarray, mask: np.ndarray, *, max_turns: int | None, validate: bool
) -> tuple[np.ndarray, np.ndarray, tuple[_Runs, np.ndarray, np.ndarray]]:
    """Run-length reading of verl's layout: [B, T] turn rewards, [B] runs per row, and the runs.

    Only the runs of the mask and the nonzero rewards are visited: in verl's layout a row
    holds a reward at the last token of each turn and maybe after the last turn, nowhere else.
    """
    flat_mask = mask.reshape(-1)
    flat_rewards = rewards.reshape(-1)
    runs = _find_runs(flat_mask, mask.shape)
    generated = flat_mask[runs.starts]
    turn = _turn_of_runs(runs, generated)  # for the 0-run after the last turn: the final turn
    num_runs = turn[runs.last] + 1
    if max_turns is None:
        max_turns = int(num_runs.max())
    ends = runs.ends[generated]

    nonzero = np.flatnonzero(flat_rewards != 0)  # NaN counts as nonzero
    run_of_nonzero = np.searchsorted(runs.starts, nonzero, side="right") - 1
    is_last = np.zeros(len(runs.starts), dtype=bool)
    is_last[runs.last] = True
    in_zero_run = ~generated[run_of_nonzero]
    trailing = in_zero_run & is_last[run_of_nonzero] & (num_runs[runs.rows[run_of_nonzero]] > 0)
    if validate:
        read = np.concatenate([flat_rewards[ends], flat_rewards[nonzero[trailing]]])
        # Lost: between turns, before a turn's last token, or in a row with no turn at all.
        lost = (in_zero_run & ~trailing) | (~in_zero_run & (nonzero != runs.ends[run_of_nonzero]))
        if not np.all(np.isfinite(read)) or np.any(lost) or np.any(num_runs > max_turns):
            numpy_backend = get_backend()
            starts, run_ends = _turns.run_starts_and_ends(numpy_backend, mask)
            key = _run_key(numpy_backend, mask, numpy_backend.prefix_count(starts))
            _check_token_rewards(numpy_backend, rewards, mask, run_ends, key, num_runs, max_turns)

    # Accumulate in float64 in token order (the run's last token, then the trailing tokens).
    turn_rewards = np.zeros((mask.shape[0], max_turns), dtype=np.float64)
    end_rows, end_turns = runs.rows[generated], turn[generated]
    kept = end_turns < max_turns
    turn_rewards[end_rows[kept], end_turns[kept]] = flat_rewards[ends[kept]]
    trailing_runs = run_of_nonzero[trailing]
    trailing_rows, trailing_turns = runs.rows[trailing_runs], turn[trailing_runs]
    kept = trailing_turns < max_turns
    np.add.at(turn_rewards, (trailing_rows[kept], trailing_turns[kept]), flat_rewards[nonzero[trailing][kept]])
    return turn_rewards.astype(rewards.dtype), num_runs, (runs, generated, turn)


def _run_key(backend: Backend, mask: Array, count: Array) -> Array:
    """Non-decreasing [B, S] int32 key: 2k - 1 on the tokens of run k (k = 1, 2, ...), 2k on
    the 0-mask tokens after run k (0 before the first run)."""
    return count * 2 - backend.astype(mask, count.dtype)


def _turn_rewards_static(
    backend: Backend, rewards: Array, mask: Array, max_turns: int | None, *, validate: bool
) -> tuple[Array, Array, Array]:
    """Static-shape reading of verl's layout: [B, T] turn rewards, [B] runs, [B, S] run count."""
    starts, ends = _turns.run_starts_and_ends(backend, mask)
    count = backend.prefix_count(starts)  # k on the tokens of run k and on the 0-mask tokens after it
    runs = backend.astype(count[:, -1], backend.index_dtype())
    key = _run_key(backend, mask, count)
    if max_turns is None:
        max_turns = int(backend.to_numpy(runs).max())
    if validate and backend.is_concrete(rewards):
        _check_token_rewards(backend, rewards, mask, ends, key, runs, max_turns)

    # Run k ends right before the first token whose key reaches 2k; the tokens from the first
    # key of 2 * runs on are the 0-mask tokens after the last run.
    turn_number = backend.astype(backend.arange(max_turns, like=rewards), key.dtype)[None, :] + 1
    runs_as_key = backend.astype(runs, key.dtype)[:, None]
    targets = backend.concat([2 * turn_number + 0 * runs_as_key, 2 * runs_as_key], axis=1)  # [B, T + 1]
    position = backend.searchsorted_rows(key, targets)
    last_token = backend.clip(position[:, :max_turns] - 1, 0, rewards.shape[1] - 1)
    at_end = backend.take_along_axis(rewards, backend.astype(last_token, backend.index_dtype()), axis=1)
    token_position = backend.arange(rewards.shape[1], like=rewards)[None, :]
    trailing = backend.sum(backend.where(token_position >= position[:, max_turns:], rewards, 0.0), axis=1)
    turn_rewards = backend.where(turn_number <= runs_as_key, at_end, 0.0)
    turn_rewards = turn_rewards + backend.where(turn_number == runs_as_key, trailing[:, None], 0.0)
    return turn_rewards, runs, count


def _check_token_rewards(
    backend: Backend, rewards: Array, mask: Array, ends: Array, key: Array, runs: Array, max_turns: int
) -> None:
    """The value checks of advantages_from_token_rewards (raise on the first problem found)."""
    runs = backend.asarray(runs, like=rewards)
    trailing = ~mask & (key == 2 * backend.astype(runs, key.dtype)[:, None])  # after the last run
    read = ends | (trailing & (runs[:, None] > 0))
    _checks.check_no_nan(backend, "token_level_rewards", rewards, read, allow_neg_inf=False)
    _check_nothing_lost(backend, rewards, mask, ends, trailing, runs, max_turns)


def _check_nothing_lost(
    backend: Backend, rewards: Array, mask: Array, ends: Array, trailing: Array, runs: Array, max_turns: int
) -> None:
    """Every nonzero reward must be read: at a turn's last token, or after the last turn."""
    nonzero = rewards != 0
    inside_observation = ~mask & ~trailing & nonzero
    if backend.any(inside_observation):
        cells = np.argwhere(backend.to_numpy(inside_observation))[:5].tolist()
        raise ValueError(
            f"token_level_rewards has nonzero rewards on 0-mask tokens between turns at (row, token) {cells}; "
            f"turn rewards belong at the last token of their run of 1s in response_mask"
        )
    inside_turn = mask & ~ends & nonzero
    if backend.any(inside_turn):
        cells = np.argwhere(backend.to_numpy(inside_turn))[:5].tolist()
        raise ValueError(
            f"token_level_rewards has nonzero rewards on generated tokens before the last token of their turn at "
            f"(row, token) {cells}; a turn's reward is read at the last token of its run of 1s in response_mask, so "
            f"these would be lost. A per-token KL penalty in the reward (verl's algorithm.use_kl_in_reward) looks "
            f"like this: put the KL in the loss instead (actor.use_kl_loss). validate=False skips this check"
        )
    without_turn = trailing & (runs[:, None] == 0) & nonzero
    if backend.any(without_turn):
        rows = np.flatnonzero(np.any(backend.to_numpy(without_turn), axis=1))[:5].tolist()
        raise ValueError(
            f"token_level_rewards has nonzero rewards in rows {rows} whose response_mask has no generated token: "
            f"a row without a turn has no turn to give them to, so they would be lost"
        )
    if backend.any(runs > max_turns):
        rows = np.flatnonzero(backend.to_numpy(runs) > max_turns)[:5].tolist()
        raise ValueError(
            f"response_mask has more runs of 1s than max_turns = {max_turns} in rows {rows} "
            f"(runs {backend.to_numpy(runs)[rows].tolist()})"
        )
