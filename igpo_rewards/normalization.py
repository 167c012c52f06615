"""Section 3 of the spec: group normalization of turn rewards, and the GRPO baseline.

Shapes: B rollouts in a batch (several groups), G rollouts per group, T turns (padded).
"""

from __future__ import annotations

from typing import Any

from igpo_rewards import _checks, _turns
from igpo_rewards.backends import Backend, get_backend

Array = Any

MODES = ("joint", "separate")
WEIGHTINGS = ("turn", "trajectory")
SCALES = ("std", "none")


def _check_hyperparameters(mode: str, weighting: str, scale: str, eps: float, ddof: int) -> None:
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("weighting", weighting, WEIGHTINGS)
    _checks.check_choice("scale", scale, SCALES)
    _checks.check_nonnegative_number("eps", eps)
    _checks.check_nonnegative_number("ddof", ddof, integer=True)


def _group_ids(backend: Backend, group_ids: Array, like: Array, num_rollouts: int) -> Array:
    if backend.name == "numpy":
        group_ids = backend.asarray(group_ids)
    else:
        group_ids = backend.asarray(group_ids, like=like)
    _checks.check_group_ids(backend, group_ids, num_rollouts)
    return group_ids


def group_normalize(
    rewards: Array,
    turn_mask: Array,
    group_ids: Array,
    *,
    mode: str = "joint",
    weighting: str = "turn",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    validate: bool = True,
) -> Array:
    r"""Z-scores every valid turn reward within its group's pool.

    .. math::
        \hat A_{i,j} = \frac{r_{i,j} - \mu_p}{\sigma_p + \epsilon}, \quad
        \mu_p = \frac{\sum w\, r}{W_p}, \quad
        \sigma_p^2 = \frac{\sum w\, (r - \mu_p)^2}{W_p (N_p - \text{ddof}) / N_p}

    Pools p: ``mode="joint"`` (the paper's) pools every valid turn reward of every rollout of
    the group, IG and outcome entries together; ``mode="separate"`` gives each group two
    pools, its final-turn (outcome) entries and its earlier (IG) entries.
    Weights w: ``weighting="turn"`` (the paper's) counts every entry once, so rollouts with
    more turns weigh more in the baseline; ``weighting="trajectory"`` gives each entry
    1 / (number of entries its rollout has in the pool), so every rollout weighs the same.
    N_p is the pool's entry count and W_p its total weight; with turn weighting the variance
    is the usual sum((r - mu)^2) / (N_p - ddof).

    Edge cases: a pool with one entry (e.g. a single-rollout group with one turn) uses
    sigma := 1 and so gives 0, as does a pool with N_p <= ddof; a pool whose entries are all
    equal (zero variance) gives exactly 0 (deviations are taken from the pool's max, so
    rounding cannot leave eps-amplified noise); padded turns and rows with no valid turn give 0.
    ``scale="none"`` only subtracts the mean (Dr. GRPO style).

    Args:
      rewards: [B, T] turn rewards r_{i,j}; must be finite at valid turns. Int/bool promote
        to the library's default float (float64 NumPy, torch.get_default_dtype(), JAX's
        default float).
      turn_mask: [B, T] prefix mask of valid turns (bool or 0/1).
      group_ids: [B] group of each rollout; integers of the same library, or on NumPy any
        sortable hashables such as verl's object array of uid strings. Not contiguous, any order.
      mode: "joint" or "separate".  weighting: "turn" or "trajectory".  scale: "std" or "none".
      eps: added to sigma.  ddof: delta degrees of freedom of sigma (0 = population std).
      validate: value checks (prefix mask, NaN/inf in rewards).

    Returns:
      [B, T] normalized rewards, dtype of ``rewards``.

    Example:
      >>> import numpy as np
      >>> rewards = np.array([[0.5, 1.0], [0.0, 0.0]])
      >>> np.round(group_normalize(rewards, [[1, 1], [1, 0]], [7, 7]), 4)  # pool {0.5, 1, 0}
      array([[ 0.    ,  1.2247],
             [-1.2247,  0.    ]])
    """
    _check_hyperparameters(mode, weighting, scale, eps, ddof)
    backend = get_backend(rewards=rewards, turn_mask=turn_mask, group_ids=group_ids)
    rewards, turn_mask = _turns.turn_values_and_mask(
        backend, "rewards", rewards, turn_mask, validate=validate, allow_neg_inf=False
    )
    num_rollouts, num_turns = rewards.shape
    group_ids = _group_ids(backend, group_ids, rewards, num_rollouts)
    if num_rollouts == 0 or num_turns == 0:
        return rewards
    dense_groups, num_groups = backend.factorize(group_ids)
    dense_groups = backend.asarray(dense_groups, like=rewards)
    is_final = _turns.final_turn_mask(backend, turn_mask)
    turns = backend.astype(_turns.num_turns(backend, turn_mask), rewards.dtype)[:, None]

    # Pool of each entry; padded entries go to a dump pool (index num_pools) that is never read.
    if mode == "joint":
        num_pools = num_groups
        pool = backend.where(turn_mask, dense_groups[:, None], num_pools)
        entries_of_rollout_in_pool = turns
    else:
        num_pools = 2 * num_groups
        final_flag = backend.astype(is_final, dense_groups.dtype)
        pool = backend.where(turn_mask, 2 * dense_groups[:, None] + final_flag, num_pools)
        entries_of_rollout_in_pool = backend.where(is_final, 1.0, turns - 1.0)
    pool = pool.reshape(-1)
    valid = turn_mask.reshape(-1)

    if weighting == "turn":
        weight = backend.astype(valid, rewards.dtype)
    else:
        weight = backend.where(turn_mask, 1.0 / backend.maximum(entries_of_rollout_in_pool, 1.0), 0.0)
        weight = weight.reshape(-1)

    def pool_sum(values):
        return backend.segment_sum(values, pool, num_pools + 1)

    # Shift by the pool's max first: exact zeros for constant pools, better rounding otherwise.
    flat = rewards.reshape(-1)
    pool_max = backend.segment_max(backend.where(valid, flat, float("-inf")), pool, num_pools + 1)
    shifted = backend.where(valid, flat - backend.where(valid, pool_max[pool], 0.0), 0.0)
    pool_count = pool_sum(backend.astype(valid, rewards.dtype))
    pool_weight = pool_sum(weight)
    pool_mean = pool_sum(weight * shifted) / backend.maximum(pool_weight, 1e-30)
    deviation = backend.where(valid, shifted - pool_mean[pool], 0.0)
    if scale == "std":
        effective = pool_weight * (pool_count - ddof) / backend.maximum(pool_count, 1.0)
        variance = pool_sum(weight * deviation * deviation) / backend.maximum(effective, 1e-30)
        degenerate = (pool_count <= 1.0) | (pool_count - ddof <= 0.0)
        pool_std = backend.where(degenerate, 1.0, backend.sqrt(backend.maximum(variance, 0.0)))
        deviation = deviation / (pool_std[pool] + eps)
    return backend.where(turn_mask, deviation.reshape(num_rollouts, num_turns), 0.0)


def grpo_advantages(
    outcome: Array,
    group_ids: Array,
    *,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    validate: bool = True,
) -> Array:
    r"""The outcome-only GRPO baseline: each rollout's outcome z-scored within its group.

    .. math:: A_i = \frac{R_i - \mu_g}{\sigma_g + \epsilon}

    The same value goes on every generated token of the rollout. A group whose outcomes are
    all equal (all wrong or all right) gets 0 everywhere: "advantage collapse". A
    single-rollout group uses sigma := 1 and gets 0.

    Args:
      outcome: [B] outcome rewards R_i.
      group_ids: [B] group of each rollout (see :func:`group_normalize`).
      scale, eps, ddof, validate: as in :func:`group_normalize`.

    Returns:
      [B] advantages, dtype of ``outcome`` (ints promote).

    Example:
      >>> import numpy as np
      >>> np.round(grpo_advantages(np.array([1.0, 0.0, 0.0, 0.0]), ["q1", "q1", "q2", "q2"]), 4)
      array([ 1., -1.,  0.,  0.])
    """
    backend = get_backend(outcome=outcome, group_ids=group_ids)
    outcome = backend.asarray(outcome)
    _checks.check_ndim("outcome", outcome, 1, "B")
    single_turn = backend.zeros((outcome.shape[0], 1), backend.index_dtype(), like=outcome) == 0
    normalized = group_normalize(
        outcome[:, None], single_turn, group_ids, scale=scale, eps=eps, ddof=ddof, validate=validate
    )
    return normalized[:, 0]


def zero_variance_group_fraction(values: Array, group_ids: Array, *, validate: bool = True) -> Array:
    r"""The advantage-collapse rate: the fraction of groups whose values are all equal.

    With outcome rewards as ``values`` this is the share of questions on which GRPO gets no
    signal at all. A single-rollout group counts as zero-variance.

    Args:
      values: [B] one value per rollout (e.g. outcome rewards).
      group_ids: [B] group of each rollout (see :func:`group_normalize`).
      validate: check for NaN.

    Returns:
      A 0-d floating array of the input's library (a NumPy float64 scalar on NumPy), so that
      no host sync happens on GPUs until the caller asks for ``float(...)``; 0.0 for an empty
      batch.

    Example:
      >>> float(zero_variance_group_fraction([1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1]))
      0.5
    """
    backend = get_backend(values=values, group_ids=group_ids)
    values = backend.asarray(values)
    _checks.check_ndim("values", values, 1, "B")
    _checks.check_numeric(backend, "values", values)
    values = backend.astype(values, backend.float_dtype(values))
    group_ids = _group_ids(backend, group_ids, values, values.shape[0])
    if validate:
        _checks.check_no_nan(backend, "values", values, None, allow_neg_inf=True)
    dense_groups, num_groups = backend.factorize(group_ids)
    dense_groups = backend.asarray(dense_groups, like=values)
    group_max = backend.segment_max(values, dense_groups, num_groups)
    group_min = -backend.segment_max(-values, dense_groups, num_groups)
    # Torch/JAX factorize into B segments, some possibly unused: count only groups present.
    ones = backend.astype(dense_groups >= 0, values.dtype)
    present = backend.segment_sum(ones, dense_groups, num_groups) > 0
    collapsed = present & (group_max == group_min)
    num_present = backend.sum(backend.astype(present, values.dtype))
    return backend.sum(backend.astype(collapsed, values.dtype)) / backend.maximum(num_present, 1.0)
