"""Retrieval for the agent's ``<search>`` calls: the retriever interface, a Search-R1 HTTP client,
and the observation text.

Every retriever answers a batch of queries at once:

    retriever.search(queries: list[str], topk: int = 3) -> list[list[Document]]   # one list per query, best first

``HTTPRetriever`` is a client for the Search-R1 retrieval server API,

    POST {url}/retrieve  {"queries": [...], "topk": k, "return_scores": true}
    -> {"result": [[{"document": {"id": str, "contents": "\\"Title\\"\\ntext"}, "score": float}, ...], ...]}

so any Search-R1 compatible server (BM25 or dense, on another machine; ``igpo-retrieve``
serves one) can answer the searches. Any object with that ``search`` method will do too (the
in-process ``igpo_rewards.agent.bm25.BM25Retriever``, a dense index, a Python callable wrapped in
a class).

``format_observation(docs)`` renders results as the text placed inside
<information>...</information>, in Search-R1's layout ("Doc 1(Title: "...") text", one line each).

``read_corpus_jsonl`` / ``write_corpus_jsonl`` read and write a corpus in Search-R1's jsonl layout
(one ``{"id": str, "contents": "\\"Title\\"\\ntext"}`` per line), the file ``igpo-retrieve``
(``igpo_rewards.agent.retrieval_server``) serves with ``igpo_rewards.agent.bm25.BM25Retriever``.

Pure Python (urllib, json): importing this module needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

__all__ = [
    "NO_RESULTS",
    "Document",
    "HTTPRetriever",
    "RetrievalError",
    "Retriever",
    "check_search_args",
    "format_observation",
    "read_corpus_jsonl",
    "write_corpus_jsonl",
]

NO_RESULTS = "No documents found."
"""What ``format_observation`` returns for an empty result list."""


@dataclass(frozen=True)
class Document:
    """One retrievable document; ``contents`` is its Search-R1 form ``'"Title"\\ntext'``.

    Example:
        >>> doc = Document(id="7", title="Kaleno", text="Kaleno is a city in Borania.")
        >>> doc.contents
        '"Kaleno"\\nKaleno is a city in Borania.'
        >>> Document.from_contents("7", doc.contents) == doc
        True
    """

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        return '"' + self.title + '"\n' + self.text

    @classmethod
    def from_contents(cls, id: str, contents: str) -> "Document":
        """Split Search-R1 ``contents`` into title (first line, surrounding quotes removed) and text.

        Contents without a newline are all title and an empty text.
        """
        if not isinstance(contents, str):
            raise TypeError(f"contents must be a str, got {type(contents).__name__}: {contents!r:.80}")
        title, _, text = contents.partition("\n")
        title = title.strip()
        if len(title) >= 2 and title.startswith('"') and title.endswith('"'):
            title = title[1:-1]
        return cls(id=str(id), title=title, text=text)


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a batch of search queries with the top documents of each."""

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Return, for each query, at most ``topk`` documents, best first."""
        ...


class RetrievalError(RuntimeError):
    """A retrieval backend failed: server unreachable, timed out, or answered something unreadable."""


def check_search_args(queries: Any, topk: Any) -> None:
    """The argument checks every ``Retriever.search`` implementation shares.

    Raises:
        TypeError: ``queries`` is not a list/tuple of str, or ``topk`` is not an int.
        ValueError: ``topk`` < 1.
    """
    if not isinstance(queries, (list, tuple)):
        raise TypeError(f"queries must be a list of str, got {type(queries).__name__}")
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(f"queries[{position}] must be a str, got {type(query).__name__}: {query!r:.80}")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}: {topk!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")


class HTTPRetriever:
    """Client for a Search-R1 style retrieval server.

    Args:
        url: the server, e.g. "http://127.0.0.1:8000"; "/retrieve" is appended unless the URL
            already ends with it (Search-R1 configs give the full ".../retrieve" URL).
        timeout: seconds to wait for each request.

    Raises (from ``search``):
        RetrievalError: connection refused, timeout, HTTP error status, or a response that is
            not ``{"result": [one list per query]}`` with a string "contents" in every document.

    A hit may be ``{"document": {...}, "score": s}`` (return_scores=true) or the document
    object itself; a missing "id" becomes "". At most ``topk`` hits per query are kept.
    """

    def __init__(self, url: str, timeout: float = 30.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        self.timeout = float(timeout)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """POST the queries and parse the server's documents, one list per query."""
        check_search_args(queries, topk)
        if not queries:
            return []
        body = json.dumps({"queries": list(queries), "topk": topk, "return_scores": True}).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode("utf-8", "replace")
            raise RetrievalError(f"retrieval server {self.url} answered HTTP {error.code} {error.reason}: {detail!r}") from None
        except (socket.timeout, TimeoutError):
            raise RetrievalError(f"retrieval server {self.url} did not answer within {self.timeout} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise RetrievalError(f"retrieval server {self.url} did not answer within {self.timeout} s") from None
            raise RetrievalError(f"cannot reach retrieval server {self.url}: {error.reason}") from None
        except OSError as error:  # connection reset mid-response and the like
            raise RetrievalError(f"retrieval server {self.url} failed: {error}") from None
        return self._parse(payload, len(queries), topk)

    def _parse(self, payload: bytes, num_queries: int, topk: int) -> list[list[Document]]:
        try:
            decoded = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetrievalError(f"retrieval server {self.url} answered non-JSON: {payload[:200]!r}") from None
        result = decoded.get("result") if isinstance(decoded, dict) else None
        if not isinstance(result, list) or len(result) != num_queries:
            raise RetrievalError(f"retrieval server {self.url} must answer {{\"result\": [one list per query]}} "
                                 f"for {num_queries} queries, got {str(decoded)[:200]!r}")
        documents: list[list[Document]] = []
        for position, hits in enumerate(result):
            if not isinstance(hits, list):
                raise RetrievalError(f"retrieval server {self.url}: result[{position}] must be a list, got {str(hits)[:200]!r}")
            parsed = []
            for rank, hit in enumerate(hits[:topk]):
                doc = hit.get("document", hit) if isinstance(hit, dict) else None
                if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
                    raise RetrievalError(f"retrieval server {self.url}: result[{position}][{rank}] has no string "
                                         f"'contents': {str(hit)[:200]!r}")
                parsed.append(Document.from_contents(str(doc.get("id", "")), doc["contents"]))
            documents.append(parsed)
        return documents


def format_observation(docs: Sequence[Document]) -> str:
    """The retrieved documents as the text inside <information>...</information>.

    One line per document, numbered from 1, as Search-R1 renders them (the title keeps the
    quotes of the corpus ``contents``); ``NO_RESULTS`` when there is none.

    Example:
        >>> print(format_observation([Document("0", "Kaleno", "Kaleno is a city in Borania."),
        ...                           Document("4", "Velum", "Velum is a city in Tosk.")]))
        Doc 1(Title: "Kaleno") Kaleno is a city in Borania.
        Doc 2(Title: "Velum") Velum is a city in Tosk.
        >>> format_observation([])
        'No documents found.'
    """
    if not docs:
        return NO_RESULTS
    return "\n".join(f'Doc {rank}(Title: "{doc.title}") {doc.text}' for rank, doc in enumerate(docs, start=1))


# ---------------------------------------------------------------------------------------------
# Corpus files (Search-R1 jsonl)
# ---------------------------------------------------------------------------------------------


def write_corpus_jsonl(docs: Iterable[Document], path: str | Path) -> Path:
    """Write documents as Search-R1 corpus jsonl: one ``{"id", "contents"}`` object per line.

    Parent directories are created. Returns the path written.

    Raises:
        TypeError: an element of ``docs`` that is not a ``Document`` (the message gives its index).
    """
    path = Path(path)
    lines = []
    for position, doc in enumerate(docs):
        if not isinstance(doc, Document):
            raise TypeError(f"docs[{position}] must be a Document, got {type(doc).__name__}")
        lines.append(json.dumps({"id": doc.id, "contents": doc.contents}, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _corpus_document(record: Any, where: str) -> Document:
    """One corpus line's object as a Document; ValueError naming ``where`` (path:line) otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "contents") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; keys present: {sorted(record)}")
    doc_id, contents = record["id"], record["contents"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f"{where}: id must be a string or an int, got {doc_id!r}")
    if not isinstance(contents, str):
        raise ValueError(f"{where}: contents must be a string, got {type(contents).__name__}")
    return Document.from_contents(str(doc_id), contents)


def read_corpus_jsonl(path: str | Path) -> list[Document]:
    """Read a Search-R1 corpus jsonl (one ``{"id", "contents"}`` object per line).

    Blank lines are skipped; integer ids are accepted and turned into strings; other keys
    (e.g. "title" in some corpora) are ignored, the title always comes from ``contents``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file has no documents, a line is not a JSON object (the message gives
            the line number), lacks "id" or "contents", has a non-string contents, or an id repeats.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> path = write_corpus_jsonl([Document("0", "Kaleno", "Kaleno is a city in Borania.")], f"{folder}/c.jsonl")
        >>> read_corpus_jsonl(path)
        [Document(id='0', title='Kaleno', text='Kaleno is a city in Borania.')]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    docs: list[Document] = []
    seen_ids: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            doc = _corpus_document(record, where)
            if doc.id in seen_ids:
                raise ValueError(f"{where}: duplicate document id {doc.id!r}")
            seen_ids.add(doc.id)
            docs.append(doc)
    if not docs:
        raise ValueError(f"corpus file {path} is empty: expected one {{\"id\", \"contents\"}} JSON object per line")
    return docs
