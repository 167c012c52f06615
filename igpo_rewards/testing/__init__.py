"""Testing helpers for IGPO implementations: a float64 loop reference, Hypothesis strategies and
tiny models.

* :mod:`igpo_rewards.testing.reference`: the plain-loop oracle of every formula (NumPy only).
* :mod:`igpo_rewards.testing.strategies`: Hypothesis strategies drawing valid batches and
  ``to_backend`` to convert them to NumPy, Torch or JAX. Needs ``hypothesis``
  (``pip install hypothesis``); it is imported only when one of its names is first used, so
  ``import igpo_rewards.testing`` works without it.
* :mod:`igpo_rewards.testing.tiny`: a byte-level BPE chat tokenizer trained on your texts and a
  tiny Llama-style causal LM built from a config, for tests and doctests of the agent and the
  integrations. Needs the ``hf`` extra; imported only when first used (``testing.tiny``).

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
    target_information_gain,
    turn_index_from_response_mask,
    turn_rewards,
    variance_rescaled_returns,
    zero_variance_group_fraction,
)

_STRATEGY_NAMES = (
    "TargetBatch",
    "TokenBatch",
    "TurnBatch",
    "group_ids",
    "target_batches",
    "to_backend",
    "token_batches",
    "turn_batches",
    "turn_masks",
)

__all__ = [
    "reference",
    "strategies",
    "tiny",
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
    "target_information_gain",
    "turn_index_from_response_mask",
    "turn_rewards",
    "variance_rescaled_returns",
    "zero_variance_group_fraction",
    *_STRATEGY_NAMES,
]


def __getattr__(name: str) -> Any:
    """Import the strategies (and hypothesis) or the tiny models (and torch) only when asked for."""
    if name in ("strategies", "tiny"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _STRATEGY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.strategies"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
