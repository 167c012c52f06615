"""The whole IGPO pipeline: probes -> turn rewards -> group normalization -> discounted advantages."""

from __future__ import annotations

from typing import Any, NamedTuple

from igpo_rewards import _checks, _groups, _turns, targets
from igpo_rewards.backends import get_backend
from igpo_rewards.normalization import normalization_options, normalize
from igpo_rewards.returns import accumulate, accumulation_options
from igpo_rewards.rewards import outcome_array, reward_options, rewards_from_probes

Array = Any


class IGPOAdvantages(NamedTuple):
    """Every intermediate of :func:`igpo_advantages`, each [B, T] (0 on padded turns)."""

    advantages: Array
    """A_{i,j}: discounted sum of normalized rewards (spec section 4, or the ``sqrt_n`` accumulation);
    goes on turn j's tokens."""
    normalized_rewards: Array
    """\\hat A_{i,j}: turn rewards z-scored within their group pool (section 3)."""
    rewards: Array
    """r_{i,j}: w_ig * IG on non-final turns, w_out * R_i on the final turn (section 2)."""
    information_gain: Array
    """IG_{i,j} before w_ig (with K targets: summed over the targets with their weights); 0 on the
    final turn (section 2)."""


def igpo_advantages(
    answer_logprob: Array,
    outcome: Array,
    turn_mask: Array,
    group_ids: Array | None = None,
    *,
    group_size: int | None = None,
    target_weights: Array | None = None,
    target_mask: Array | None = None,
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
    max_turns: int | None = None,
    validate: bool = True,
) -> IGPOAdvantages:
    r"""IGPO turn advantages from probe log-probs and outcome rewards (spec sections 2-4).

    .. math::
        r = \text{turn\_rewards}(m, R), \quad \hat A = \text{group\_normalize}(r), \quad
        A_{i,j} = \sum_{k=j}^{n_i-1} \gamma^{k-j} \hat A_{i,k}

    (``accumulation="sqrt_n"``: :func:`variance_rescaled_returns` instead of the last step).

    Args:
      answer_logprob: [B, T] length-normalized log-prob of the answer at the probe before
        each turn (:func:`answer_logprob`); <= 0 at valid turns, -inf allowed (a positive
        value is refused: probabilities passed instead of log-probabilities). Or [B, T, K]: the
        probes of K targets, target 0 the answer (:func:`information_gain`).
      outcome: [B] outcome reward R_i of each rollout (answer F1 or the format penalty).
      turn_mask: [B, T] prefix mask of valid turns; rows of zeros are batch padding.
      group_ids: [B] question of each rollout: a list or NumPy array of any sortable ids
        (verl's uid strings included) on every backend, or an integer array of the inputs'
        library (see :func:`group_normalize`).
      group_size: G, instead of ``group_ids``, when the rows are G contiguous rollouts per
        question (verl's and TRL's layout); B must be a multiple of G.
      target_weights, target_mask: [K] or [B, K] weights and [B, K] presence of the targets
        ([B, T, K] input only; see :func:`information_gain`).
      gamma: turn discount in [0, 1] (1.0 in every published config).
      kind: "prob" or "log_prob" information gain.  log_prob_floor: see :func:`information_gain`.
      mode, weighting, scale, eps, ddof: see :func:`group_normalize` (defaults are the paper's).
      ig_weight, outcome_weight: w_ig and w_out.
      subgoal_potential, gain_clip: see :func:`information_gain` (defaults: the paper's IG).
      accumulation: "discounted" (the paper's, :func:`discounted_returns`) or "sqrt_n"
        (:func:`variance_rescaled_returns`).
      ig_advantage_scale: alpha, the factor of the normalized IG entries in the accumulation
        (1.0: the paper's; A2TGPO's recipe uses 0.3 with "sqrt_n").
      max_turns: the most turns a rollout may have (searches plus the answer), the same
        meaning as everywhere (:class:`IGPOSettings`, :func:`advantages_from_token_rewards`,
        :func:`pad_turns`): a rollout with more valid turns is an error. A value check, free
        (no host sync) when the T slots of ``turn_mask`` already fit. None: no cap.
      validate: value checks (a host sync on accelerators; skipped under jit).

    Returns:
      :class:`IGPOAdvantages` (advantages, normalized_rewards, rewards, information_gain), each
      [B, T] of the promoted floating dtype. With torch inputs that require grad the outputs
      carry autograd history; detach them (or call under ``torch.no_grad()``) before using
      them as PPO advantages.

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
    options = normalization_options(mode=mode, weighting=weighting, scale=scale, eps=eps, ddof=ddof)
    rewards_options = reward_options(
        kind=kind, ig_weight=ig_weight, outcome_weight=outcome_weight, log_prob_floor=log_prob_floor,
        subgoal_potential=subgoal_potential, gain_clip=gain_clip,
    )
    returns_options = accumulation_options(gamma=gamma, accumulation=accumulation, ig_advantage_scale=ig_advantage_scale)
    max_turns = _checks.check_optional_positive_count("max_turns", max_turns)
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(
        answer_logprob=answer_logprob, outcome=outcome, turn_mask=turn_mask, **_groups.dispatch(group_ids),
        **targets.dispatch(target_weights, target_mask),
    )
    probes = targets.check_probes(
        backend, answer_logprob, turn_mask, target_weights=target_weights, target_mask=target_mask,
        validate=validate, num_rollouts=_turns.leading_length(outcome), rollouts_from="outcome",
    )
    turn_mask = probes.turn_mask
    _turns.check_max_turns(backend, turn_mask, max_turns, validate=validate)
    outcome = outcome_array(backend, outcome, probes.logprob, validate=validate)
    groups = _groups.resolve(
        backend, group_ids, turn_mask.shape[0], group_size=group_size, like=probes.logprob, validate=validate
    )
    gain, rewards = rewards_from_probes(backend, probes, outcome, **rewards_options)
    normalized = normalize(backend, rewards, turn_mask, groups, **options)
    advantages = accumulate(backend, normalized, turn_mask, **returns_options)
    return IGPOAdvantages(advantages, normalized, rewards, gain)
