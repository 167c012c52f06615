"""An in-process search engine: BM25 (bm25s) over a list of documents.

``BM25Retriever`` implements ``igpo_rewards.agent.retrieval.Retriever``
(``search(queries, topk) -> list[list[Document]]``): a bm25s index over the documents' titles
and texts (English stopwords removed, no stemming). Like Lucene, it only returns documents that
share at least one word with the query, so a query made only of stopwords or unknown words
returns []. The reference trainer searches with it in process; ``igpo-retrieve``
(``igpo_rewards.agent.retrieval_server``) serves the same index over HTTP to
``igpo_rewards.agent.retrieval.HTTPRetriever``.

Needs bm25s (the ``server`` and ``trainer`` extras); it is imported when a retriever is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from igpo_rewards.agent.retrieval import Document, check_search_args

__all__ = ["BM25Retriever"]


def _checked_docs(docs: Any) -> list[Document]:
    if not isinstance(docs, (list, tuple)) or not docs:
        raise ValueError(f"docs must be a non-empty list of Document, got {type(docs).__name__} "
                         f"of length {len(docs) if hasattr(docs, '__len__') else '?'}")
    for position, doc in enumerate(docs):
        if not isinstance(doc, Document):
            raise TypeError(f"docs[{position}] must be a Document, got {type(doc).__name__}")
    return list(docs)


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
        check_search_args(queries, topk)
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
