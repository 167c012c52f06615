"""The Search-R1 agent protocol: tags, the instruction, the probe text, and the parser of one turn.

The protocol is the one of Search-R1 and IGPO: the policy may think inside
``<think>..</think>``, asks the search engine with ``<search>query</search>`` (the caller
answers with ``<information>..</information>``, observation tokens that are excluded from the
loss), and ends with ``<answer>..</answer>``. Generation of a turn stops at the first
``</search>`` or ``</answer>`` (``STOP_STRINGS``); ``parse_action`` reads what the turn asked
for and calls anything else invalid, which ends the rollout (the outcome is then the format
penalty of ``igpo_rewards.outcome_reward``, since the response has no answer).

IGPO's probe before each turn teacher-forces ``PROBE_TEMPLATE`` (the paper's "answer now" text
``PROBE_TEXT`` followed by ``<answer> {answer} </answer>``) after the context so far
(``igpo_rewards.agent.probes``).

Pure Python: importing this module needs neither torch nor transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "ANSWER_PLACEHOLDER",
    "INFORMATION_CLOSE",
    "INFORMATION_OPEN",
    "INSTRUCTION",
    "PROBE_TEMPLATE",
    "PROBE_TEXT",
    "SEARCH_CLOSE",
    "SEARCH_OPEN",
    "STOP_STRINGS",
    "TAGS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "Action",
    "build_prompt",
    "observation_block",
    "parse_action",
    "stop_end",
    "user_message",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFORMATION_OPEN, INFORMATION_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
"""Every protocol tag; tokenizers built for the agent add them as single tokens."""

STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)
"""Generation of a turn stops right after the first of these."""

INSTRUCTION = (
    "Answer the question. You may think inside <think> </think>. "
    "To look up a fact, write <search> query </search> and the results appear inside "
    "<information> </information>. Search as often as needed, then give only the answer "
    "inside <answer> </answer>. Question: {question}\n"
)
"""The user message of every rollout (Search-R1/IGPO style); ``{question}`` is filled in."""

PROBE_TEXT = "Now there's enough information to answer"
"""The paper's "answer now" text that precedes the ground-truth answer in a probe."""

ANSWER_PLACEHOLDER = "{answer}"
"""Where ``PROBE_TEMPLATE`` (or a custom template) takes the ground-truth answer."""

PROBE_TEMPLATE = PROBE_TEXT + "\n" + ANSWER_OPEN + " " + ANSWER_PLACEHOLDER + " " + ANSWER_CLOSE
"""The paper's probe: ``PROBE_TEXT``, a new line, then the answer inside the answer tags."""

_TAG_RE = re.compile(r"</?(?:think|search|tool_call|code|information|answer)>")


def user_message(question: str) -> str:
    """The instruction with the question filled in (the content of the single user turn).

    Example:
        >>> user_message("Who founded Orvane?").endswith("Question: Who founded Orvane?\\n")
        True
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    return INSTRUCTION.format(question=question.strip())


def build_prompt(question: str, tokenizer: Any) -> str:
    """The full prompt text for a question, ready to be tokenized.

    With a tokenizer that has a chat template, the instruction becomes the single user message
    and the template's generation prompt (e.g. ``<|im_start|>assistant\\n``) ends the text; with
    no chat template it is the instruction itself. Tokenize the result with
    ``add_special_tokens=False`` (a chat template already places its own special tokens).
    """
    content = user_message(question)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content


def observation_block(text: str) -> str:
    """The text inserted after a search turn: retrieved documents inside the information tags.

    Example:
        >>> observation_block("Doc 1: Orvane was founded by Ilsa Marr.")
        '\\n\\n<information>Doc 1: Orvane was founded by Ilsa Marr.</information>\\n\\n'
    """
    return f"\n\n{INFORMATION_OPEN}{text.strip()}{INFORMATION_CLOSE}\n\n"


def stop_end(text: str) -> int | None:
    """Index just past the first stop string in ``text`` (``None`` when there is none).

    Example:
        >>> stop_end("<search> x </search> trailing")
        20
        >>> stop_end("<answer> y") is None
        True
    """
    ends = [pos + len(stop) for stop in STOP_STRINGS if (pos := text.find(stop)) >= 0]
    return min(ends) if ends else None


@dataclass(frozen=True)
class Action:
    """What one generated turn asks for.

    kind: ``"search"`` (content is the query), ``"answer"`` (content is the answer text) or
    ``"invalid"`` (content is empty and ``reason`` says what is wrong).
    """

    kind: Literal["search", "answer", "invalid"]
    content: str = ""
    reason: str = ""


def parse_action(turn_text: str) -> Action:
    """Read the action of one generated turn; never raises on any text the model writes.

    A valid turn follows the grammar ``igpo_rewards.is_well_formed`` applies to the whole
    response: an optional ``<think>..</think>`` block, then one ``<search>..</search>`` or
    ``<answer>..</answer>`` block whose closing tag is the first stop string of the turn, with
    only whitespace outside the blocks (whatever follows the stop string, possible when a stop
    string ends inside a token, is ignored). Invalid: no stop string (the turn ran out of
    tokens or hit end-of-sequence), text outside the blocks, ``<information>`` written by the
    model, two think blocks, nested or unbalanced tags, a closing tag that does not match, an
    empty query. An empty answer is an answer (it scores 0).

    Example:
        >>> parse_action("<think> need the city </think> <search> Ilsa Marr birthplace </search>")
        Action(kind='search', content='Ilsa Marr birthplace', reason='')
        >>> parse_action("<answer> Tovia </answer>")
        Action(kind='answer', content='Tovia', reason='')
        >>> parse_action("<search> a <answer> b </answer>").kind
        'invalid'
        >>> parse_action("so <answer> b </answer>").reason
        'text outside the tags'
    """
    if not isinstance(turn_text, str):
        raise TypeError(f"turn_text must be a str, got {type(turn_text).__name__}")
    end = stop_end(turn_text)
    if end is None:
        return Action("invalid", reason="no </search> or </answer>")
    head = turn_text[:end]
    tags = list(_TAG_RE.finditer(head))
    if len(tags) not in (2, 4) or (len(tags) == 4 and [t.group(0) for t in tags[:2]] != [THINK_OPEN, THINK_CLOSE]):
        return Action("invalid", reason=f"expected [<think>..</think>] then one action, got {[t.group(0) for t in tags]}")
    gaps = [head[: tags[0].start()]] + [head[tags[i].end() : tags[i + 1].start()] for i in range(1, len(tags) - 1, 2)]
    if any(gap.strip() for gap in gaps):
        return Action("invalid", reason="text outside the tags")
    opening, closing = tags[-2], tags[-1]
    pair = (opening.group(0), closing.group(0))
    if pair == (SEARCH_OPEN, SEARCH_CLOSE):
        kind = "search"
    elif pair == (ANSWER_OPEN, ANSWER_CLOSE):
        kind = "answer"
    else:
        return Action("invalid", reason=f"mismatched tags {pair[0]} {pair[1]}")
    content = " ".join(head[opening.end() : closing.start()].split())
    if kind == "search" and not content:
        return Action("invalid", reason="empty search query")
    return Action(kind, content)
