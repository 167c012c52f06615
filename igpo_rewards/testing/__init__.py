"""Testing helpers for IGPO implementations: a float64 loop reference and Hypothesis strategies.

* :mod:`igpo_rewards.testing.reference`: the plain-loop oracle of every formula (NumPy only).
* :mod:`igpo_rewards.testing.strategies`: Hypothesis strategies drawing valid batches and
  ``to_backend`` to convert them to NumPy, Torch or JAX. Needs ``hypothesis``
  (``pip install hypothesis``); it is imported only when one of its names is first used, so
  ``import igpo_rewards.testing`` works without it.

Example:
  >>> from igpo_rewards.testing import reference
  >>> reference.turn_index_from_response_mask([[1, 1, 0, 1, 0]]).tolist()
  [[0, 0, -1, 1, -1]]
"""

from __future__ import annotations

import importlib
from typing import Any

from . import reference
from .reference import (
    IGPOAdvantages,
    advantages_from_token_rewards,
    answer_logprob,
    broadcast_to_tokens,
    discounted_returns,
    group_normalize,
    grpo_advantages,
    igpo_advantages,
    information_gain,
    place_turn_rewards,
    turn_index_from_response_mask,
    turn_rewards,
    zero_variance_group_fraction,
)

_STRATEGY_NAMES = (
    "TokenBatch",
    "TurnBatch",
    "group_ids",
    "to_backend",
    "token_batches",
    "turn_batches",
    "turn_masks",
)

__all__ = [
    "reference",
    "strategies",
    "IGPOAdvantages",
    "advantages_from_token_rewards",
    "answer_logprob",
    "broadcast_to_tokens",
    "discounted_returns",
    "group_normalize",
    "grpo_advantages",
    "igpo_advantages",
    "information_gain",
    "place_turn_rewards",
    "turn_index_from_response_mask",
    "turn_rewards",
    "zero_variance_group_fraction",
    *_STRATEGY_NAMES,
]


def __getattr__(name: str) -> Any:
    """Import the strategies (and hypothesis) only when one of them is asked for."""
    if name == "strategies":
        return importlib.import_module(f"{__name__}.strategies")
    if name in _STRATEGY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.strategies"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
