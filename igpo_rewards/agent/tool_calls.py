"""The Search-R1 protocol as tool calls: a ``search`` tool, a search environment, and the chat and
response templates under which a tool-calling loop writes exactly the Search-R1 token layout.

A tool-calling trainer (TRL's ``GRPOTrainer(tools=...)`` / ``environment_factory=...``) renders
the tools into the prompt through the tokenizer's chat template, parses each generated turn into
``tool_calls`` with the tokenizer's ``response_template`` (transformers >= 5.13), calls the tools,
and appends their results rendered by the chat template. With the two templates here that
round trip is the Search-R1 text of :mod:`igpo_rewards.agent.protocol`, token for token:

- :data:`SEARCH_R1_CHAT_TEMPLATE` (ChatML, the layout of
  ``igpo_rewards.testing.tiny.CHAT_TEMPLATE``): system and user messages as ChatML; an assistant
  message as its header (none right after a tool message: the assistant goes on with its
  message, as in Search-R1), its content, then each tool call, a ``search`` call with a ``query``
  as ``<search> query </search>`` and any other call as ``<tool_call>{json}</tool_call>``, then
  ``<|im_end|>``; a tool message as ``observation_block(content)``
  (``\\n\\n<information>..</information>\\n\\n``); the generation prompt
  ``<|im_start|>assistant\\n`` except right after a tool message. The ``tools`` argument is not
  rendered: the Search-R1 instruction in the user message describes the tool
  (``protocol.INSTRUCTION``). A conversation that ends with an assistant message has no newline
  after its ``<|im_end|>`` (ChatML writes one): with BPE ``\\n\\n`` is one token, and that newline
  would make the rendering of an assistant message not a prefix of the rendering with the tool
  result after it. In a tool loop the ``<|im_end|>`` after a tool-calling assistant message never
  reaches the token ids (generation stops at ``</search>``), so a fully rendered conversation
  (for SFT) is not the token sequence the loop trains on.
- :data:`SEARCH_R1_RESPONSE_TEMPLATE` (a transformers ``response_template``): a generated turn is
  a call of the ``search`` tool exactly when :func:`igpo_rewards.agent.protocol.parse_action`
  calls it a search (an optional ``<think>..</think>``, then ``<search>q</search>`` with a
  non-blank q and no other tag, only whitespace around), with the query as its argument; any
  other turn is plain content, so the loop ends the rollout where the Search-R1 loop ends it.
  Parsing starts after the last assistant header or observation block of the prefix, so only
  the turn just generated is read.

Generation must stop at ``</search>`` and ``</answer>``: a trainer passes them as end-of-turn
token ids (TRL >= 1.14.2 reads ``model.generation_config.eos_token_id``), which needs both tags
to be single tokens (true for tokenizers built by ``igpo_rewards.testing.tiny.train_tokenizer``).
:func:`igpo_rewards.integrations.trl.use_search_r1_tool_protocol` sets all three on a tokenizer
and a model.

The tool: :func:`make_search_tool` returns ``search(query: str) -> str``, a plain function with
type hints and a Google-style docstring (what transformers' ``get_json_schema`` and TRL accept),
answering ``format_observation`` of the top documents. :class:`SearchEnvironment` is the same
search as the one tool method of a per-rollout environment (TRL's ``environment_factory``). A
failing retriever (``RetrievalError``: server down, bad answer) must not look like a search
result: tool loops turn a tool's exception into an error message the model reads. So both
record every ``RetrievalError`` in ``retrieval_errors`` (:class:`ToolErrors`) before re-raising
it, and ``IGPOTrainer`` raises after the loop when any was recorded.

Pure Python: importing this module needs neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from igpo_rewards import _checks
from igpo_rewards.agent.protocol import (
    _TAG_RE,
    ANSWER_CLOSE,
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
)
from igpo_rewards.agent.retrieval import Document, HTTPRetriever, RetrievalError, Retriever, format_observation

__all__ = [
    "SEARCH_R1_CHAT_TEMPLATE",
    "SEARCH_R1_RESPONSE_TEMPLATE",
    "SEARCH_TOOL_NAME",
    "STOP_TAGS",
    "SearchEnvironment",
    "ToolErrors",
    "as_retriever",
    "make_search_tool",
]

SEARCH_TOOL_NAME = "search"
"""The tool's name: what the model's call names and what the templates render as ``<search>``."""

STOP_TAGS = (SEARCH_CLOSE, ANSWER_CLOSE)
"""The tags a turn ends at; a tool loop needs each as an end-of-turn token id."""

_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"

SEARCH_R1_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    "{{- message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set function = call['function'] if 'function' in call else call %}"
    "{%- set arguments = function.get('arguments') or {} %}"
    f"{{%- if function['name'] == '{SEARCH_TOOL_NAME}' and arguments is mapping and 'query' in arguments %}}"
    f"{{{{- '{SEARCH_OPEN} ' + arguments['query'] | string + ' {SEARCH_CLOSE}' }}}}"
    "{%- else %}"
    "{{- '<tool_call>' + ({'name': function['name'], 'arguments': arguments} | tojson) + '</tool_call>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- if not loop.last and messages[loop.index0 + 1]['role'] != 'tool' %}{{- '\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    f"{{{{- '\\n\\n{INFORMATION_OPEN}' + message['content'] | string | trim + '{INFORMATION_CLOSE}\\n\\n' }}}}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'tool') %}"
    "{%- if messages | length > 0 and messages[-1]['role'] == 'assistant' %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""ChatML with Search-R1 tool calls and results (module docstring); a Jinja chat template."""

_TAG = _TAG_RE.pattern
_NOT_A_TAG = rf"(?:(?!{_TAG}).)"
SEARCH_R1_RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": [f"{_IM_START}assistant\n", f"{INFORMATION_CLOSE}\n\n"],
    "fields": {
        "tool_calls": {
            "open_pattern": (
                rf"\A\s*(?:{THINK_OPEN}{_NOT_A_TAG}*{THINK_CLOSE}\s*)?"
                rf"{SEARCH_OPEN}(?P<query>\s*(?!{_TAG})\S{_NOT_A_TAG}*?){SEARCH_CLOSE}"
            ),
            "repeats": True,
            "content": "text",
            "transform": {"type": "function", "function": {"name": SEARCH_TOOL_NAME, "arguments": {"query": "{query}"}}},
        },
        "content": {"close": _IM_END, "content": "text"},
    },
}
"""A transformers ``response_template``: a turn is a ``search`` call iff ``parse_action`` calls it a
search (module docstring). Set it on a tokenizer only for a tool loop: a trainer that finds it
parses every completion, a rollout function's too."""


@dataclass
class ToolErrors:
    """Retrieval failures a tool saw: how many, and the first few (the tool re-raised each one).

    A tool loop turns a tool's exception into an error message for the model; this record is
    how a trainer tells a dead search engine from a bad query (``IGPOTrainer`` raises on it).
    """

    count: int = 0
    first: list[Exception] = field(default_factory=list)
    keep: int = 5

    def record(self, error: Exception) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(error)

    def take(self) -> tuple[int, list[Exception]]:
        """``(count, first errors)`` since the last call, and resets the record."""
        seen = (self.count, self.first)
        self.count, self.first = 0, []
        return seen


class _CallableRetriever:
    """A ``Retriever`` around ``search(queries, topk) -> [[Document or Search-R1 contents str, ...], ...]``."""

    def __init__(self, function: Callable[[list[str], int], Sequence[Sequence[Any]]]):
        self.function = function

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        results = self.function(list(queries), topk)
        if not isinstance(results, (list, tuple)) or len(results) != len(queries):
            raise ValueError(
                f"the search callable must return one list of documents per query: {len(queries)} queries, "
                f"got {results!r:.120}"
            )
        return [[_document(hit, query, rank) for rank, hit in enumerate(hits)] for query, hits in enumerate(results)]


def _document(hit: Any, query: int, rank: int) -> Document:
    if isinstance(hit, Document):
        return hit
    if isinstance(hit, str):
        return Document.from_contents("", hit)
    raise TypeError(
        f"the search callable's result [{query}][{rank}] must be a Document or a Search-R1 contents str "
        f"('\"Title\"\\ntext'), got {type(hit).__name__}"
    )


def as_retriever(retriever: Any) -> Retriever:
    """A ``/retrieve`` URL (``HTTPRetriever``), an object with ``search``, or a search callable, as a ``Retriever``.

    Raises:
        TypeError: none of these.
        ValueError: a string that is not an http(s) URL.
    """
    if isinstance(retriever, str):
        return HTTPRetriever(retriever)
    if callable(getattr(retriever, "search", None)):
        return retriever
    if callable(retriever):
        return _CallableRetriever(retriever)
    raise TypeError(
        f"retriever must be a Search-R1 /retrieve URL, an object with search(queries, topk) or a callable "
        f"(queries, topk) -> one list of documents per query; got {type(retriever).__name__}"
    )


def _search(retriever: Retriever, query: str, topk: int, errors: ToolErrors) -> str:
    """The observation of one query (normalised as ``parse_action`` does), recording a ``RetrievalError``."""
    try:
        (documents,) = retriever.search([" ".join(query.split())], topk)
    except RetrievalError as error:
        errors.record(error)
        raise
    return format_observation(documents)


# The docstring both forms share: TRL builds the tool's JSON schema from it (get_json_schema).
_SEARCH_DOC = """Search the corpus and return the top documents about the query.

        Args:
            query: What to look up, e.g. a name and the fact asked about.

        Returns:
            The top documents, one per line: Doc 1(Title: "...") text.
        """


def make_search_tool(retriever: Any, *, topk: int = 3) -> Callable[[str], str]:
    """The Search-R1 search as a tool function ``search(query: str) -> str``.

    The function's name, type hints and Google-style docstring are what a tool-calling chat
    template and TRL's schema reader (transformers ``get_json_schema``) need: one required string
    argument ``query``. It normalises the query's whitespace (as ``parse_action`` does), asks the
    retriever for the ``topk`` documents and returns ``format_observation`` of them. Its
    ``retrieval_errors`` (:class:`ToolErrors`) records every ``RetrievalError`` before re-raising it.

    Args:
        retriever: a Search-R1 ``/retrieve`` URL, an object with ``search(queries, topk)``, or a
            callable ``(queries, topk)`` (:func:`as_retriever`).
        topk: documents per search.

    Raises:
        TypeError / ValueError: a bad retriever or ``topk``.

    Example:
        >>> from igpo_rewards.agent.retrieval import Document
        >>> search = make_search_tool(lambda queries, k: [[Document("1", "Kelm", "Kelm is a city.")]], topk=1)
        >>> search("where   is Kelm")
        'Doc 1(Title: "Kelm") Kelm is a city.'
        >>> search.__name__, search.retrieval_errors.count
        ('search', 0)
    """
    backend = as_retriever(retriever)
    topk = _checks.check_positive_count("topk", topk)
    errors = ToolErrors()

    def search(query: str) -> str:
        return _search(backend, query, topk, errors)

    search.__doc__ = _SEARCH_DOC
    search.retrieval_errors = errors  # type: ignore[attr-defined]
    return search


class SearchEnvironment:
    """One rollout's search engine, for a tool loop's environment factory (one instance per rollout).

    Its only public method besides ``reset`` is the tool ``search(query: str) -> str`` (the same
    search as :func:`make_search_tool`); TRL exposes every public method as a tool, so helpers stay
    private. ``reset(**row)`` starts a rollout: it forgets the queries and returns ``None`` (the
    prompt stays as the dataset wrote it). ``queries`` lists the rollout's searches, normalised.
    ``retrieval_errors`` records every ``RetrievalError`` before it is re-raised.

    Args:
        retriever: as for :func:`make_search_tool`.
        topk: documents per search.

    Example:
        >>> from functools import partial
        >>> from igpo_rewards.agent.retrieval import Document
        >>> factory = partial(SearchEnvironment, lambda queries, k: [[Document("1", "Kelm", "Kelm is a city.")]], topk=1)
        >>> environment = factory()
        >>> environment.reset(prompt=[], answers=["Kelm"])
        >>> environment.search("Kelm")
        'Doc 1(Title: "Kelm") Kelm is a city.'
        >>> environment.queries
        ['Kelm']
    """

    def __init__(self, retriever: Any, *, topk: int = 3):
        self._retriever = as_retriever(retriever)
        self._topk = _checks.check_positive_count("topk", topk)
        self.queries: list[str] = []
        self.retrieval_errors = ToolErrors()

    def reset(self, **row: Any) -> None:
        """Starts a rollout (TRL passes the dataset row's columns); nothing is added to the prompt."""
        self.queries = []

    def search(self, query: str) -> str:
        self.queries.append(" ".join(query.split()))
        return _search(self._retriever, query, self._topk, self.retrieval_errors)

    search.__doc__ = _SEARCH_DOC
