"""The Search-R1 protocol on TRL's tool loop: ``use_search_r1_tool_protocol(model, tokenizer)``.

TRL's ``GRPOTrainer(tools=...)`` renders prompts and tool results with the tokenizer's chat
template, reads tool calls with its ``response_template`` and ends a completion at the ids of
``GRPOTrainer.eos_token_ids`` (the tokenizer's eos plus ``model.generation_config.eos_token_id``,
TRL >= 1.14.2). This sets the three pieces of :mod:`igpo_rewards.agent.tool_calls` so that TRL's
token sequences are the Search-R1 layout of the project's rollout function, token for token: a
model warm-started on that layout (``igpo-train demo``) runs on TRL's loop unchanged.
"""

from __future__ import annotations

from typing import Any

from igpo_rewards.agent.tool_calls import SEARCH_R1_CHAT_TEMPLATE, SEARCH_R1_RESPONSE_TEMPLATE, STOP_TAGS

__all__ = ["use_search_r1_tool_protocol"]

# Conversations whose rendering must not change when the chat template is replaced.
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Question: who founded it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question: who founded it?"}],
)


def _stop_ids(tokenizer: Any) -> list[int]:
    """The id of each stop tag; each must be one token (TRL stops at token ids, not strings)."""
    ids = []
    for tag in STOP_TAGS:
        tokens = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(
                f"the Search-R1 tool protocol stops a turn at {tag!r} as one token id, but the tokenizer splits it into "
                f"{len(tokens)} tokens {tokens}; add the tags as tokens (tokenizer.add_tokens) or use the model's own "
                f"tool-call format"
            )
        ids.append(int(tokens[0]))
    return ids


def _eos_list(value: Any) -> list[int]:
    return [int(item) for item in (value if isinstance(value, (list, tuple)) else [value]) if item is not None]


def use_search_r1_tool_protocol(model: Any, tokenizer: Any) -> None:
    """Makes TRL's tool loop write the Search-R1 layout with ``model`` and ``tokenizer`` (in place).

    Sets ``tokenizer.chat_template`` to ``SEARCH_R1_CHAT_TEMPLATE`` and ``tokenizer.response_template``
    to ``SEARCH_R1_RESPONSE_TEMPLATE``, and appends the ids of ``</search>`` and ``</answer>`` to
    ``model.generation_config.eos_token_id`` (after the tokenizer's eos). The template replaces
    only one that renders prompts exactly as it does (the project's ChatML, e.g. a warm start's
    saved tokenizer), so a model's prompts do not change under it. For another chat model, use
    its own tool-call format instead.

    Both settings are saved with the model and tokenizer (``generation_config.json``,
    ``tokenizer_config.json``): a saved tokenizer with the response template makes TRL parse
    every completion into tool calls, a ``rollout_func``'s too (score them with
    ``make_outcome_reward_func(..., tokenizer=tokenizer)``).

    Raises:
        ValueError: a stop tag that is not one token, or a chat template that renders prompts
            differently (naming both renderings).
    """
    stop_ids = _stop_ids(tokenizer)
    if tokenizer.chat_template != SEARCH_R1_CHAT_TEMPLATE:
        for messages in _PROBE_CONVERSATIONS:
            current = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            wanted = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=SEARCH_R1_CHAT_TEMPLATE
            )
            if current != wanted:
                raise ValueError(
                    f"the tokenizer's chat template renders prompts as {current!r}, the Search-R1 tool template as "
                    f"{wanted!r}: it replaces only the project's ChatML template (igpo_rewards.testing.tiny); for another "
                    f"chat model use its own tool-call format"
                )
    tokenizer.chat_template = SEARCH_R1_CHAT_TEMPLATE
    tokenizer.response_template = SEARCH_R1_RESPONSE_TEMPLATE
    eos = _eos_list(tokenizer.eos_token_id) + _eos_list(model.generation_config.eos_token_id)
    model.generation_config.eos_token_id = list(dict.fromkeys(eos + stop_ids))
