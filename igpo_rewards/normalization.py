"""Section 3 of the spec: group normalization of turn rewards, and the GRPO baseline.

Shapes: B rollouts in a batch (several groups), G rollouts per group, T turns (padded).
"""

from __future__ import annotations

from typing import Any

import einops

from igpo_rewards import _checks, _groups, _turns
from igpo_rewards.backends import Backend, get_backend

Array = Any

MODES = ("joint", "separate", "turn_index")
WEIGHTINGS = ("turn", "trajectory")
SCALES = ("std", "none")


def normalization_options(*, mode: Any, weighting: Any, scale: Any, eps: Any, ddof: Any) -> dict[str, Any]:
    """The checked hyperparameters of :func:`group_normalize` (numbers as Python numbers)."""
    return dict(
        mode=_checks.check_choice("mode", mode, MODES),
        weighting=_checks.check_choice("weighting", weighting, WEIGHTINGS),
        scale=_checks.check_choice("scale", scale, SCALES),
        eps=_checks.check_eps(eps),
        ddof=_checks.check_count("ddof", ddof),
    )


def group_normalize(
    rewards: Array,
    turn_mask: Array,
    group_ids: Array | None = None,
    *,
    group_size: int | None = None,
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
    pools, its final-turn (outcome) entries and its earlier (IG) entries; ``mode="turn_index"``
    (after A2TGPO, arXiv 2605.06200) gives each group one pool per turn index j of the IG entries
    (every rollout's turn j < n_i - 1) and one of its outcome entries, so a turn is compared only
    with the turns at its depth and a rollout's turn count moves no other rollout's IG entries at
    other depths (an entry alone at its depth gets 0).
    Weights w: ``weighting="turn"`` (the paper's) counts every entry once, so rollouts with
    more turns weigh more in the baseline; ``weighting="trajectory"`` gives each entry
    1 / (number of entries its rollout has in the pool), so every rollout weighs the same.
    N_p is the pool's entry count and W_p its total weight; with turn weighting the variance
    is the usual sum((r - mu)^2) / (N_p - ddof).

    Edge cases: sigma := 1 for a pool with one entry (e.g. a single-rollout group with one
    turn), with N_p <= ddof, or with zero variance (entries all equal, or differences too small
    to square in the dtype), so these pools give exactly 0 for any eps, eps = 0 included
    (deviations are taken from the pool's max, so a constant pool has exact-zero deviations,
    never rounding noise that eps would amplify), and never 0 / 0; padded turns and
    rows with no valid turn give 0. ``scale="none"`` only subtracts the mean (Dr. GRPO style).
    Half-precision rewards (float16, bfloat16) are pooled in float32 and the result cast back.

    Args:
      rewards: [B, T] turn rewards r_{i,j}; must be finite at valid turns. Int/bool promote
        to the library's default float (float64 NumPy, torch.get_default_dtype(), JAX's
        default float).
      turn_mask: [B, T] prefix mask of valid turns (bool or 0/1).
      group_ids: [B] group of each rollout, in any order (not contiguous): on every backend a
        list or NumPy array of any sortable ids (ints, strings, verl's object array of uid
        strings), factorized on the host; or an integer array of the rewards' own library,
        which stays on its device (and may be traced under jit).
      group_size: G, instead of ``group_ids``, when the rows are G contiguous rollouts per group
        (verl's and TRL's layout; B a multiple of G). The pools are then reductions over a
        [B / G, G, T] view: no factorization, no sort, no scatter, static shapes.
      mode: "joint", "separate" or "turn_index".  weighting: "turn" or "trajectory" (the same for
        "turn_index": a rollout has one entry per pool).  scale: "std" or "none".
      eps: added to sigma, a finite number >= 0.  ddof: delta degrees of freedom of sigma (0 =
        population std), an int >= 0.
      validate: value checks (prefix mask, NaN/inf in rewards).

    Returns:
      [B, T] normalized rewards, dtype of ``rewards``.

    Raises:
      TypeError: neither or both of ``group_ids`` and ``group_size``.
      ValueError: B not a multiple of ``group_size`` (and the checks above).

    Example:
      >>> import numpy as np
      >>> rewards = np.array([[0.5, 1.0], [0.0, 0.0]])
      >>> np.round(group_normalize(rewards, [[1, 1], [1, 0]], [7, 7]), 4)  # pool {0.5, 1, 0}
      array([[ 0.    ,  1.2247],
             [-1.2247,  0.    ]])
      >>> np.round(group_normalize(rewards, [[1, 1], [1, 0]], group_size=2), 4)  # the same group
      array([[ 0.    ,  1.2247],
             [-1.2247,  0.    ]])
    """
    options = normalization_options(mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(rewards=rewards, turn_mask=turn_mask, **_groups.dispatch(group_ids))
    rewards, turn_mask = _turns.turn_values_and_mask(
        backend, "rewards", rewards, turn_mask, validate=validate, allow_neg_inf=False
    )
    groups = _groups.resolve(
        backend, group_ids, rewards.shape[0], group_size=group_size, like=rewards, validate=validate
    )
    return normalize(backend, rewards, turn_mask, groups, **options)


def normalize(
    backend: Backend,
    rewards: Array,
    turn_mask: Array,
    groups: _groups.Groups,
    *,
    mode: str,
    weighting: str,
    scale: str,
    eps: float,
    ddof: int,
) -> Array:
    """:func:`group_normalize` on checked arrays: rewards [B, T] float, bool turn mask, groups.

    Two formulations of the same statistics: reductions over the [Q, G, T] view for contiguous
    groups (``groups.group_size``), segment sums over dense group ids otherwise. Both take each
    entry's deviation from its pool's max first (exact zeros for constant pools), then the
    weighted mean and variance of the pool; sigma := 1 for degenerate pools (:func:`_pool_std`).
    """
    num_rollouts, num_turns = rewards.shape
    if num_rollouts == 0 or num_turns == 0:
        return rewards
    values = backend.astype(rewards, backend.statistics_dtype(rewards.dtype))
    if groups.group_size is not None:
        normalized = _normalize_dense(backend, values, turn_mask, groups.group_size, mode=mode,
                                      weighting=weighting, scale=scale, eps=eps, ddof=ddof)
    else:
        normalized = _normalize_segments(backend, values, turn_mask, groups, mode=mode,
                                         weighting=weighting, scale=scale, eps=eps, ddof=ddof)
    return backend.astype(backend.where(turn_mask, normalized, 0.0), rewards.dtype)


def _normalize_segments(
    backend: Backend, values: Array, turn_mask: Array, groups: _groups.Groups, *,
    mode: str, weighting: str, scale: str, eps: float, ddof: int,
) -> Array:
    """Pools as segments of the flat [B * T] entries: segment sums over dense group ids."""
    pool, num_pools, weight = _pools(backend, turn_mask, groups, values.dtype, mode=mode, weighting=weighting)
    deviation = _pool_z_scores(
        backend, values.reshape(-1), turn_mask.reshape(-1), weight,
        pool_sum=lambda x: backend.segment_sum(x, pool, num_pools + 1),
        pool_max=lambda x: backend.segment_max(x, pool, num_pools + 1),
        spread=lambda per_pool: per_pool[pool],
        scale=scale, eps=eps, ddof=ddof,
    )
    return deviation.reshape(values.shape)


def _normalize_dense(
    backend: Backend, values: Array, turn_mask: Array, group_size: int, *,
    mode: str, weighting: str, scale: str, eps: float, ddof: int,
) -> Array:
    """Pools of G contiguous rollouts: reductions over a [P, Q, G, T] view (P pools per group).

    ``member[p, q, g, t]`` says whether entry (q * G + g, t) is in pool p of group q: P = 1 for
    mode "joint" (every valid turn), P = 2 for "separate" (the non-final turns, the final turn),
    P = T for "turn_index" (the non-final turns at index j = 0 .. T - 2, the final turn).
    Per-pool values keep their reduced axes as size 1, so they broadcast back onto the entries.
    """
    is_final = _turns.final_turn_mask(backend, turn_mask)
    if mode == "joint":
        pools = [turn_mask]
    elif mode == "separate":
        pools = [turn_mask & ~is_final, is_final]
    else:
        position = backend.arange(turn_mask.shape[1], like=turn_mask)[None, :]
        information = turn_mask & ~is_final
        pools = [information & (position == j) for j in range(turn_mask.shape[1] - 1)] + [is_final]
    member = backend.stack([einops.rearrange(p, "(q g) t -> q g t", g=group_size) for p in pools], axis=0)
    weight = backend.astype(member, values.dtype)
    if weighting == "trajectory":  # 1 / (the rollout's number of entries in the pool)
        weight = weight / backend.maximum(einops.reduce(weight, "p q g t -> p q g 1", "sum"), 1.0)
    deviation = _pool_z_scores(
        backend, einops.rearrange(values, "(q g) t -> 1 q g t", g=group_size), member, weight,
        pool_sum=lambda x: einops.reduce(x, "p q g t -> p q 1 1", "sum"),
        pool_max=lambda x: einops.reduce(x, "p q g t -> p q 1 1", "max"),
        spread=lambda per_pool: per_pool,
        scale=scale, eps=eps, ddof=ddof,
    )
    return einops.reduce(deviation, "p q g t -> (q g) t", "sum")  # each entry is in one pool at most


def _pool_z_scores(
    backend: Backend, entries: Array, member: Array, weight: Array, *,
    pool_sum: Any, pool_max: Any, spread: Any, scale: str, eps: float, ddof: int,
) -> Array:
    """(r - mu_p) / (sigma_p + eps) of every entry in a pool, 0 elsewhere: the statistics of
    :func:`group_normalize` given how to reduce over each pool (``pool_sum``, ``pool_max``) and how
    to ``spread`` a per-pool value back onto the pool's entries.

    Deviations are taken from the pool's max first: exact zeros for constant pools, better
    rounding otherwise. W_p = pool weight, N_p = pool count.
    """
    pool_top = pool_max(backend.where(member, entries, float("-inf")))
    shifted = backend.where(member, entries - backend.where(member, spread(pool_top), 0.0), 0.0)
    pool_count = pool_sum(backend.astype(member, weight.dtype))
    pool_weight = pool_sum(weight)
    pool_mean = pool_sum(weight * shifted) / _positive(backend, pool_weight)
    deviation = backend.where(member, shifted - spread(pool_mean), 0.0)
    if scale == "std":
        effective = pool_weight * (pool_count - ddof) / backend.maximum(pool_count, 1.0)
        variance = pool_sum(weight * deviation * deviation) / _positive(backend, effective)
        deviation = deviation / (spread(_pool_std(backend, variance, pool_count, ddof)) + eps)
    return deviation


def _positive(backend: Backend, x: Array) -> Array:
    """``x`` with its zeros (empty pools) replaced by 1, a divisor for sums that are 0 there."""
    return backend.where(x > 0, x, 1.0)


def _pool_std(backend: Backend, variance: Array, pool_count: Array, ddof: int) -> Array:
    """sigma per pool; 1 for one entry, N <= ddof, or zero variance (so those give exactly 0)."""
    degenerate = (pool_count <= 1.0) | (pool_count - ddof <= 0.0) | (variance <= 0.0)
    return backend.where(degenerate, 1.0, backend.sqrt(backend.maximum(variance, 0.0)))


def _pools(
    backend: Backend, turn_mask: Array, groups: _groups.Groups, dtype: Any, *, mode: str, weighting: str
) -> tuple[Array, int, Array]:
    """(pool [B * T] of each entry, number of pools, weight [B * T] of each entry, of ``dtype``).

    Padded entries go to a dump pool (index num_pools) that is never read.
    """
    dense_groups = groups.dense_ids
    is_final = _turns.final_turn_mask(backend, turn_mask)
    turns = _turns.num_turns(backend, turn_mask)[:, None]
    if mode == "joint":
        num_pools = groups.num_segments
        pool = backend.where(turn_mask, dense_groups[:, None], num_pools)
        entries_of_rollout_in_pool = turns
    elif mode == "separate":
        num_pools = 2 * groups.num_segments
        final_flag = backend.astype(is_final, dense_groups.dtype)
        pool = backend.where(turn_mask, 2 * dense_groups[:, None] + final_flag, num_pools)
        entries_of_rollout_in_pool = backend.where(is_final, 1, turns - 1)
    else:  # T pools per group: the IG entries at index j = 0 .. T - 2, then the outcome entries (index T - 1)
        num_turns = turn_mask.shape[1]
        num_pools = num_turns * groups.num_segments
        position = backend.astype(backend.arange(num_turns, like=turn_mask), dense_groups.dtype)[None, :]
        index = backend.where(is_final, num_turns - 1, position)
        pool = backend.where(turn_mask, num_turns * dense_groups[:, None] + index, num_pools)
        entries_of_rollout_in_pool = turns * 0 + 1
    if weighting == "turn":
        weight = backend.astype(turn_mask, dtype)
    else:
        entries = backend.astype(backend.maximum(entries_of_rollout_in_pool, 1), dtype)
        weight = backend.where(turn_mask, 1.0 / entries, 0.0)
    return pool.reshape(-1), num_pools, weight.reshape(-1)


def grpo_advantages(
    outcome: Array,
    group_ids: Array | None = None,
    *,
    group_size: int | None = None,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    validate: bool = True,
) -> Array:
    r"""The outcome-only GRPO baseline: each rollout's outcome z-scored within its group.

    .. math:: A_i = \frac{R_i - \mu_g}{\sigma_g + \epsilon}

    The same value goes on every generated token of the rollout. A group whose outcomes are
    all equal (all wrong or all right) gets exactly 0 everywhere, for any eps: "advantage
    collapse". A single-rollout group uses sigma := 1 and gets 0.

    Args:
      outcome: [B] outcome rewards R_i.
      group_ids: [B] group of each rollout (see :func:`group_normalize`).
      group_size: G contiguous rollouts per group, instead of ``group_ids``.
      scale, eps, ddof, validate: as in :func:`group_normalize`.

    Returns:
      [B] advantages, dtype of ``outcome`` (ints promote).

    Example:
      >>> import numpy as np
      >>> np.round(grpo_advantages(np.array([1.0, 0.0, 0.0, 0.0]), ["q1", "q1", "q2", "q2"]), 4)
      array([ 1., -1.,  0.,  0.])
    """
    options = normalization_options(mode="joint", weighting="turn", scale=scale, eps=eps, ddof=ddof)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(outcome=outcome, **_groups.dispatch(group_ids))
    outcome = _per_rollout_values(backend, "outcome", outcome, validate=validate, allow_neg_inf=False)
    groups = _groups.resolve(
        backend, group_ids, outcome.shape[0], group_size=group_size, like=outcome, validate=validate
    )
    single_turn = backend.zeros((outcome.shape[0], 1), backend.index_dtype(), like=outcome) == 0
    return normalize(backend, outcome[:, None], single_turn, groups, **options)[:, 0]


def _per_rollout_values(backend: Backend, argument: str, values: Array, *, validate: bool, allow_neg_inf: bool) -> Array:
    values = backend.asarray(values)
    _checks.check_ndim(argument, values, 1, "B")
    _checks.check_numeric(backend, argument, values)
    values = backend.astype(values, backend.float_dtype(values))
    if validate:
        _checks.check_no_nan(backend, argument, values, None, allow_neg_inf=allow_neg_inf)
    return values


def zero_variance_group_fraction(
    values: Array, group_ids: Array | None = None, *, group_size: int | None = None, validate: bool = True
) -> Array:
    r"""The advantage-collapse rate: the fraction of groups whose values are all equal.

    With outcome rewards as ``values`` this is the share of questions on which GRPO gets no
    signal at all. A single-rollout group counts as zero-variance.

    Args:
      values: [B] one value per rollout (e.g. outcome rewards).
      group_ids: [B] group of each rollout (see :func:`group_normalize`).
      group_size: G contiguous rollouts per group, instead of ``group_ids``.
      validate: check for NaN.

    Returns:
      A 0-d floating array of the input's library (a NumPy float64 scalar on NumPy), so that
      no host sync happens on GPUs until the caller asks for ``float(...)``; 0.0 for an empty
      batch.

    Example:
      >>> float(zero_variance_group_fraction([1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1]))
      0.5
    """
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(values=values, **_groups.dispatch(group_ids))
    values = _per_rollout_values(backend, "values", values, validate=validate, allow_neg_inf=True)
    groups = _groups.resolve(
        backend, group_ids, values.shape[0], group_size=group_size, like=values, validate=validate
    )
    return collapsed_fraction(backend, values, groups)


def collapsed_fraction(backend: Backend, values: Array, groups: _groups.Groups) -> Array:
    """:func:`zero_variance_group_fraction` on checked [B] values and groups."""
    if groups.group_size is not None:
        grouped = einops.rearrange(values, "(q g) -> q g", g=groups.group_size)
        collapsed = einops.reduce(grouped, "q g -> q", "max") == einops.reduce(grouped, "q g -> q", "min")
        return backend.sum(backend.astype(collapsed, values.dtype)) / float(max(groups.num_segments, 1))
    dense_groups, num_groups, _ = groups
    group_max = backend.segment_max(values, dense_groups, num_groups)
    group_min = -backend.segment_max(-values, dense_groups, num_groups)
    # Device ids factorize into B segments, some possibly unused: count only groups present.
    ones = backend.astype(dense_groups >= 0, values.dtype)
    present = backend.segment_sum(ones, dense_groups, num_groups) > 0
    collapsed = present & (group_max == group_min)
    num_present = backend.sum(backend.astype(present, values.dtype))
    return backend.sum(backend.astype(collapsed, values.dtype)) / backend.maximum(num_present, 1.0)
