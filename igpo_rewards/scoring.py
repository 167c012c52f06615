"""Answer scoring: the outcome reward R_i of IGPO (docs/algorithm.md, section 2).

Pure Python (standard library only). The outcome reward of a rollout is the word-level F1
(or exact match) between the text inside its ``<answer>...</answer>`` block and the ground
truth, maximised over the ground truth's aliases; a response that breaks the tag format gets
a fixed ``format_penalty`` instead (-2.0 in training, 0.0 in evaluation).

Two normalizations are offered:

* ``"paper"`` (default, IGPO's): lowercase; every punctuation character (ASCII
  ``string.punctuation`` and every Unicode character of category ``P*``) becomes a space;
  whitespace collapsed and stripped. F1 is computed over the SETS of words.
* ``"squad"`` (the SQuAD v1.1 evaluation script's): lowercase; ASCII ``string.punctuation``
  characters are deleted (not replaced by a space); the whole words ``a``/``an``/``the`` are
  removed; whitespace collapsed. F1 is computed over MULTISETS of words.

References:
    Wang et al., "Information Gain-based Policy Optimization: A Simple and Effective Approach
    for Multi-Turn Search Agents", arXiv 2510.14967 (ICLR 2026).
    Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of Text", 2016.
"""

from __future__ import annotations

import math
import numbers
import re
import string
import unicodedata
from collections import Counter

__all__ = [
    "ANSWER_SPLIT",
    "FORMAT_TAGS",
    "answer_f1",
    "exact_match",
    "extract_answer",
    "is_well_formed",
    "normalize_answer",
    "outcome_reward",
    "split_ground_truth",
]

ANSWER_SPLIT = "<|answer_split|>"
"""Separator of the aliases in a one-string ground truth (Search-R1/verl parquet layout)."""

FORMAT_TAGS = ("think", "search", "tool_call", "code", "information", "answer")
"""The tag names :func:`is_well_formed` understands; any other ``<...>`` text is plain text."""

_STYLES = ("paper", "squad")
_METRICS = ("f1", "em")
_CALL_TAGS = frozenset({"search", "tool_call", "code"})
_TAG_RE = re.compile(r"<(/?)(" + "|".join(FORMAT_TAGS) + r")>")
_SQUAD_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_SQUAD_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_REPR_LIMIT = 120


class _PunctuationToSpace(dict):
    """``str.translate`` table mapping every punctuation code point to a space.

    Punctuation = ASCII ``string.punctuation`` (which includes symbols such as ``$+<=>^`|~``)
    plus every Unicode character whose general category starts with ``P`` (dashes, quotes,
    brackets, ``¿``, ``。``, ...). Other symbols (``€``, emoji) are kept. Entries are computed
    on first use and cached.
    """

    def __missing__(self, codepoint: int) -> int | str:
        char = chr(codepoint)
        is_punctuation = char in string.punctuation or unicodedata.category(char).startswith("P")
        value: int | str = " " if is_punctuation else codepoint
        self[codepoint] = value
        return value


_PAPER_PUNCTUATION = _PunctuationToSpace()


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _check_str(name: str, value: object, hint: str = "") -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}{hint}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {_short_repr(value)}")


def normalize_answer(text: str, *, style: str = "paper") -> str:
    """Normalize an answer string before comparing words.

    ``style="paper"`` (IGPO): lowercase, replace every punctuation character (ASCII
    ``string.punctuation`` and Unicode categories ``Pc Pd Ps Pe Pi Pf Po``) by a space,
    collapse runs of whitespace to one space and strip. ``style="squad"`` (SQuAD v1.1):
    lowercase, delete ASCII ``string.punctuation`` characters (Unicode punctuation is kept),
    replace the whole words ``a``, ``an``, ``the`` by a space, collapse whitespace.

    Args:
        text: the answer or one ground-truth alias.
        style: ``"paper"`` or ``"squad"``.

    Returns:
        The normalized string; words are separated by single spaces ("" if nothing is left).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: unknown ``style``.

    Example:
        >>> normalize_answer("The U.S.A.  — «1776»!")
        'the u s a 1776'
        >>> normalize_answer("The U.S.A.  — «1776»!", style="squad")
        'usa — «1776»'
    """
    _check_str("text", text)
    _check_choice("style", style, _STYLES)
    text = text.lower()
    if style == "paper":
        text = text.translate(_PAPER_PUNCTUATION)
    else:
        text = text.translate(_SQUAD_DELETE_PUNCTUATION)
        text = _SQUAD_ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def split_ground_truth(ground_truth: object) -> tuple[str, ...]:
    """Turn a ground truth into its tuple of aliases.

    Accepted forms: one str whose aliases are joined by ``"<|answer_split|>"`` (the verl
    parquet layout); a list or tuple of str; anything with a ``tolist()`` method that returns
    a str or a list of str (a NumPy array of str or object dtype, a pandas Series, a pyarrow
    array; NumPy is never imported here). Every str element is itself split on the separator,
    each alias is stripped of surrounding whitespace, and empty aliases are dropped. Order is
    kept; duplicates are kept.

    Args:
        ground_truth: the ground truth in one of the forms above.

    Returns:
        A non-empty tuple of non-empty, stripped aliases.

    Raises:
        TypeError: ``ground_truth`` (or one of its elements) has another type.
        ValueError: no non-empty alias remains.

    Example:
        >>> split_ground_truth("Bloomsburg<|answer_split|> Eyersburg <|answer_split|>")
        ('Bloomsburg', 'Eyersburg')
        >>> split_ground_truth(["Paris", "  ", "City of Light"])
        ('Paris', 'City of Light')
    """
    if isinstance(ground_truth, str):
        items: list[object] = [ground_truth]
    elif isinstance(ground_truth, (list, tuple)):
        items = list(ground_truth)
    elif callable(getattr(ground_truth, "tolist", None)):
        converted = ground_truth.tolist()
        items = [converted] if isinstance(converted, str) else converted
        if not isinstance(items, list):
            raise TypeError(
                f"ground_truth.tolist() must return a str or a list of str, got "
                f"{type(converted).__name__} (from {type(ground_truth).__name__})"
            )
    else:
        hint = ""
        if isinstance(ground_truth, dict):
            hint = " (Search-R1 stores {'target': [...]}: pass ground_truth['target'])"
        raise TypeError(
            "ground_truth must be a str (aliases joined by '<|answer_split|>'), a list/tuple "
            f"of str or an array of str, got {type(ground_truth).__name__}{hint}"
        )
    aliases = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"ground_truth[{index}] must be a str, got {type(item).__name__} "
                f"({_short_repr(item)})"
            )
        aliases.extend(piece.strip() for piece in item.split(ANSWER_SPLIT))
    aliases = [alias for alias in aliases if alias]
    if not aliases:
        raise ValueError(
            f"ground_truth has no non-empty alias after splitting on {ANSWER_SPLIT!r} and "
            f"stripping; got {_short_repr(ground_truth)}"
        )
    return tuple(aliases)


def extract_answer(response: str) -> str | None:
    """Return the stripped text inside the first ``<answer>...</answer>`` block, or None.

    The scan goes left to right. ``<information>...</information>`` blocks are retrieved text
    written by the environment, not by the policy, so an ``<answer>`` quoted inside one is
    skipped (an ``<information>`` that is never closed runs to the end of the text). The
    first ``<answer>`` found outside them is paired with the next ``</answer>``; the text in
    between (other tags included) is returned with surrounding whitespace stripped. Returns
    None when there is no ``<answer>`` or it is never closed. Tags are case-sensitive.
    The response does not have to be well formed (see :func:`is_well_formed`).

    Args:
        response: the rollout's text.

    Returns:
        The answer text ("" for an empty block) or None.

    Raises:
        TypeError: ``response`` is not a str.

    Example:
        >>> extract_answer("<think>capital?</think>\\n<answer> Paris </answer>")
        'Paris'
        >>> extract_answer("<answer>Par") is None
        True
    """
    _check_str("response", response)
    position = 0
    while True:
        answer_at = response.find("<answer>", position)
        information_at = response.find("<information>", position)
        if answer_at == -1:
            return None
        if information_at != -1 and information_at < answer_at:
            information_end = response.find("</information>", information_at)
            if information_end == -1:
                return None
            position = information_end + len("</information>")
            continue
        content_start = answer_at + len("<answer>")
        content_end = response.find("</answer>", content_start)
        if content_end == -1:
            return None
        return response[content_start:content_end].strip()


def _block_kinds(response: str) -> list[str] | None:
    """Split a response into its tag blocks; None when the text between blocks is not valid."""
    kinds = []
    position = 0
    while True:
        opening = _TAG_RE.search(response, position)
        if opening is None:
            return None if response[position:].strip() else kinds
        if response[position : opening.start()].strip():
            return None  # text outside any block
        is_closing, name = opening.group(1), opening.group(2)
        if is_closing:
            return None  # a closing tag with no open block
        closing_tag = f"</{name}>"
        if name == "information":
            # Retrieved text is opaque: it ends at the first </information>.
            content_end = response.find(closing_tag, opening.end())
            if content_end == -1:
                return None
        else:
            closing = _TAG_RE.search(response, opening.end())
            if closing is None or closing.group(0) != closing_tag:
                return None  # unclosed, nested, or interleaved with another tag
            content_end = closing.start()
        kinds.append(name)
        position = content_end + len(closing_tag)


def is_well_formed(response: str) -> bool:
    """Check the tag format of a (multi-turn) search-agent response.

    The response is read as a sequence of blocks ``<tag>...</tag>`` with tag in ``think``,
    ``search``, ``tool_call``, ``code`` (the three *call* tags), ``information`` (an
    observation inserted by the environment) and ``answer``. Tags are exact and
    case-sensitive; any other text in angle brackets is plain text. It is well formed iff:

    1. Only whitespace lies outside blocks (before the first, between two, after the last):
       no text after the final ``</answer>``.
    2. Every opened block is closed by its own closing tag before any other of these tags
       appears (no nesting, no interleaving, no truncated block, no stray closing tag). The
       content of an ``<information>`` block is opaque: it is the environment's text, may
       contain any tags, and ends at the first ``</information>``.
    3. The blocks follow the grammar ``(think? call information?)* think? answer``, i.e.
       exactly one ``answer`` block and it is the last block; an ``information`` block comes
       right after a call block; no two ``think`` blocks in a row; ``think`` is optional
       (a call need not be followed by an ``information`` block: environments that render
       observations outside these tags are allowed).

    Remove chat-template text (``<|im_end|>``, ``<|im_start|>user``, ``<tool_response>``
    wrappers, the end-of-sequence token) before calling. If a chat template puts the opening
    ``<think>`` into the prompt (Qwen3), prepend it to the response.

    Compared with the IGPO authors' ``check_tags_balance`` (which only checks, per tag among
    think/tool_call/code/answer, equal counts and that each opening tag has a later closing
    tag, on lowercased text) this also rejects nesting, text outside blocks, two answers and
    blocks after the answer; compared with Search-R1's ``is_valid_sequence`` it does not
    require ``<think>`` before every action nor an observation after every call.

    Args:
        response: the rollout's text.

    Returns:
        True if the response satisfies rules 1-3.

    Raises:
        TypeError: ``response`` is not a str.

    Example:
        >>> is_well_formed("<think>a</think><search>q</search>"
        ...                "<information>doc</information><answer>Paris</answer>")
        True
        >>> is_well_formed("<answer>Paris</answer> as I said")
        False
        >>> is_well_formed("<think>a<search>q</search></think><answer>Paris</answer>")
        False
    """
    _check_str("response", response)
    kinds = _block_kinds(response)
    if kinds is None:
        return False
    letters = "".join(
        "C" if kind in _CALL_TAGS else {"think": "T", "information": "I", "answer": "A"}[kind]
        for kind in kinds
    )
    return re.fullmatch(r"(T?CI?)*T?A", letters) is not None


def _word_scores(prediction: str, ground_truth: object, style: str) -> tuple[float, float]:
    """(best F1, best EM) of ``prediction`` over the aliases."""
    _check_str(
        "prediction",
        prediction,
        " (extract_answer returns None when the response has no <answer> block)",
    )
    _check_choice("style", style, _STYLES)
    aliases = split_ground_truth(ground_truth)
    predicted = normalize_answer(prediction, style=style)
    predicted_words = predicted.split()
    if not predicted_words:
        return 0.0, 0.0
    best_f1 = best_em = 0.0
    for alias in aliases:
        gold = normalize_answer(alias, style=style)
        gold_words = gold.split()
        if not gold_words:
            continue
        if style == "paper":
            predicted_set, gold_set = set(predicted_words), set(gold_words)
            common = len(predicted_set & gold_set)
            total = len(predicted_set) + len(gold_set)
        else:
            common = sum((Counter(predicted_words) & Counter(gold_words)).values())
            total = len(predicted_words) + len(gold_words)
        # 2PR / (P + R) with P = common / |pred| and R = common / |gold|.
        best_f1 = max(best_f1, 2.0 * common / total)
        if predicted == gold:
            best_em = 1.0
        if best_f1 == 1.0 and best_em == 1.0:
            break
    return best_f1, best_em


def answer_f1(prediction: str, ground_truth: object, *, style: str = "paper") -> float:
    """Word-level F1 between a prediction and the ground truth, maximised over aliases.

    Both strings are normalized with :func:`normalize_answer` and split on spaces. With
    P = common / |pred| and R = common / |gold|, F1 = 2PR / (P + R) = 2 common / (|pred| +
    |gold|), and 0 when nothing is in common. ``style="paper"`` counts distinct words (sets:
    repeating a word changes nothing); ``style="squad"`` counts words with multiplicity
    (``Counter`` intersection). A prediction that normalizes to no word scores 0.0; an alias
    that normalizes to no word is ignored (it can never be matched).

    Args:
        prediction: the answer text (e.g. from :func:`extract_answer`).
        ground_truth: aliases in any form :func:`split_ground_truth` accepts.
        style: ``"paper"`` or ``"squad"``.

    Returns:
        A float in [0, 1].

    Raises:
        TypeError: ``prediction`` is not a str, or ``ground_truth`` has a wrong type.
        ValueError: unknown ``style``; ``ground_truth`` has no alias.

    Example:
        >>> answer_f1("Paris, Paris!", "Paris France")
        0.6666666666666666
        >>> answer_f1("Paris, Paris!", "Paris France", style="squad")
        0.5
        >>> answer_f1("paris", "Lyon<|answer_split|>PARIS")
        1.0
    """
    return _word_scores(prediction, ground_truth, style)[0]


def exact_match(prediction: str, ground_truth: object, *, style: str = "paper") -> float:
    """1.0 if the normalized prediction equals some normalized alias, else 0.0.

    A prediction that normalizes to "" never matches (so ``exact_match <= answer_f1``).

    Args:
        prediction: the answer text.
        ground_truth: aliases in any form :func:`split_ground_truth` accepts.
        style: ``"paper"`` or ``"squad"``.

    Returns:
        1.0 or 0.0.

    Raises:
        TypeError: ``prediction`` is not a str, or ``ground_truth`` has a wrong type.
        ValueError: unknown ``style``; ``ground_truth`` has no alias.

    Example:
        >>> exact_match("The Beatles.", "beatles")
        0.0
        >>> exact_match("The Beatles.", "beatles", style="squad")
        1.0
    """
    return _word_scores(prediction, ground_truth, style)[1]


def outcome_reward(
    response: str,
    ground_truth: object,
    *,
    metric: str = "f1",
    format_penalty: float = -2.0,
    style: str = "paper",
) -> float:
    """The outcome reward R_i of one rollout (docs/algorithm.md, section 2).

    ``format_penalty`` if ``not is_well_formed(response)``; otherwise :func:`answer_f1`
    (``metric="f1"``) or :func:`exact_match` (``metric="em"``) between
    ``extract_answer(response)`` and the aliases. Training uses the paper's -2.0;
    evaluation passes ``format_penalty=0.0``. All arguments are validated even when the
    response is malformed.

    Args:
        response: the rollout's text (see :func:`is_well_formed` for what to strip first).
        ground_truth: aliases in any form :func:`split_ground_truth` accepts.
        metric: ``"f1"`` or ``"em"``.
        format_penalty: finite real number returned for a malformed response.
        style: ``"paper"`` or ``"squad"`` normalization.

    Returns:
        A float: ``format_penalty``, or a score in [0, 1].

    Raises:
        TypeError: ``response`` not a str, ``format_penalty`` not a real number (bool
            included), wrong ``ground_truth`` type.
        ValueError: unknown ``metric`` or ``style``; non-finite ``format_penalty``;
            ``ground_truth`` has no alias.

    Example:
        >>> good = "<think>a</think><answer>Paris, France</answer>"
        >>> outcome_reward(good, "Paris")
        0.6666666666666666
        >>> outcome_reward(good, "Paris", metric="em")
        0.0
        >>> outcome_reward("<answer>Paris", "Paris")
        -2.0
        >>> outcome_reward("<answer>Paris", "Paris", format_penalty=0.0)
        0.0
    """
    _check_str("response", response)
    _check_choice("metric", metric, _METRICS)
    _check_choice("style", style, _STYLES)
    if not isinstance(format_penalty, numbers.Real) or isinstance(format_penalty, bool):
        raise TypeError(
            f"format_penalty must be a real number, got {type(format_penalty).__name__}"
        )
    if not math.isfinite(format_penalty):
        raise ValueError(f"format_penalty must be finite, got {format_penalty!r}")
    aliases = split_ground_truth(ground_truth)
    if not is_well_formed(response):
        return float(format_penalty)
    answer = extract_answer(response)
    assert answer is not None  # a well-formed response has exactly one answer block
    f1, em = _word_scores(answer, aliases, style)
    return f1 if metric == "f1" else em
