"""igpo_rewards: IGPO turn rewards and advantages for NumPy, Torch and JAX.

Information Gain-based Policy Optimization (Wang et al., arXiv 2510.14967) rewards each turn of
a multi-turn agent by how much it raised the policy's probability of the ground-truth answer,
the final turn by its outcome, then group-normalizes and discounts those rewards into turn
advantages. Every function is pure and takes NumPy arrays, torch Tensors or JAX arrays; the
result keeps the input's library, device and floating dtype.

Shapes: B rollouts, G rollouts per group, T turns (padded), L answer tokens, S response tokens,
K probe targets (the answer and sub-goals, :mod:`igpo_rewards.targets`).
See docs/algorithm.md for each equation next to the function that computes it.
"""

from igpo_rewards._checkout import install_if_checkout as _install_if_checkout

# From a source checkout, igpo_rewards.backends and igpo_rewards.reference_trainer are the
# folders beside this one (see _checkout.py); an installed wheel holds them inside it.
_install_if_checkout(__path__[0])
del _install_if_checkout

from igpo_rewards._warnings import SingleRolloutGroupWarning
from igpo_rewards.advantages import IGPOAdvantages, igpo_advantages
from igpo_rewards.normalization import group_normalize, grpo_advantages, zero_variance_group_fraction
from igpo_rewards.returns import discounted_returns, variance_rescaled_returns
from igpo_rewards.settings import IGPOSettings
from igpo_rewards.rewards import answer_logprob, information_gain, turn_rewards
from igpo_rewards.targets import target_information_gain
from igpo_rewards.scoring import (
    answer_f1,
    exact_match,
    extract_answer,
    is_well_formed,
    normalize_answer,
    outcome_reward,
    split_ground_truth,
)
from igpo_rewards.tokens import (
    advantages_from_token_rewards,
    broadcast_to_tokens,
    place_turn_rewards,
    turn_index_from_response_mask,
)
from igpo_rewards.turns import PaddedTurns, final_turn_mask, num_turns_from_response_mask, pad_turns

__version__ = "0.1.0"

__all__ = [
    # turn rewards and advantages (spec sections 1-4)
    "IGPOAdvantages",
    "IGPOSettings",
    "answer_logprob",
    "discounted_returns",
    "group_normalize",
    "grpo_advantages",
    "igpo_advantages",
    "information_gain",
    "turn_rewards",
    "zero_variance_group_fraction",
    # several probe targets and the normalization variants (docs/algorithm.md, "Variants")
    "target_information_gain",
    "variance_rescaled_returns",
    # turn bookkeeping: ragged lists to [B, T], turns of a response mask, the final turn
    "PaddedTurns",
    "final_turn_mask",
    "num_turns_from_response_mask",
    "pad_turns",
    # verl/SkyRL token layout (section 5)
    "advantages_from_token_rewards",
    "broadcast_to_tokens",
    "place_turn_rewards",
    "turn_index_from_response_mask",
    # answer scoring (pure Python)
    "answer_f1",
    "exact_match",
    "extract_answer",
    "is_well_formed",
    "normalize_answer",
    "outcome_reward",
    "split_ground_truth",
    # warnings
    "SingleRolloutGroupWarning",
]
