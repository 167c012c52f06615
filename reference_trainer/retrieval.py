"""Retrieval: the search engine behind the agent's <search> calls.

Every retriever answers a batch of queries at once:

    retriever.search(queries: list[str], topk: int = 3) -> list[list[Document]]   # one list per query, best first

Two implementations:

- ``BM25Retriever``: a bm25s index over a list of ``Document`` (title + text, English
  stopwords removed, no stemming). Like Lucene, it only returns documents that share at least
  one word with the query, so a query made only of stopwords or unknown words returns [].
- ``HTTPRetriever``: a client for the Search-R1 retrieval server API,

      POST {url}/retrieve  {"queries": [...], "topk": k, "return_scores": true}
      -> {"result": [[{"document": {"id": str, "contents": "\\"Title\\"\\ntext"}, "score": float}, ...], ...]}

  so any Search-R1 compatible server (BM25 or dense, on another machine) can stand in.

``format_observation(docs)`` renders results as the text placed inside
<information>...</information>, in Search-R1's layout ("Doc 1(Title: "...") text", one line each).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from igpo_rewards.reference_trainer.world import Document

NO_RESULTS = "No documents found."
"""What ``format_observation`` returns for an empty result list."""


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a batch of search queries with the top documents of each."""

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Return, for each query, at most ``topk`` documents, best first."""
        ...


class RetrievalError(RuntimeError):
    """A retrieval backend failed: server unreachable, timed out, or answered something unreadable."""


def _checked_docs(docs: Any) -> list[Document]:
    if not isinstance(docs, (list, tuple)) or not docs:
        raise ValueError(f"docs must be a non-empty list of Document, got {type(docs).__name__} "
                         f"of length {len(docs) if hasattr(docs, '__len__') else '?'}")
    for position, doc in enumerate(docs):
        if not isinstance(doc, Document):
            raise TypeError(f"docs[{position}] must be a Document, got {type(doc).__name__}")
    return list(docs)


def _check_search_args(queries: Any, topk: Any) -> None:
    if not isinstance(queries, (list, tuple)):
        raise TypeError(f"queries must be a list of str, got {type(queries).__name__}")
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(f"queries[{position}] must be a str, got {type(query).__name__}: {query!r:.80}")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}: {topk!r}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")


class BM25Retriever:
    """BM25 (bm25s, Lucene variant) over the titles and texts of a list of documents.

    Args:
        docs: the corpus; document i is indexed as ``title + "\\n" + text``.
        k1, b: the BM25 parameters (Lucene defaults 1.5 and 0.75, as in bm25s and Search-R1's pyserini).

    Ties in score are broken by corpus order, so results are deterministic.

    Example:
        >>> docs = [Document("0", "Kaleno", "Kaleno is a city in Borania."),
        ...         Document("1", "Borania", "Borania is a country. The capital of Borania is Kaleno."),
        ...         Document("2", "Mira Tosk", "Mira Tosk was born in Velum.")]
        >>> retriever = BM25Retriever(docs)
        >>> [[doc.title for doc in result] for result in retriever.search(["Borania capital", "Mira", "the"], topk=2)]
        [['Borania', 'Kaleno'], ['Mira Tosk'], []]
    """

    def __init__(self, docs: Sequence[Document], *, k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.docs = _checked_docs(docs)
        self._bm25s = bm25s
        self._index = bm25s.BM25(k1=k1, b=b)
        corpus_tokens = self._tokenize([doc.title + "\n" + doc.text for doc in self.docs])
        self._index.index(corpus_tokens, show_progress=False)

    def save_index(self, directory: str | Path) -> None:
        """Write the bm25s index (not the documents) to ``directory``, in bm25s' own format."""
        self._index.save(str(directory), show_progress=False)

    @classmethod
    def from_saved_index(cls, docs: Sequence[Document], directory: str | Path) -> BM25Retriever:
        """A retriever over ``docs`` whose index ``save_index`` wrote for the same documents.

        Raises:
            ValueError / TypeError: bad ``docs`` (as the constructor), or an index that holds
                another number of documents than ``docs``.
            Whatever bm25s raises for a missing or damaged folder.
        """
        import bm25s

        checked = _checked_docs(docs)
        index = bm25s.BM25.load(str(directory), load_corpus=False, show_progress=False)
        if index.scores.get("num_docs") != len(checked):
            raise ValueError(
                f"the index in {directory} holds {index.scores.get('num_docs')} documents, docs has {len(checked)}"
            )
        retriever = cls.__new__(cls)
        retriever.docs, retriever._bm25s, retriever._index = checked, bm25s, index
        return retriever

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def search_with_scores(self, queries: list[str], topk: int = 3) -> list[list[tuple[Document, float]]]:
        """Like ``search`` but each hit comes with its BM25 score (> 0)."""
        _check_search_args(queries, topk)
        query_tokens = [[token for token in tokens if token in self._index.vocab_dict]
                        for tokens in self._tokenize(list(queries))] if queries else []
        answerable = [position for position, tokens in enumerate(query_tokens) if tokens]
        results: list[list[tuple[Document, float]]] = [[] for _ in queries]
        if not answerable:
            return results
        k = min(topk, len(self.docs))
        doc_indices, scores = self._index.retrieve([query_tokens[position] for position in answerable],
                                                   k=k, show_progress=False)
        for row, position in enumerate(answerable):
            hits = sorted(((float(score), int(index)) for index, score in zip(doc_indices[row], scores[row])
                           if score > 0), key=lambda hit: (-hit[0], hit[1]))
            results[position] = [(self.docs[index], score) for score, index in hits]
        return results

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Top ``topk`` documents for each query (fewer when fewer documents share a word with it)."""
        return [[doc for doc, _ in hits] for hits in self.search_with_scores(queries, topk)]


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
        _check_search_args(queries, topk)
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
