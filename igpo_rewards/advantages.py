"""The whole IGPO pipeline: probes -> turn rewards -> group normalization -> discounted advantages."""

from __future__ import annotations

from typing import Any, NamedTuple

from igpo_rewards.normalization import group_normalize
from igpo_rewards.returns import discounted_returns
from igpo_rewards.rewards import information_gain, rewards_from_gain

Array = Any


class IGPOAdvantages(NamedTuple):
    """Every intermediate of :func:`igpo_advantages`, each [B, T] (0 on padded turns)."""

    advantages: Array
    """A_{i,j}: discounted sum of normalized rewards (spec section 4); goes on turn j's tokens."""
    normalized_rewards: Array
    """\\hat A_{i,j}: turn rewards z-scored within their group pool (section 3)."""
    rewards: Array
    """r_{i,j}: w_ig * IG on non-final turns, w_out * R_i on the final turn (section 2)."""
    information_gain: Array
    """IG_{i,j} before weighting; 0 on the final turn (section 2)."""


def igpo_advantages(
    answer_logprob: Array,
    outcome: Array,
    turn_mask: Array,
    group_ids: Array,
    *,
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
    validate: bool = True,
) -> IGPOAdvantages:
    r"""IGPO turn advantages from probe log-probs and outcome rewards (spec sections 2-4).

    .. math::
        r = \text{turn\_rewards}(m, R), \quad \hat A = \text{group\_normalize}(r), \quad
        A_{i,j} = \sum_{k=j}^{n_i-1} \gamma^{k-j} \hat A_{i,k}

    Args:
      answer_logprob: [B, T] length-normalized log-prob of the answer at the probe before
        each turn (:func:`answer_logprob`); -inf allowed.
      outcome: [B] outcome reward R_i of each rollout (answer F1 or the format penalty).
      turn_mask: [B, T] prefix mask of valid turns; rows of zeros are batch padding.
      group_ids: [B] question of each rollout (ints, or any sortable ids on NumPy).
      gamma: turn discount in [0, 1] (1.0 in every published config).
      kind: "prob" or "log_prob" information gain.  log_prob_floor: see :func:`information_gain`.
      mode, weighting, scale, eps, ddof: see :func:`group_normalize` (defaults are the paper's).
      ig_weight, outcome_weight: w_ig and w_out.
      validate: value checks (a host sync on accelerators; skipped under jit).

    Returns:
      :class:`IGPOAdvantages` (advantages, normalized_rewards, rewards, information_gain), each
      [B, T] of the promoted floating dtype.

    Example:
      The paper's case: a rollout whose final answer is wrong (F1 = 0) still gets a positive
      advantage on the retrieval turn that raised the belief in the answer.

      >>> import numpy as np
      >>> m = np.log([[0.05, 0.9], [0.05, 0.05]])     # rollout 0's search found the answer
      >>> result = igpo_advantages(m, [0.0, 0.0], [[1, 1], [1, 1]], [0, 0])
      >>> np.round(result.information_gain, 4)
      array([[0.85, 0.  ],
             [0.  , 0.  ]])
      >>> bool(result.advantages[0, 0] > 0)
      True
    """
    gain = information_gain(
        answer_logprob, turn_mask, kind=kind, log_prob_floor=log_prob_floor, validate=validate
    )
    rewards = rewards_from_gain(
        gain, outcome, turn_mask, ig_weight=ig_weight, outcome_weight=outcome_weight, validate=validate
    )
    normalized = group_normalize(
        rewards, turn_mask, group_ids, mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof,
        validate=False,
    )
    advantages = discounted_returns(normalized, turn_mask, gamma=gamma, validate=False)
    return IGPOAdvantages(advantages, normalized, rewards, gain)
