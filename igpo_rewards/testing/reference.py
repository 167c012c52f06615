"""Float64 loop reference ("oracle") of every IGPO formula.

Plain Python loops over rollouts, turns and tokens, written straight from the specification
(docs/algorithm.md, arXiv 2510.14967) so that it can be read next to the equations. It is what
the vectorized NumPy/Torch/JAX implementations are tested against, and the loop-style baseline
in the benchmarks. Readability wins over speed everywhere in this module.

Conventions (the same names and argument meanings as the public API of ``igpo_rewards``):

* Shapes: B rollouts, T turns (padded), L answer tokens (padded), S response tokens, K probe
  targets (target 0 the answer, 1 .. K-1 sub-goals).
* Inputs: anything ``np.asarray`` accepts (Torch tensors on any device and dtype are accepted
  too). Values are converted to float64, masks to bool (nonzero = True), indices to int64.
* ``turn_mask[B, T]`` is a prefix mask; rollout i has ``n_i = turn_mask[i].sum()`` turns,
  ``0 .. n_i - 1``. Rows with ``n_i = 0`` are batch padding: they get zeros everywhere.
  The oracle does not check that masks are prefixes (validation is the public API's job); it
  only checks shapes.
* ``group_ids[B]``: any hashable ids (ints, strings, an object array of uid strings).
* Outputs: float64 NumPy arrays (int64 for turn indices, a Python float for
  :func:`zero_variance_group_fraction`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Hashable, NamedTuple

import numpy as np

__all__ = [
    "IGPOAdvantages",
    "answer_logprob",
    "information_gain",
    "target_information_gain",
    "turn_rewards",
    "group_normalize",
    "discounted_returns",
    "variance_rescaled_returns",
    "igpo_advantages",
    "grpo_advantages",
    "turn_index_from_response_mask",
    "broadcast_to_tokens",
    "place_turn_rewards",
    "advantages_from_token_rewards",
    "zero_variance_group_fraction",
]

_KINDS = ("prob", "log_prob")
_MODES = ("joint", "separate", "turn_index")
_POTENTIALS = ("running_max", "probe")
_CLIPS = ("none", "positive")
_ACCUMULATIONS = ("discounted", "sqrt_n")
_WEIGHTINGS = ("turn", "trajectory")
_SCALES = ("std", "none")


class IGPOAdvantages(NamedTuple):
    """Every intermediate of :func:`igpo_advantages`, each float64 ``[B, T]``."""

    advantages: np.ndarray
    normalized_rewards: np.ndarray
    rewards: np.ndarray
    information_gain: np.ndarray


# --------------------------------------------------------------------------------------------
# Input conversion and shape checks (the only checking the oracle does).


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # NumPy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _float64(x: Any) -> np.ndarray:
    return _to_numpy(x).astype(np.float64)


def _bool(x: Any) -> np.ndarray:
    return _to_numpy(x) != 0


def _int64(x: Any) -> np.ndarray:
    return _to_numpy(x).astype(np.int64)


def _check_ndim(array: np.ndarray, name: str, ndim: int, layout: str) -> None:
    if array.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(array.shape)}")


def _check_same_shape(array: np.ndarray, name: str, other: np.ndarray, other_name: str) -> None:
    if array.shape != other.shape:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)} but {other_name} has shape "
            f"{tuple(other.shape)}; they must match"
        )


def _check_rollouts(array: np.ndarray, name: str, num_rollouts: int) -> None:
    if array.ndim != 1 or array.shape[0] != num_rollouts:
        raise ValueError(
            f"{name} must have shape [B] = [{num_rollouts}], got shape {tuple(array.shape)}"
        )


def _group_keys(group_ids: Any, num_rollouts: int, group_size: int | None = None) -> list[Hashable]:
    """One hashable key per rollout (Python scalars, so that 3 and np.int64(3) are one group).

    ``group_size=G`` instead of ids: rollout i is in group i // G (G contiguous rollouts per group).
    """
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids and group_size")
    if group_size is not None:
        if group_size < 1 or num_rollouts % group_size:
            raise ValueError(f"group_size = {group_size} must divide B = {num_rollouts}")
        return [i // group_size for i in range(num_rollouts)]
    if isinstance(group_ids, (list, tuple)):
        keys = list(group_ids)
        if len(keys) != num_rollouts:
            raise ValueError(
                f"group_ids must have length B = {num_rollouts}, got length {len(keys)}"
            )
        return keys
    ids = _to_numpy(group_ids)
    _check_rollouts(ids, "group_ids", num_rollouts)
    return ids.tolist()


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _num_turns(turn_mask: np.ndarray) -> list[int]:
    """n_i for each rollout: the number of valid turns of a prefix mask."""
    return [int(turn_mask[i].sum()) for i in range(turn_mask.shape[0])]


def _runs(response_mask_row: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs of 1s of one response_mask row, as ``(start, stop)`` token ranges."""
    runs = []
    start = None
    for s, generated in enumerate(response_mask_row):
        if generated and start is None:
            start = s
        elif not generated and start is not None:
            runs.append((start, s))
            start = None
    if start is not None:
        runs.append((start, len(response_mask_row)))
    return runs


# --------------------------------------------------------------------------------------------
# Section 1: the probe.


def answer_logprob(token_logprobs: Any, token_mask: Any, *, turn_mask: Any = None) -> np.ndarray:
    """Length-normalized log-probability of the answer at each probe.

    m_{i,j} = (1/L_{i,j}) * sum_{l: mask_{i,j,l}} log pi(a_l | context_{i,j}, a_<l)

    A probe slot with no answer token has no log-prob: NaN at a valid turn, 0.0 (a
    placeholder) at a padded one. The valid turns are ``turn_mask`` when given, else the slots
    of row i up to the last one with an answer token.

    K targets: ``[B, T, K, L]`` gives ``[B, T, K]``, m_{i,j,k} over target k's own tokens. A
    target with no token in any slot of row i is absent: 0.0 everywhere in that row, never NaN.

    Args:
      token_logprobs: ``[B, T, L]`` (or ``[B, T, K, L]``) log-probabilities of the answer tokens.
      token_mask: same shape, nonzero where a token belongs to the answer.
      turn_mask: optional ``[B, T]`` mask of valid turns.

    Returns:
      ``[B, T]`` (or ``[B, T, K]``) float64. A ``-inf`` token log-prob gives ``-inf`` (probability
      0). Values under mask 0 are ignored.
    """
    logprobs = _float64(token_logprobs)
    mask = _bool(token_mask)
    if logprobs.ndim == 4:
        _check_same_shape(mask, "token_mask", logprobs, "token_logprobs")
        per_target = [
            _answer_logprob_of_target(logprobs[:, :, k], mask[:, :, k], turn_mask) for k in range(logprobs.shape[2])
        ]
        return np.stack(per_target, axis=2) if per_target else np.zeros(logprobs.shape[:3])
    _check_ndim(logprobs, "token_logprobs", 3, "[B, T, L]")
    _check_same_shape(mask, "token_mask", logprobs, "token_logprobs")
    return _answer_logprob_of_target(logprobs, mask, turn_mask, absent_when_empty=False)


def _answer_logprob_of_target(
    logprobs: np.ndarray, mask: np.ndarray, turn_mask: Any, *, absent_when_empty: bool = True
) -> np.ndarray:
    """m [B, T] of one target; with ``absent_when_empty`` a row without any token of the target gets 0.0."""
    num_rollouts, num_turns, num_tokens = logprobs.shape
    if turn_mask is not None:
        valid = _bool(turn_mask)
        _check_same_shape(valid, "turn_mask", logprobs[:, :, 0], "token_logprobs[:, :, 0]")
    out = np.zeros((num_rollouts, num_turns), dtype=np.float64)
    for i in range(num_rollouts):
        last_with_answer = max((j for j in range(num_turns) if mask[i, j].any()), default=-1)
        present = last_with_answer >= 0 or not absent_when_empty
        for j in range(num_turns):
            total = 0.0
            count = 0
            for token in range(num_tokens):
                if mask[i, j, token]:
                    total += float(logprobs[i, j, token])
                    count += 1
            is_valid = bool(valid[i, j]) if turn_mask is not None else j <= last_with_answer
            if count > 0:
                out[i, j] = total / count
            elif is_valid and present:
                out[i, j] = math.nan
    return out


# --------------------------------------------------------------------------------------------
# Section 2: turn rewards.


def _belief(logprob: float, kind: str, log_prob_floor: float) -> float:
    if kind == "prob":
        return math.exp(logprob)  # math.exp(-inf) == 0.0
    return max(logprob, log_prob_floor)


def _targets(
    answer_logprob: Any, turn_mask: Any, target_weights: Any, target_mask: Any, *, weights_required: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(m [B, T, K], turn mask [B, T], w [B, K], tau [B, K]); [B, T] input is K = 1 with weight 1."""
    logprob = _float64(answer_logprob)
    mask = _bool(turn_mask)
    if logprob.ndim == 2:
        logprob = logprob[:, :, None]
    _check_ndim(logprob, "answer_logprob", 3, "[B, T] or [B, T, K]")
    _check_same_shape(mask, "turn_mask", logprob[:, :, 0], "answer_logprob[:, :, 0]")
    num_rollouts, _, num_targets = logprob.shape
    if target_weights is None:
        if num_targets != 1 and weights_required:
            raise ValueError(f"target_weights is required for K = {num_targets} targets")
        weights = np.ones((num_rollouts, num_targets))
    else:
        weights = _float64(target_weights)
        if weights.ndim == 1:
            weights = np.tile(weights[None, :], (num_rollouts, 1))
        _check_same_shape(weights, "target_weights", logprob[:, 0, :], "answer_logprob[:, 0, :]")
    present = np.ones((num_rollouts, num_targets), dtype=bool) if target_mask is None else _bool(target_mask)
    _check_same_shape(present, "target_mask", logprob[:, 0, :], "answer_logprob[:, 0, :]")
    return logprob, mask, weights, present


def target_information_gain(
    answer_logprob: Any,
    turn_mask: Any,
    *,
    target_mask: Any = None,
    kind: str = "prob",
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
) -> np.ndarray:
    """The gain of every target on every turn, before weighting.

    b_{i,j,k}   = exp(m_{i,j,k})  (prob)   or   max(m_{i,j,k}, floor)  (log_prob)
    phi_{i,j,k} = b_{i,j,k}                         k = 0, or subgoal_potential = "probe"
                = max(b_{i,0,k}, ..., b_{i,j,k})    k >= 1 and "running_max"
    g_{i,j,k}   = phi_{i,j+1,k} - phi_{i,j,k}        j < n_i - 1, target k present
    g_{i,j,k}   = max(g_{i,j,k}, 0)                 gain_clip = "positive"

    0 elsewhere (final turn, padded turns, absent targets).

    Args:
      answer_logprob: ``[B, T, K]`` probe log-probs (``[B, T]``: K = 1).
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      target_mask: optional ``[B, K]``, nonzero where row i has target k (default: all).

    Returns:
      ``[B, T, K]`` float64.
    """
    logprob, mask, _, present = _targets(answer_logprob, turn_mask, None, target_mask, weights_required=False)
    _check_choice(kind, "kind", _KINDS)
    _check_choice(subgoal_potential, "subgoal_potential", _POTENTIALS)
    _check_choice(gain_clip, "gain_clip", _CLIPS)
    num_rollouts, num_turns, num_targets = logprob.shape
    out = np.zeros(logprob.shape, dtype=np.float64)
    for i, n in enumerate(_num_turns(mask)):
        for k in range(num_targets):
            if not present[i, k]:
                continue
            beliefs = [_belief(float(logprob[i, j, k]), kind, log_prob_floor) for j in range(n)]
            if k >= 1 and subgoal_potential == "running_max":
                potential = list(itertools.accumulate(beliefs, max))
            else:
                potential = beliefs
            for j in range(n - 1):
                gain = potential[j + 1] - potential[j]
                out[i, j, k] = max(gain, 0.0) if gain_clip == "positive" else gain
    return out


def information_gain(
    answer_logprob: Any,
    turn_mask: Any,
    *,
    target_weights: Any = None,
    target_mask: Any = None,
    kind: str = "prob",
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
) -> np.ndarray:
    """Information gain of every non-final turn.

    prob:      IG_{i,j} = exp(m_{i,j+1}) - exp(m_{i,j})                          j < n_i - 1
    log_prob:  IG_{i,j} = max(m_{i,j+1}, floor) - max(m_{i,j}, floor)            j < n_i - 1
    K targets: IG_{i,j} = sum_k tau_{i,k} w_{i,k} g_{i,j,k}      (g: :func:`target_information_gain`)

    ``exp(-inf) = 0``; the floor makes ``-inf`` finite for the log_prob kind. The final turn
    ``j = n_i - 1`` and padded turns get 0. Values of ``answer_logprob`` at padded turns (and
    absent targets) are ignored. ``gain_clip="positive"`` clips each target's gain at 0.

    Args:
      answer_logprob: ``[B, T]`` probe log-probs m (probe j is taken right before turn j), or
        ``[B, T, K]`` with target 0 the answer.
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      target_weights: ``[K]`` or ``[B, K]`` weights w (``[B, T, K]`` input; default 1 for K = 1).
      target_mask: optional ``[B, K]`` presence tau of the targets (default: all present).
      kind: ``"prob"`` (the paper's) or ``"log_prob"``.
      log_prob_floor: lower clamp of m for ``kind="log_prob"``.

    Returns:
      ``[B, T]`` float64.
    """
    logprob, mask, weights, present = _targets(answer_logprob, turn_mask, target_weights, target_mask)
    gains = target_information_gain(
        logprob, mask, target_mask=present, kind=kind, log_prob_floor=log_prob_floor,
        subgoal_potential=subgoal_potential, gain_clip=gain_clip,
    )
    out = np.zeros(mask.shape, dtype=np.float64)
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            out[i, j] = sum(weights[i, k] * gains[i, j, k] for k in range(logprob.shape[2]) if present[i, k])
    return out


def turn_rewards(
    answer_logprob: Any,
    outcome: Any,
    turn_mask: Any,
    *,
    target_weights: Any = None,
    target_mask: Any = None,
    kind: str = "prob",
    ig_weight: float = 1.0,
    outcome_weight: float = 1.0,
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
) -> np.ndarray:
    """Per-turn reward: information gain on non-final turns, outcome on the final turn.

    r_{i,j} = ig_weight * IG_{i,j}      for j < n_i - 1
    r_{i,n_i-1} = outcome_weight * R_i
    r_{i,j} = 0                         for j >= n_i

    Args:
      answer_logprob: ``[B, T]`` (or ``[B, T, K]``) probe log-probs.
      outcome: ``[B]`` outcome rewards R_i.
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      target_weights, target_mask, subgoal_potential, gain_clip: as in :func:`information_gain`.

    Returns:
      ``[B, T]`` float64. A one-turn rollout gets only ``outcome_weight * R_i``.
    """
    gains = information_gain(
        answer_logprob, turn_mask, target_weights=target_weights, target_mask=target_mask, kind=kind,
        log_prob_floor=log_prob_floor, subgoal_potential=subgoal_potential, gain_clip=gain_clip,
    )
    outcome = _float64(outcome)
    mask = _bool(turn_mask)
    _check_rollouts(outcome, "outcome", mask.shape[0])
    out = np.zeros(gains.shape, dtype=np.float64)
    for i, n in enumerate(_num_turns(mask)):
        for j in range(n - 1):
            out[i, j] = ig_weight * gains[i, j]
        if n > 0:
            out[i, n - 1] = outcome_weight * float(outcome[i])
    return out


# --------------------------------------------------------------------------------------------
# Section 3: group normalization.


def _normalize_pool(
    values: list[float],
    weights: list[float],
    *,
    scale: str,
    eps: float,
    ddof: int,
) -> list[float]:
    """z-score one pool: weighted two-pass mean, then weighted variance."""
    count = len(values)
    if all(value == values[0] for value in values):
        return [0.0] * count  # a pool of equal entries gives exactly 0 (no rounding residue)
    total_weight = sum(weights)
    mean = sum(w * v for w, v in zip(weights, values)) / total_weight
    if scale == "none":
        return [v - mean for v in values]
    dof = count - ddof
    squares = sum(w * (v - mean) ** 2 for w, v in zip(weights, values))
    if count == 1 or dof <= 0 or squares == 0.0:  # squares == 0: deviations too small to square
        std = 1.0
    else:
        std = math.sqrt(squares / (total_weight * dof / count))
    return [(v - mean) / (std + eps) for v in values]


def group_normalize(
    rewards: Any,
    turn_mask: Any,
    group_ids: Any = None,
    *,
    group_size: int | None = None,
    mode: str = "joint",
    weighting: str = "turn",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
) -> np.ndarray:
    """z-score the valid turn rewards within pools of the same group.

    A^_{i,j} = (r_{i,j} - mean_pool) / (std_pool + eps)      (scale="std")
    A^_{i,j} = r_{i,j} - mean_pool                            (scale="none")

    With N entries in the pool, weights w (turn: 1; trajectory: 1 / number of entries rollout i
    has in the pool) and W = sum w::

      mean = sum(w r) / W
      var  = sum(w (r - mean)^2) / (W (N - ddof) / N)
      std  = sqrt(var);   std := 1 when N == 1, N - ddof <= 0 or var == 0

    Pools: ``"joint"`` = all valid entries of a group; ``"separate"`` = per group, the final-turn
    entries (j = n_i - 1) and the non-final entries (j < n_i - 1) apart; ``"turn_index"`` = per
    group, the non-final entries at each turn index j in a pool of their own, and the final-turn
    entries. A pool whose entries are all equal gives exactly 0. Padded entries get 0.

    Args:
      rewards: ``[B, T]`` turn rewards.
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      group_ids: ``[B]`` hashable group ids.
      group_size: instead of ``group_ids``: rollout i is in group i // group_size.

    Returns:
      ``[B, T]`` float64.
    """
    values = _float64(rewards)
    mask = _bool(turn_mask)
    _check_ndim(values, "rewards", 2, "[B, T]")
    _check_same_shape(mask, "turn_mask", values, "rewards")
    keys = _group_keys(group_ids, values.shape[0], group_size)
    _check_choice(mode, "mode", _MODES)
    _check_choice(weighting, "weighting", _WEIGHTINGS)
    _check_choice(scale, "scale", _SCALES)

    # pool key -> list of (rollout, turn) entries
    pools: dict[tuple[Hashable, str], list[tuple[int, int]]] = {}
    for i, n in enumerate(_num_turns(mask)):
        for j in range(n):
            if mode == "joint":
                pool = "all"
            elif j == n - 1:
                pool = "final"
            elif mode == "separate":
                pool = "information_gain"
            else:
                pool = f"information_gain at turn {j}"
            pools.setdefault((keys[i], pool), []).append((i, j))

    out = np.zeros(values.shape, dtype=np.float64)
    for entries in pools.values():
        entries_of_rollout: dict[int, int] = {}
        for i, _ in entries:
            entries_of_rollout[i] = entries_of_rollout.get(i, 0) + 1
        if weighting == "turn":
            weights = [1.0 for _ in entries]
        else:
            weights = [1.0 / entries_of_rollout[i] for i, _ in entries]
        pool_values = [float(values[i, j]) for i, j in entries]
        normalized = _normalize_pool(pool_values, weights, scale=scale, eps=eps, ddof=ddof)
        for (i, j), value in zip(entries, normalized):
            out[i, j] = value
    return out


# --------------------------------------------------------------------------------------------
# Section 4: discounted turn advantage.


def discounted_returns(rewards: Any, turn_mask: Any, *, gamma: float = 1.0) -> np.ndarray:
    """Discounted sum of the (normalized) turn rewards from each turn to the final one.

    A_{i,j} = sum_{k=j}^{n_i-1} gamma^(k-j) * A^_{i,k}       (0^0 = 1, so gamma=0 gives A^)

    Padded turns (j >= n_i) get 0.

    Args:
      rewards: ``[B, T]`` per-turn values.
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      gamma: discount in [0, 1] (not checked here).

    Returns:
      ``[B, T]`` float64.
    """
    values = _float64(rewards)
    mask = _bool(turn_mask)
    _check_ndim(values, "rewards", 2, "[B, T]")
    _check_same_shape(mask, "turn_mask", values, "rewards")
    gamma = float(gamma)
    out = np.zeros(values.shape, dtype=np.float64)
    for i, n in enumerate(_num_turns(mask)):
        for j in range(n):
            out[i, j] = sum(gamma ** (k - j) * float(values[i, k]) for k in range(j, n))
    return out


def variance_rescaled_returns(
    rewards: Any, turn_mask: Any, *, gamma: float = 1.0, ig_advantage_scale: float = 1.0
) -> np.ndarray:
    """The IG part of the return divided by the square root of its number of terms (after A2TGPO).

    A_{i,j} = alpha * (sum_{k=j}^{n_i-2} gamma^(k-j) A^_{i,k}) / sqrt(n_i - 1 - j)
              + gamma^(n_i-1-j) * A^_{i,n_i-1}                                   for j < n_i - 1
    A_{i,n_i-1} = A^_{i,n_i-1}

    alpha = ``ig_advantage_scale``. Padded turns get 0.

    Returns:
      ``[B, T]`` float64.
    """
    values = _float64(rewards)
    mask = _bool(turn_mask)
    _check_ndim(values, "rewards", 2, "[B, T]")
    _check_same_shape(mask, "turn_mask", values, "rewards")
    gamma = float(gamma)
    out = np.zeros(values.shape, dtype=np.float64)
    for i, n in enumerate(_num_turns(mask)):
        if n == 0:
            continue
        final = float(values[i, n - 1])
        for j in range(n - 1):
            information = sum(gamma ** (k - j) * float(values[i, k]) for k in range(j, n - 1))
            terms = n - 1 - j
            out[i, j] = ig_advantage_scale * information / math.sqrt(terms) + gamma ** (n - 1 - j) * final
        out[i, n - 1] = final
    return out


def _accumulate(
    normalized: np.ndarray, turn_mask: np.ndarray, *, gamma: float, accumulation: str, ig_advantage_scale: float
) -> np.ndarray:
    """Section 4 with its two variants: "discounted" scales the IG entries by alpha first."""
    _check_choice(accumulation, "accumulation", _ACCUMULATIONS)
    if accumulation == "sqrt_n":
        return variance_rescaled_returns(normalized, turn_mask, gamma=gamma, ig_advantage_scale=ig_advantage_scale)
    scaled = normalized.copy()
    for i, n in enumerate(_num_turns(turn_mask)):
        for j in range(n - 1):
            scaled[i, j] = ig_advantage_scale * normalized[i, j]
    return discounted_returns(scaled, turn_mask, gamma=gamma)


def igpo_advantages(
    answer_logprob: Any,
    outcome: Any,
    turn_mask: Any,
    group_ids: Any = None,
    *,
    group_size: int | None = None,
    target_weights: Any = None,
    target_mask: Any = None,
    gamma: float = 1.0,
    kind: str = "prob",
    mode: str = "joint",
    weighting: str = "turn",
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    ig_weight: float = 1.0,
    outcome_weight: float = 1.0,
    log_prob_floor: float = -20.0,
    subgoal_potential: str = "running_max",
    gain_clip: str = "none",
    accumulation: str = "discounted",
    ig_advantage_scale: float = 1.0,
) -> IGPOAdvantages:
    """IGPO turn advantages: information_gain -> turn_rewards -> group_normalize -> accumulation.

    The accumulation is :func:`discounted_returns` of the normalized rewards with the IG entries
    scaled by ``ig_advantage_scale`` ("discounted"), or :func:`variance_rescaled_returns` ("sqrt_n").

    Args:
      answer_logprob: ``[B, T]`` (or ``[B, T, K]``) probe log-probs.
      outcome: ``[B]`` outcome rewards.
      turn_mask: ``[B, T]`` prefix mask of valid turns.
      group_ids: ``[B]`` hashable group ids (or ``group_size``, see :func:`group_normalize`).

    Returns:
      :class:`IGPOAdvantages` ``(advantages, normalized_rewards, rewards, information_gain)``,
      each ``[B, T]`` float64.
    """
    targets = dict(target_weights=target_weights, target_mask=target_mask, kind=kind, log_prob_floor=log_prob_floor,
                   subgoal_potential=subgoal_potential, gain_clip=gain_clip)
    gains = information_gain(answer_logprob, turn_mask, **targets)
    rewards = turn_rewards(answer_logprob, outcome, turn_mask, ig_weight=ig_weight, outcome_weight=outcome_weight,
                           **targets)
    normalized = group_normalize(
        rewards, turn_mask, group_ids, group_size=group_size, mode=mode, weighting=weighting, scale=scale,
        eps=eps, ddof=ddof,
    )
    advantages = _accumulate(normalized, _bool(turn_mask), gamma=gamma, accumulation=accumulation,
                             ig_advantage_scale=ig_advantage_scale)
    return IGPOAdvantages(advantages, normalized, rewards, gains)


def grpo_advantages(
    outcome: Any,
    group_ids: Any = None,
    *,
    group_size: int | None = None,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
) -> np.ndarray:
    """Outcome-only GRPO baseline: one z-scored scalar per rollout.

    A_i = (R_i - mean_g) / (std_g + eps)     (scale="std");    A_i = R_i - mean_g  (scale="none")

    std over the group with ``ddof``; std := 1 for a single-rollout group (or N - ddof <= 0).
    A group whose outcomes are all equal gets exactly 0 (advantage collapse).

    Args:
      outcome: ``[B]`` outcome rewards.
      group_ids: ``[B]`` hashable group ids (or ``group_size``, see :func:`group_normalize`).

    Returns:
      ``[B]`` float64.
    """
    values = _float64(outcome)
    _check_ndim(values, "outcome", 1, "[B]")
    keys = _group_keys(group_ids, values.shape[0], group_size)
    _check_choice(scale, "scale", _SCALES)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = np.zeros(values.shape, dtype=np.float64)
    for members in groups.values():
        normalized = _normalize_pool(
            [float(values[i]) for i in members],
            [1.0 for _ in members],
            scale=scale,
            eps=eps,
            ddof=ddof,
        )
        for i, value in zip(members, normalized):
            out[i] = value
    return out


# --------------------------------------------------------------------------------------------
# Section 5: from turns to tokens (verl layout).


def turn_index_from_response_mask(response_mask: Any) -> np.ndarray:
    """Token -> turn index: each maximal run of 1s is one turn, numbered from 0; -1 elsewhere.

    Example: ``[1, 1, 0, 0, 1, 0, 1, 1, 0, 0] -> [0, 0, -1, -1, 1, -1, 2, 2, -1, -1]``.

    Args:
      response_mask: ``[B, S]``, nonzero on generated tokens.

    Returns:
      ``[B, S]`` int64.
    """
    mask = _bool(response_mask)
    _check_ndim(mask, "response_mask", 2, "[B, S]")
    out = np.full(mask.shape, -1, dtype=np.int64)
    for i in range(mask.shape[0]):
        turn = -1
        previous = False
        for s in range(mask.shape[1]):
            generated = bool(mask[i, s])
            if generated and not previous:
                turn += 1
            if generated:
                out[i, s] = turn
            previous = generated
    return out


def broadcast_to_tokens(
    turn_values: Any, token_turn_index: Any, *, turn_mask: Any = None
) -> np.ndarray:
    """Give every token the value of its turn.

    out_{i,s} = turn_values[i, idx_{i,s}]  where idx_{i,s} >= 0, else 0.

    With ``turn_mask``, a token whose turn is masked out also gets 0.

    Args:
      turn_values: ``[B, T]`` per-turn values.
      token_turn_index: ``[B, S]`` turn of each token, -1 for none.
      turn_mask: optional ``[B, T]`` mask of valid turns.

    Returns:
      ``[B, S]`` float64.
    """
    values = _float64(turn_values)
    index = _int64(token_turn_index)
    _check_ndim(values, "turn_values", 2, "[B, T]")
    _check_ndim(index, "token_turn_index", 2, "[B, S]")
    if index.shape[0] != values.shape[0]:
        raise ValueError(
            f"token_turn_index has shape {tuple(index.shape)} but turn_values has shape "
            f"{tuple(values.shape)}; B must match"
        )
    mask = None
    if turn_mask is not None:
        mask = _bool(turn_mask)
        _check_same_shape(mask, "turn_mask", values, "turn_values")
    num_turns = values.shape[1]
    out = np.zeros(index.shape, dtype=np.float64)
    for i in range(index.shape[0]):
        for s in range(index.shape[1]):
            turn = int(index[i, s])
            if turn < 0:
                continue
            if turn >= num_turns:
                raise ValueError(
                    f"token_turn_index[{i}, {s}] = {turn} points past turn_values with T = {num_turns}"
                )
            if mask is None or mask[i, turn]:
                out[i, s] = values[i, turn]
    return out


def place_turn_rewards(
    turn_rewards: Any, response_mask: Any, *, turn_mask: Any = None
) -> np.ndarray:
    """Put turn j's reward at the last token of the j-th run of 1s (verl's layout).

    out_{i, last token of run j} = turn_rewards[i, j];   0 on every other token.

    The inverse of reading turn rewards in :func:`advantages_from_token_rewards`. With
    ``turn_mask``, masked-out turns are not placed.

    Args:
      turn_rewards: ``[B, T]`` per-turn rewards.
      response_mask: ``[B, S]``, nonzero on generated tokens.
      turn_mask: optional ``[B, T]`` mask of valid turns.

    Returns:
      ``[B, S]`` float64.
    """
    rewards = _float64(turn_rewards)
    mask = _bool(response_mask)
    _check_ndim(rewards, "turn_rewards", 2, "[B, T]")
    _check_ndim(mask, "response_mask", 2, "[B, S]")
    if mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask has shape {tuple(mask.shape)} but turn_rewards has shape "
            f"{tuple(rewards.shape)}; B must match"
        )
    valid = None
    if turn_mask is not None:
        valid = _bool(turn_mask)
        _check_same_shape(valid, "turn_mask", rewards, "turn_rewards")
    num_turns = rewards.shape[1]
    out = np.zeros(mask.shape, dtype=np.float64)
    for i in range(mask.shape[0]):
        runs = _runs(mask[i])
        if len(runs) > num_turns:
            raise ValueError(
                f"response_mask row {i} has {len(runs)} turns but turn_rewards has T = {num_turns}"
            )
        for j, (_, stop) in enumerate(runs):
            if valid is None or valid[i, j]:
                out[i, stop - 1] = rewards[i, j]
    return out


def advantages_from_token_rewards(
    token_level_rewards: Any,
    response_mask: Any,
    group_ids: Any = None,
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
) -> np.ndarray:
    """IGPO token advantages from verl/SkyRL token-level rewards.

    r_{i,j} = token_level_rewards[i, last token of run j]
    r_{i,n_i-1} += sum of token_level_rewards[i, s] for the tokens s after the last run
    A^ = group_normalize(r);  A = discounted_returns(A^, gamma) (or the accumulation variant of
    :func:`igpo_advantages`);  out_{i,s} = A_{i, turn of s}

    Turns are the maximal runs of 1s of ``response_mask`` (never found by reward != 0). Rewards
    on other tokens (not the last of a run, not after the last run) are ignored. Observation,
    padding and empty-row tokens get 0.

    Args:
      token_level_rewards: ``[B, S]`` rewards per response token.
      response_mask: ``[B, S]``, nonzero on generated tokens.
      group_ids: ``[B]`` hashable group ids (or ``group_size``, see :func:`group_normalize`).
      max_turns: T of the intermediate turn arrays; default: the most runs in a row.

    Returns:
      ``[B, S]`` float64.
    """
    rewards = _float64(token_level_rewards)
    mask = _bool(response_mask)
    _check_ndim(rewards, "token_level_rewards", 2, "[B, S]")
    _check_same_shape(mask, "response_mask", rewards, "token_level_rewards")
    num_rollouts, num_tokens = rewards.shape
    keys = _group_keys(group_ids, num_rollouts, group_size)
    runs = [_runs(mask[i]) for i in range(num_rollouts)]
    most_runs = max((len(row) for row in runs), default=0)
    num_turns = most_runs if max_turns is None else int(max_turns)
    if most_runs > num_turns:
        raise ValueError(f"response_mask has a row with {most_runs} turns > max_turns = {num_turns}")

    turn_reward = np.zeros((num_rollouts, num_turns), dtype=np.float64)
    turn_mask = np.zeros((num_rollouts, num_turns), dtype=bool)
    for i in range(num_rollouts):
        for j, (_, stop) in enumerate(runs[i]):
            turn_reward[i, j] = rewards[i, stop - 1]
            turn_mask[i, j] = True
        if runs[i]:
            last_stop = runs[i][-1][1]
            for s in range(last_stop, num_tokens):
                turn_reward[i, len(runs[i]) - 1] += rewards[i, s]

    normalized = group_normalize(
        turn_reward, turn_mask, keys, mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof
    )
    advantages = _accumulate(normalized, turn_mask, gamma=gamma, accumulation=accumulation,
                             ig_advantage_scale=ig_advantage_scale)
    return broadcast_to_tokens(advantages, turn_index_from_response_mask(mask))


def zero_variance_group_fraction(values: Any, group_ids: Any = None, *, group_size: int | None = None) -> float:
    """Fraction of groups whose values are all equal (the GRPO advantage-collapse rate).

    A single-rollout group counts as zero-variance. An empty batch (no groups) gives 0.0.

    Args:
      values: ``[B]`` one value per rollout (e.g. the outcome rewards).
      group_ids: ``[B]`` hashable group ids (or ``group_size``, see :func:`group_normalize`).

    Returns:
      A Python float in [0, 1].
    """
    values = _float64(values)
    _check_ndim(values, "values", 1, "[B]")
    keys = _group_keys(group_ids, values.shape[0], group_size)
    groups: dict[Hashable, list[float]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(float(values[i]))
    if not groups:
        return 0.0
    collapsed = sum(1 for members in groups.values() if all(v == members[0] for v in members))
    return collapsed / len(groups)


# --------------------------------------------------------------------------------------------
# Turn bookkeeping (igpo_rewards.turns).


class PaddedTurns(NamedTuple):
    """:func:`pad_turns`' result: float64 ``[B, T]`` values and the bool ``[B, T]`` turn mask."""

    values: np.ndarray
    turn_mask: np.ndarray


def pad_turns(ragged_turn_values: Any, *, max_turns: int | None = None) -> PaddedTurns:
    """Row i's n_i values in columns 0 .. n_i - 1, zeros after; T = ``max_turns`` or the longest row.

    Args:
      ragged_turn_values: B rows of per-turn values (lists, or 1-D arrays/tensors); a [B, T]
        array is B full rows.

    Raises:
      ValueError: a row longer than ``max_turns``.
    """
    rows = [[float(value) for value in _float64(row).reshape(-1)] for row in ragged_turn_values]
    num_turns = max((len(row) for row in rows), default=0) if max_turns is None else int(max_turns)
    values = np.zeros((len(rows), num_turns))
    turn_mask = np.zeros((len(rows), num_turns), dtype=bool)
    for i, row in enumerate(rows):
        if len(row) > num_turns:
            raise ValueError(f"row {i} has {len(row)} turns > max_turns = {num_turns}")
        for j, value in enumerate(row):
            values[i, j] = value
            turn_mask[i, j] = True
    return PaddedTurns(values, turn_mask)


def num_turns_from_response_mask(response_mask: Any) -> np.ndarray:
    """n_b = the number of maximal runs of 1s in row b of the response mask: int64 ``[B]``."""
    mask = _bool(response_mask)
    _check_ndim(mask, "response_mask", 2, "[B, S]")
    return np.array([len(_runs(mask[b])) for b in range(mask.shape[0])], dtype=np.int64)


def final_turn_mask(turn_mask: Any) -> np.ndarray:
    """True at turn n_i - 1 of each rollout (nothing for n_i = 0): bool ``[B, T]``."""
    mask = _bool(turn_mask)
    _check_ndim(mask, "turn_mask", 2, "[B, T]")
    final = np.zeros(mask.shape, dtype=bool)
    for i, count in enumerate(_num_turns(mask)):
        if count > 0:
            final[i, count - 1] = True
    return final


__all__ += ["PaddedTurns", "pad_turns", "num_turns_from_response_mask", "final_turn_mask"]
