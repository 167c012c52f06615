"""Hypothesis strategies that draw valid IGPO batches, and a converter to NumPy/Torch/JAX.

Every strategy draws NumPy arrays (float64 values, bool masks, int64 ids and token masks);
:func:`to_backend` converts a drawn batch (or one array) to the library under test. Default
sizes are small so that a hundred examples run in about a second.

Shapes: B rollouts, T turns (padded), S response tokens, K probe targets.

Example::

    from hypothesis import given
    from igpo_rewards.testing import reference, strategies

    @given(strategies.turn_batches())
    def test_my_igpo(batch):
        expected = reference.igpo_advantages(
            batch.answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids
        ).advantages
        ...
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from igpo_rewards._extras import install_hint

try:
    from hypothesis import strategies as st
except ImportError as error:  # hypothesis is an optional dependency of igpo_rewards.testing
    raise ImportError(
        f"igpo_rewards.testing.strategies needs hypothesis: pip install hypothesis (or {install_hint('test')})"
    ) from error

__all__ = [
    "TurnBatch",
    "TargetBatch",
    "TokenBatch",
    "turn_masks",
    "group_ids",
    "turn_batches",
    "target_batches",
    "token_batches",
    "to_backend",
]

# Group ids are drawn from the int32 range so that they survive JAX's default 32-bit mode.
_ID_MIN = -(2**31)
_ID_MAX = 2**31 - 1
_FORMAT_PENALTY = -2.0


class TurnBatch(NamedTuple):
    """A batch of rollouts at turn level (the inputs of ``igpo_advantages``).

    Attributes:
      answer_logprob: ``[B, T]`` float64 probe log-probs; valid slots are <= 0 and may be
        ``-inf``; padded slots hold arbitrary finite junk (which must be ignored).
      outcome: ``[B]`` float64 outcome rewards: F1 in [0, 1] or the -2.0 format penalty.
      turn_mask: ``[B, T]`` bool prefix mask; a row of zeros is batch padding.
      group_ids: ``[B]`` int64 non-contiguous group ids in shuffled order.
    """

    answer_logprob: np.ndarray
    outcome: np.ndarray
    turn_mask: np.ndarray
    group_ids: np.ndarray


class TargetBatch(NamedTuple):
    """A turn-level batch whose probes score K targets (the inputs of ``igpo_advantages`` with
    ``target_weights`` and ``target_mask``).

    Attributes:
      answer_logprob: ``[B, T, K]`` float64; column 0 is the answer (a :class:`TurnBatch`'s
        ``answer_logprob``), columns 1 .. K-1 sub-goals. Valid slots of present targets are <= 0
        and may be ``-inf``; padded slots hold finite junk; every slot of an absent target is NaN
        (all of which must be ignored).
      outcome: ``[B]`` float64 outcome rewards (as in :class:`TurnBatch`).
      turn_mask: ``[B, T]`` bool prefix mask.
      group_ids: ``[B]`` int64 group ids.
      target_mask: ``[B, K]`` bool, which targets each row has; column 0 (the answer) is all True.
      target_weights: ``[B, K]`` float64 finite weights (0 and negative ones included).
    """

    answer_logprob: np.ndarray
    outcome: np.ndarray
    turn_mask: np.ndarray
    group_ids: np.ndarray
    target_mask: np.ndarray
    target_weights: np.ndarray


class TokenBatch(NamedTuple):
    """A batch of rollouts in verl's token layout (the inputs of ``advantages_from_token_rewards``).

    Attributes:
      response_mask: ``[B, S]`` int64 0/1. A row is: a run of 1s (turn 0), then alternately a
        run of 0s (observation) and a run of 1s (next turn), then optionally a trailing
        observation run, then padding 0s. A row without 1s is batch padding.
      turn_rewards: ``[B, T]`` float64 turn rewards, 0.0 at padded turns; T = most runs in a row.
      turn_mask: ``[B, T]`` bool prefix mask, row i has as many valid turns as runs.
      token_level_rewards: ``[B, S]`` float64, turn j's reward at the last token of run j
        (or, with ``final_reward_after_last_run``, the final turn's reward may sit on a mask-0
        token after the last run), 0.0 elsewhere.
      group_ids: ``[B]`` int64 non-contiguous group ids in shuffled order.
    """

    response_mask: np.ndarray
    turn_rewards: np.ndarray
    turn_mask: np.ndarray
    token_level_rewards: np.ndarray
    group_ids: np.ndarray


# --------------------------------------------------------------------------------------------
# Argument checks (raised when the strategy is built, not when it is drawn from).


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Building blocks.


def _prefix_mask(lengths: list[int], num_turns: int) -> np.ndarray:
    return np.arange(num_turns)[None, :] < np.asarray(lengths, dtype=np.int64).reshape(-1, 1)


def turn_masks(
    num_rollouts: int, max_turns: int, *, allow_empty_rows: bool = True
) -> st.SearchStrategy[np.ndarray]:
    """Prefix turn masks ``[num_rollouts, max_turns]`` (bool).

    Row i is ``n_i`` Trues then Falses, ``n_i`` in ``0 .. max_turns`` (``1 .. max_turns`` when
    ``allow_empty_rows=False``); a row of Falses is batch padding.
    """
    num_rollouts = _check_int(num_rollouts, "num_rollouts", 0)
    max_turns = _check_int(max_turns, "max_turns", 0 if allow_empty_rows else 1)
    min_turns = 0 if allow_empty_rows else 1
    lengths = st.lists(
        st.integers(min_turns, max_turns), min_size=num_rollouts, max_size=num_rollouts
    )
    return lengths.map(lambda drawn: _prefix_mask(drawn, max_turns))


@st.composite
def _group_sizes(draw: Any, num_rollouts: int, max_groups: int, max_group_size: int) -> list[int]:
    """Sizes of the groups, each 1 .. max_group_size, summing to num_rollouts."""
    fewest = math.ceil(num_rollouts / max_group_size)
    num_groups = draw(st.integers(fewest, min(max_groups, num_rollouts)))
    sizes = [1] * num_groups
    for _ in range(num_rollouts - num_groups):
        with_room = [g for g, size in enumerate(sizes) if size < max_group_size]
        sizes[draw(st.sampled_from(with_room))] += 1
    return sizes


def _distinct_ids(count: int) -> st.SearchStrategy[list[int]]:
    return st.lists(
        st.integers(_ID_MIN, _ID_MAX), min_size=count, max_size=count, unique=True
    )


@st.composite
def _group_ids(draw: Any, num_rollouts: int, max_groups: int, max_group_size: int) -> np.ndarray:
    if num_rollouts == 0:
        return np.zeros(0, dtype=np.int64)
    sizes = draw(_group_sizes(num_rollouts, max_groups, max_group_size))
    ids = draw(_distinct_ids(len(sizes)))
    labels = [group_id for group_id, size in zip(ids, sizes) for _ in range(size)]
    return np.asarray(draw(st.permutations(labels)), dtype=np.int64)


def group_ids(
    num_rollouts: int, *, max_groups: int, max_group_size: int | None = None
) -> st.SearchStrategy[np.ndarray]:
    """Group ids ``[num_rollouts]`` (int64): 1 .. max_groups groups, in shuffled order.

    Ids are distinct arbitrary integers from the int32 range (non-contiguous, possibly
    negative). Every group has 1 .. max_group_size rollouts (default: no upper bound).
    """
    num_rollouts = _check_int(num_rollouts, "num_rollouts", 0)
    max_groups = _check_int(max_groups, "max_groups", 1)
    if max_group_size is None:
        max_group_size = max(num_rollouts, 1)
    max_group_size = _check_int(max_group_size, "max_group_size", 1)
    if max_groups * max_group_size < num_rollouts:
        raise ValueError(
            f"num_rollouts={num_rollouts} rollouts do not fit in max_groups={max_groups} groups "
            f"of max_group_size={max_group_size}"
        )
    return _group_ids(num_rollouts, max_groups, max_group_size)


# Value strategies, built once (building strategies inside a draw loop is slow).
_OUTCOMES = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, _FORMAT_PENALTY]),
    st.floats(0.0, 1.0, allow_subnormal=False),
)
_FINITE_LOGPROBS = st.one_of(
    st.sampled_from([0.0, -1.0, -25.0]),
    st.floats(-3.0, 0.0, allow_subnormal=False),  # probabilities of 0.05 .. 1
    st.floats(-30.0, 0.0, allow_subnormal=False),  # below the -20 log_prob floor at times
)
_LOGPROBS = st.one_of(st.just(-math.inf), _FINITE_LOGPROBS)
# Finite values for padded slots, which every implementation must ignore.
_JUNK = st.one_of(
    st.sampled_from([0.0, 50.0, -1e3]),
    st.floats(-1e3, 1e3, allow_subnormal=False),
)
_TURN_REWARDS = st.one_of(
    st.sampled_from([0.0, 1.0, 0.25, _FORMAT_PENALTY]),
    st.floats(-2.0, 1.0, allow_subnormal=False),
)
_NONZERO_TURN_REWARDS = _TURN_REWARDS.filter(lambda value: value != 0.0)
_PADDING_ROW = st.sampled_from([False] * 7 + [True])  # shrinks towards a real row


def _draw_num_turns(draw: Any, max_turns: int, allow_empty_rows: bool) -> int:
    """n_i in 1 .. max_turns, or 0 (a padding row) about one time in eight when allowed."""
    if allow_empty_rows and draw(_PADDING_ROW):
        return 0
    return draw(st.integers(1, max_turns))


@st.composite
def _turn_batches(
    draw: Any,
    max_groups: int,
    max_group_size: int,
    max_turns: int,
    allow_neg_inf: bool,
    allow_empty_rows: bool,
    ties: bool,
    contiguous_groups: bool,
) -> TurnBatch:
    num_turns = draw(st.integers(1, max_turns))
    num_groups = draw(st.integers(1, max_groups))
    ids = draw(_distinct_ids(num_groups))
    shared_size = draw(st.integers(1, max_group_size)) if contiguous_groups else None
    tie_modes = ["none", "equal_outcome", "constant"] if ties else ["none"]
    logprobs = _LOGPROBS if allow_neg_inf else _FINITE_LOGPROBS

    rows: list[tuple[list[float], float, int, int]] = []
    for group_id in ids:
        size = shared_size or draw(st.integers(1, max_group_size))
        tie_mode = draw(st.sampled_from(tie_modes))
        # equal_outcome: one outcome for the whole group (a zero-variance GRPO group and a
        # zero-variance final-turn pool); constant: every valid turn reward of the group is 0
        # (a zero-variance joint pool): equal probes in each row and outcome 0.
        shared_outcome = draw(_OUTCOMES) if tie_mode == "equal_outcome" else 0.0
        for _ in range(size):
            num_valid = _draw_num_turns(draw, num_turns, allow_empty_rows)
            if tie_mode == "constant":
                level = draw(logprobs)
                valid = [level] * num_valid
                outcome = 0.0
            else:
                valid = draw(st.lists(logprobs, min_size=num_valid, max_size=num_valid))
                outcome = shared_outcome if tie_mode == "equal_outcome" else draw(_OUTCOMES)
            padded = draw(
                st.lists(_JUNK, min_size=num_turns - num_valid, max_size=num_turns - num_valid)
            )
            rows.append((valid + padded, outcome, num_valid, group_id))

    if not contiguous_groups:
        order = draw(st.permutations(range(len(rows))))
        rows = [rows[k] for k in order]
    return TurnBatch(
        answer_logprob=np.asarray([row[0] for row in rows], dtype=np.float64).reshape(
            len(rows), num_turns
        ),
        outcome=np.asarray([row[1] for row in rows], dtype=np.float64),
        turn_mask=_prefix_mask([row[2] for row in rows], num_turns),
        group_ids=np.asarray([row[3] for row in rows], dtype=np.int64),
    )


def turn_batches(
    *,
    max_groups: int = 4,
    max_group_size: int = 6,
    max_turns: int = 6,
    allow_neg_inf: bool = True,
    allow_empty_rows: bool = True,
    ties: bool = True,
    contiguous_groups: bool = False,
) -> st.SearchStrategy[TurnBatch]:
    """Valid turn-level batches (:class:`TurnBatch`) of 1 .. max_groups groups.

    Each group has 1 .. max_group_size rollouts (rows shuffled across groups), T is drawn in
    1 .. max_turns and each rollout has 0 .. T valid turns (1 .. T without empty rows).
    With ``contiguous_groups`` every group has the same size G and its rows are contiguous
    (verl's and TRL's layout): ``group_size = B // number of groups`` describes the batch.

    Args:
      allow_neg_inf: valid probe log-probs may be ``-inf`` (probability 0).
      allow_empty_rows: rollouts with no valid turn (batch padding) may appear.
      ties: some groups share one outcome (zero-variance GRPO group and final-turn pool) or
        have all turn rewards equal to 0 (zero-variance joint pool); exact ties within rows
        (zero information gain) appear either way.
      contiguous_groups: equal group sizes, each group's rows contiguous (see above).
    """
    max_groups = _check_int(max_groups, "max_groups", 1)
    max_group_size = _check_int(max_group_size, "max_group_size", 1)
    max_turns = _check_int(max_turns, "max_turns", 1)
    return _turn_batches(
        max_groups, max_group_size, max_turns, allow_neg_inf, allow_empty_rows, ties, contiguous_groups
    )


_TARGET_WEIGHTS = st.sampled_from([1.0, 0.5, 2.0, 0.0, 0.25, -0.5])
_SUBGOAL_PATTERNS = st.sampled_from(["drawn", "drawn", "constant", "rise_and_fall"])


def _subgoal_column(draw: Any, num_valid: int, num_turns: int, logprobs: Any) -> list[float]:
    """One sub-goal's probes of one row: drawn values, one constant value, or a rise then a fall
    (what a bridge entity's probe does once the next hop is found), then junk on padded turns."""
    pattern = draw(_SUBGOAL_PATTERNS)
    if pattern == "constant":
        valid = [draw(logprobs)] * num_valid
    elif pattern == "rise_and_fall":
        peak = draw(st.integers(0, max(num_valid - 1, 0)))
        valid = [-0.1 if j == peak else -3.0 for j in range(num_valid)]
    else:
        valid = draw(st.lists(logprobs, min_size=num_valid, max_size=num_valid))
    return valid + draw(st.lists(_JUNK, min_size=num_turns - num_valid, max_size=num_turns - num_valid))


@st.composite
def _target_batches(draw: Any, max_targets: int, allow_neg_inf: bool, turn_batch: Any) -> TargetBatch:
    batch = draw(turn_batch)
    num_rollouts, num_turns = batch.turn_mask.shape
    num_targets = draw(st.integers(1, max_targets))
    logprobs = _LOGPROBS if allow_neg_inf else _FINITE_LOGPROBS
    answer_logprob = np.full((num_rollouts, num_turns, num_targets), np.nan)
    answer_logprob[:, :, 0] = batch.answer_logprob
    target_mask = np.zeros((num_rollouts, num_targets), dtype=bool)
    target_mask[:, 0] = True
    for i in range(num_rollouts):
        num_valid = int(batch.turn_mask[i].sum())
        for k in range(1, num_targets):
            target_mask[i, k] = draw(st.booleans())
            if target_mask[i, k]:
                answer_logprob[i, :, k] = _subgoal_column(draw, num_valid, num_turns, logprobs)
    shared = draw(st.booleans())
    if shared:
        weights = np.tile(np.asarray(draw(st.lists(_TARGET_WEIGHTS, min_size=num_targets, max_size=num_targets)),
                                     dtype=np.float64), (num_rollouts, 1))
    else:
        weights = np.asarray(
            draw(st.lists(_TARGET_WEIGHTS, min_size=num_rollouts * num_targets, max_size=num_rollouts * num_targets)),
            dtype=np.float64,
        ).reshape(num_rollouts, num_targets)
    return TargetBatch(answer_logprob, batch.outcome, batch.turn_mask, batch.group_ids, target_mask, weights)


def target_batches(
    *,
    max_targets: int = 4,
    max_groups: int = 4,
    max_group_size: int = 6,
    max_turns: int = 6,
    allow_neg_inf: bool = True,
    allow_empty_rows: bool = True,
    ties: bool = True,
    contiguous_groups: bool = False,
) -> st.SearchStrategy[TargetBatch]:
    """Valid turn-level batches with K = 1 .. max_targets probe targets (:class:`TargetBatch`).

    The answer column and the rest of the batch are a :func:`turn_batches` draw (same arguments);
    each row has each sub-goal target k >= 1 or not (``target_mask``), whose probes are drawn
    values, a constant, or a rise then a fall; absent targets are NaN everywhere. The weights are
    one ``[K]`` row shared by every rollout or drawn per rollout.
    """
    max_targets = _check_int(max_targets, "max_targets", 1)
    return _target_batches(
        max_targets,
        allow_neg_inf,
        turn_batches(max_groups=max_groups, max_group_size=max_group_size, max_turns=max_turns,
                     allow_neg_inf=allow_neg_inf, allow_empty_rows=allow_empty_rows, ties=ties,
                     contiguous_groups=contiguous_groups),
    )


def _draw_row_tokens(draw: Any, num_runs: int, max_turn_tokens: int, max_observation_tokens: int) -> list[int]:
    """One row's response mask: num_runs runs of 1s separated by observation runs, maybe a trailing one."""
    tokens: list[int] = []
    for run in range(num_runs):
        if run > 0:
            tokens += [0] * draw(st.integers(1, max_observation_tokens))
        tokens += [1] * draw(st.integers(1, max_turn_tokens))
    if num_runs > 0:
        tokens += [0] * draw(st.integers(0, max_observation_tokens))  # trailing observation
    return tokens


def _fill_token_arrays(
    draw: Any, rows: list[tuple[list[int], list[float], int]], final_reward_after_last_run: bool
) -> TokenBatch:
    """The TokenBatch of drawn rows (token mask, turn rewards, group id), padded with 0-2 tokens."""
    num_rollouts = len(rows)
    num_turns = max(len(row[1]) for row in rows)
    num_tokens = max(len(row[0]) for row in rows) + draw(st.integers(0, 2))  # + padding
    response_mask = np.zeros((num_rollouts, num_tokens), dtype=np.int64)
    turn_rewards = np.zeros((num_rollouts, num_turns), dtype=np.float64)
    token_level_rewards = np.zeros((num_rollouts, num_tokens), dtype=np.float64)
    for i, (tokens, rewards, _) in enumerate(rows):
        response_mask[i, : len(tokens)] = tokens
        turn_rewards[i, : len(rewards)] = rewards
        run_ends = [s for s in range(len(tokens)) if tokens[s] == 1 and (s + 1 == len(tokens) or tokens[s + 1] == 0)]
        for reward, end in zip(rewards, run_ends):
            token_level_rewards[i, end] = reward
        if final_reward_after_last_run and run_ends and run_ends[-1] + 1 < num_tokens:
            if draw(st.booleans()):
                target = draw(st.integers(run_ends[-1] + 1, num_tokens - 1))
                token_level_rewards[i, target] = token_level_rewards[i, run_ends[-1]]
                token_level_rewards[i, run_ends[-1]] = 0.0
    return TokenBatch(
        response_mask=response_mask,
        turn_rewards=turn_rewards,
        turn_mask=_prefix_mask([len(row[1]) for row in rows], num_turns),
        token_level_rewards=token_level_rewards,
        group_ids=np.asarray([row[2] for row in rows], dtype=np.int64),
    )


@st.composite
def _token_batches(
    draw: Any,
    max_groups: int,
    max_group_size: int,
    max_turns: int,
    max_turn_tokens: int,
    max_observation_tokens: int,
    exact_zero_rewards: bool,
    allow_empty_rows: bool,
    ties: bool,
    final_reward_after_last_run: bool,
    contiguous_groups: bool,
) -> TokenBatch:
    num_groups = draw(st.integers(1, max_groups))
    ids = draw(_distinct_ids(num_groups))
    shared_size = draw(st.integers(1, max_group_size)) if contiguous_groups else None
    tie_modes = ["none", "constant"] if ties else ["none"]
    reward_values = _TURN_REWARDS if exact_zero_rewards else _NONZERO_TURN_REWARDS

    # Each row: (token mask as a list, turn rewards of its runs, group id).
    rows: list[tuple[list[int], list[float], int]] = []
    for group_index, group_id in enumerate(ids):
        size = shared_size or draw(st.integers(1, max_group_size))
        constant = draw(st.sampled_from(tie_modes)) == "constant"
        level = draw(reward_values)
        for member in range(size):
            # The very first row is never empty so that T >= 1 and S >= 1.
            first_row = group_index == 0 and member == 0
            num_runs = _draw_num_turns(draw, max_turns, allow_empty_rows and not first_row)
            tokens = _draw_row_tokens(draw, num_runs, max_turn_tokens, max_observation_tokens)
            if constant:
                rewards = [level] * num_runs
            else:
                rewards = draw(st.lists(reward_values, min_size=num_runs, max_size=num_runs))
            rows.append((tokens, rewards, group_id))

    if not contiguous_groups:
        order = draw(st.permutations(range(len(rows))))
        rows = [rows[k] for k in order]
    return _fill_token_arrays(draw, rows, final_reward_after_last_run)


def token_batches(
    *,
    max_groups: int = 3,
    max_group_size: int = 4,
    max_turns: int = 4,
    max_turn_tokens: int = 3,
    max_observation_tokens: int = 3,
    exact_zero_rewards: bool = True,
    allow_empty_rows: bool = True,
    ties: bool = True,
    final_reward_after_last_run: bool = False,
    contiguous_groups: bool = False,
) -> st.SearchStrategy[TokenBatch]:
    """Valid batches in verl's token layout (:class:`TokenBatch`).

    Each row has 0 .. max_turns runs of 1 .. max_turn_tokens generated tokens separated by
    observation runs of 1 .. max_observation_tokens zeros, an optional trailing observation
    run, then padding. At least one row of the batch has a turn (T >= 1).

    Args:
      exact_zero_rewards: turn rewards may be exactly 0.0 (a real zero information gain).
      allow_empty_rows: rows without any generated token (batch padding) may appear.
      ties: some groups give every turn the same reward (zero-variance pools).
      final_reward_after_last_run: in some rows with a trailing observation or padding, move
        the final turn's reward from the last generated token to a mask-0 token after it
        (where verl reward managers put it when a rollout ends on an observation); then
        ``token_level_rewards`` is no longer ``place_turn_rewards(turn_rewards, ...)``, but the
        turn rewards read back from it are still ``turn_rewards``.
      contiguous_groups: every group has the same size G and contiguous rows (verl's layout):
        ``group_size = B // number of groups`` describes the batch.
    """
    max_groups = _check_int(max_groups, "max_groups", 1)
    max_group_size = _check_int(max_group_size, "max_group_size", 1)
    max_turns = _check_int(max_turns, "max_turns", 1)
    max_turn_tokens = _check_int(max_turn_tokens, "max_turn_tokens", 1)
    max_observation_tokens = _check_int(max_observation_tokens, "max_observation_tokens", 1)
    return _token_batches(
        max_groups,
        max_group_size,
        max_turns,
        max_turn_tokens,
        max_observation_tokens,
        exact_zero_rewards,
        allow_empty_rows,
        ties,
        final_reward_after_last_run,
        contiguous_groups,
    )


# --------------------------------------------------------------------------------------------
# Conversion to the library under test.

_BACKENDS = ("numpy", "torch", "jax")


def _convert_numpy(array: np.ndarray, float_dtype: str | None) -> np.ndarray:
    if array.dtype.kind == "f" and float_dtype is not None:
        try:
            target = np.dtype(float_dtype)
        except TypeError as error:
            raise ValueError(f"float_dtype {float_dtype!r} is not a NumPy float dtype") from error
        return array.astype(target)
    return array.copy()


def _convert_torch(array: np.ndarray, float_dtype: str | None, device: Any) -> Any:
    import torch

    if array.dtype.kind not in "fbiu":
        raise TypeError(f"cannot convert an array of dtype {array.dtype} to torch")
    tensor = torch.from_numpy(np.array(array, copy=True))
    if array.dtype.kind == "f" and float_dtype is not None:
        target = getattr(torch, float_dtype, None)
        if not isinstance(target, torch.dtype) or not target.is_floating_point:
            raise ValueError(f"float_dtype {float_dtype!r} is not a torch float dtype")
        tensor = tensor.to(target)
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def _convert_jax(array: np.ndarray, float_dtype: str | None, device: Any) -> Any:
    import jax
    import jax.numpy as jnp

    x64 = bool(jax.config.read("jax_enable_x64"))
    kind = array.dtype.kind
    if kind not in "fbiu":
        raise TypeError(f"cannot convert an array of dtype {array.dtype} to jax")
    if kind == "f":
        name = float_dtype if float_dtype is not None else ("float64" if x64 else "float32")
        try:
            target = jnp.dtype(name)
        except TypeError as error:
            raise ValueError(f"float_dtype {name!r} is not a JAX float dtype") from error
        if target.itemsize == 8 and not x64:
            raise ValueError(
                f"float_dtype {name!r} needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))"
            )
        result = jnp.asarray(array.astype(np.float64 if x64 else np.float32), dtype=target)
    elif kind == "b":
        result = jnp.asarray(array)
    else:
        if not x64:
            info = np.iinfo(np.int32)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError("integer values do not fit int32 (JAX without jax_enable_x64)")
            array = array.astype(np.int32)
        result = jnp.asarray(array)
    if device is not None:
        if isinstance(device, str):
            device = jax.devices(device)[0]
        result = jax.device_put(result, device)
    return result


def _convert(array: Any, backend: str, float_dtype: str | None, device: Any) -> Any:
    array = np.asarray(array)
    if backend == "numpy":
        if device is not None:
            raise ValueError(f"device must be None for the numpy backend, got {device!r}")
        return _convert_numpy(array, float_dtype)
    if backend == "torch":
        return _convert_torch(array, float_dtype, device)
    return _convert_jax(array, float_dtype, device)


def to_backend(
    batch_or_array: Any,
    backend: str,
    *,
    float_dtype: str | None = None,
    device: Any = None,
) -> Any:
    """Convert a drawn batch (every field of a NamedTuple) or one array to another library.

    Float arrays are cast to ``float_dtype`` when given (``"float32"``, ``"float16"``,
    ``"bfloat16"``, ...; NumPy has no bfloat16), bool stays bool and integers stay integers.
    NumPy and Torch keep float64/int64 by default. JAX follows its own precision mode: without
    ``jax_enable_x64`` floats become float32 and integers int32 (ids are drawn in the int32
    range for this reason), and asking for a 64-bit ``float_dtype`` is a ValueError.

    Args:
      batch_or_array: a :class:`TurnBatch`, :class:`TokenBatch` (any NamedTuple of arrays) or
        one array-like.
      backend: ``"numpy"``, ``"torch"`` or ``"jax"`` (imported here, on first use).
      float_dtype: target dtype name for the float arrays.
      device: Torch: anything ``Tensor.to`` accepts; JAX: a ``jax.Device`` or platform name
        (``"cpu"``, ``"gpu"``). Must be None for NumPy.

    Returns:
      The same NamedTuple type with converted fields, or the converted array. Arrays are
      copies: mutating them does not touch the drawn batch.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if float_dtype is not None and not isinstance(float_dtype, str):
        raise TypeError(f"float_dtype must be a dtype name such as 'float32', got {float_dtype!r}")
    if isinstance(batch_or_array, tuple) and hasattr(batch_or_array, "_fields"):
        return type(batch_or_array)(
            *(_convert(field, backend, float_dtype, device) for field in batch_or_array)
        )
    return _convert(batch_or_array, backend, float_dtype, device)
