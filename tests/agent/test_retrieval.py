"""Tests for igpo_rewards.agent.bm25 (BM25 over documents) and igpo_rewards.agent.retrieval (documents, corpus
files, the Search-R1 HTTP client, observations)."""

import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.retrieval import (
    NO_RESULTS,
    Document,
    HTTPRetriever,
    RetrievalError,
    Retriever,
    format_observation,
    read_corpus_jsonl,
    write_corpus_jsonl,
)

DOCS = [
    Document("0", "Kaleno", "Kaleno is a city in Borania. Kaleno is known for its bridges."),
    Document("1", "Borania", "Borania is a country. The capital of Borania is Kaleno."),
    Document("2", "Mira Tosk", "Mira Tosk was born in Velum. Mira Tosk works for Dara Labs."),
    Document("3", "Velum", "Velum is a city in Borania."),
    Document("4", "Dara Labs", "Dara Labs is an organisation based in Kaleno."),
]
STOPWORDS = {"is", "a", "in", "the", "of", "for", "an", "was"}  # all in bm25s's English list


def _words(text):
    return [word for word in re.findall(r"\b\w\w+\b", text.lower()) if word not in STOPWORDS]


def _lucene_bm25(query, docs, k1=1.5, b=0.75):
    """Lucene BM25 written from its definition: sum over query words of idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))."""
    texts = [_words(doc.title + "\n" + doc.text) for doc in docs]
    average_length = sum(map(len, texts)) / len(texts)
    scores = []
    for words in texts:
        score = 0.0
        for term in set(_words(query)):
            df = sum(term in other for other in texts)
            if df == 0:
                continue
            idf = math.log(1 + (len(texts) - df + 0.5) / (df + 0.5))
            tf = words.count(term)
            score += idf * tf / (tf + k1 * (1 - b + b * len(words) / average_length))
        scores.append(score)
    return scores


# ---------------------------------------------------------------------------------------------
# BM25Retriever
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(DOCS)


def test_bm25_is_a_retriever(bm25):
    assert isinstance(bm25, Retriever)
    assert isinstance(HTTPRetriever("http://127.0.0.1:1"), Retriever)


@pytest.mark.parametrize("query", ["Kaleno", "Borania capital", "Mira Tosk", "city Borania bridges", "Dara Labs Kaleno"])
def test_bm25_scores_match_the_lucene_formula(bm25, query):
    expected = _lucene_bm25(query, DOCS)
    ranking = sorted((index for index, score in enumerate(expected) if score > 0), key=lambda index: (-expected[index], index))
    (hits,) = bm25.search_with_scores([query], topk=len(DOCS))
    assert [doc.id for doc, _ in hits] == [DOCS[index].id for index in ranking]
    assert [score for _, score in hits] == pytest.approx([expected[index] for index in ranking], rel=1e-5)


def test_bm25_batch_topk_and_empty_queries(bm25):
    results = bm25.search(["Borania", "the of", "zzzz unknown", "Velum", ""], topk=2)
    assert [[doc.id for doc in docs] for docs in results] == [["1", "3"], [], [], ["3", "2"], []]
    assert bm25.search([], topk=3) == []
    # topk larger than the corpus: every document sharing a word, nothing else
    (velum,) = bm25.search(["Velum"], topk=50)
    assert sorted(doc.id for doc in velum) == ["2", "3"]


def test_bm25_ties_follow_corpus_order():
    docs = [Document(str(index), f"t{index}", "same words here") for index in range(4)]
    (hits,) = BM25Retriever(docs).search(["words"], topk=3)
    assert [doc.id for doc in hits] == ["0", "1", "2"]


@pytest.mark.parametrize("queries, topk, error, message", [
    ("Kaleno", 3, TypeError, "queries must be a list of str, got str"),
    (["Kaleno", 3], 3, TypeError, "queries[1] must be a str, got int"),
    (["Kaleno"], 0, ValueError, "topk must be >= 1, got 0"),
    (["Kaleno"], 2.5, TypeError, "topk must be an int, got float"),
])
def test_search_argument_errors(bm25, queries, topk, error, message):
    with pytest.raises(error, match=re.escape(message)):
        bm25.search(queries, topk=topk)
    with pytest.raises(error, match=re.escape(message)):
        HTTPRetriever("http://127.0.0.1:1").search(queries, topk=topk)


def test_bm25_constructor_errors():
    with pytest.raises(ValueError, match="docs must be a non-empty list of Document"):
        BM25Retriever([])
    with pytest.raises(TypeError, match=r"docs\[1\] must be a Document, got str"):
        BM25Retriever([DOCS[0], "text"])


def test_saved_index_loads_to_the_same_results(bm25, tmp_path):
    bm25.save_index(tmp_path / "index")
    loaded = BM25Retriever.from_saved_index(DOCS, tmp_path / "index")
    queries = ["Borania capital", "Mira Tosk Dara", "Velum", "zzzz"]
    assert loaded.search_with_scores(queries, topk=3) == bm25.search_with_scores(queries, topk=3)
    with pytest.raises(ValueError, match=r"holds 5 documents, docs has 4"):
        BM25Retriever.from_saved_index(DOCS[:4], tmp_path / "index")
    with pytest.raises(TypeError, match=r"docs\[0\] must be a Document"):
        BM25Retriever.from_saved_index(["text"], tmp_path / "index")


# ---------------------------------------------------------------------------------------------
# format_observation
# ---------------------------------------------------------------------------------------------


def test_format_observation_search_r1_layout():
    assert format_observation(DOCS[:2]) == (
        'Doc 1(Title: "Kaleno") Kaleno is a city in Borania. Kaleno is known for its bridges.\n'
        'Doc 2(Title: "Borania") Borania is a country. The capital of Borania is Kaleno.')
    assert format_observation([]) == NO_RESULTS == "No documents found."


# ---------------------------------------------------------------------------------------------
# HTTPRetriever against a real local server
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Search-R1 /retrieve served from a BM25Retriever; ``server.mode`` injects failures."""

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, request))
        mode = self.server.mode
        if self.path != "/retrieve":
            return self._send(404, b'{"detail": "Not Found"}')
        if mode == "error":
            return self._send(500, b"internal failure")
        if mode == "not_json":
            return self._send(200, b"<html>oops</html>")
        if mode == "slow":
            time.sleep(0.6)
        hits = self.server.bm25.search_with_scores(request["queries"], topk=request["topk"])
        result = [[{"document": {"id": doc.id, "contents": doc.contents}, "score": score} for doc, score in row]
                  for row in hits]
        if mode == "wrong_count":
            result = result[:-1]
        if mode == "no_contents":
            result = [[{"document": {"id": "0"}, "score": 1.0}] for _ in result]
        if mode == "bare_documents":  # return_scores=false layout, and more hits than asked
            result = [[{"id": doc.id, "contents": doc.contents} for doc in DOCS] for _ in result]
        return self._send(200, json.dumps({"result": result}).encode())


@pytest.fixture
def server(bm25):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.bm25, httpd.mode, httpd.requests = bm25, "ok", []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_http_retriever_matches_bm25(server, bm25):
    queries = ["Borania capital", "Mira Tosk", "the of", "Velum"]
    remote = HTTPRetriever(_url(server), timeout=5).search(queries, topk=2)
    assert remote == bm25.search(queries, topk=2)
    assert remote[1][0] == DOCS[2]  # title and text parsed back from contents
    assert server.requests == [("/retrieve", {"queries": queries, "topk": 2, "return_scores": True})]


def test_http_retriever_url_forms_and_bare_documents(server):
    retriever = HTTPRetriever(_url(server) + "/retrieve/", timeout=5)
    assert retriever.url == _url(server) + "/retrieve"
    server.mode = "bare_documents"
    assert retriever.search(["Kaleno"], topk=2) == [DOCS[:2]]


def test_http_retriever_sends_nothing_for_no_queries(server):
    assert HTTPRetriever(_url(server)).search([]) == []
    assert server.requests == []


@pytest.mark.parametrize("mode, message", [
    ("error", "answered HTTP 500"),
    ("not_json", "answered non-JSON: b'<html>oops</html>'"),
    ("wrong_count", 'must answer {"result": [one list per query]} for 2 queries'),
    ("no_contents", "result[0][0] has no string 'contents'"),
])
def test_http_retriever_bad_responses(server, mode, message):
    server.mode = mode
    with pytest.raises(RetrievalError, match=re.escape(message)):
        HTTPRetriever(_url(server), timeout=5).search(["Kaleno", "Velum"], topk=2)


def test_http_retriever_wrong_path_is_an_http_error(server):
    retriever = HTTPRetriever(_url(server) + "/retrieve", timeout=5)
    retriever.url = _url(server) + "/search"
    with pytest.raises(RetrievalError, match="answered HTTP 404"):
        retriever.search(["Kaleno"])


def test_http_retriever_timeout(server):
    server.mode = "slow"
    with pytest.raises(RetrievalError, match=r"did not answer within 0.2 s"):
        HTTPRetriever(_url(server), timeout=0.2).search(["Kaleno"])


def test_http_retriever_connection_refused():
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RetrievalError, match=f"cannot reach retrieval server http://127.0.0.1:{port}/retrieve"):
        HTTPRetriever(f"http://127.0.0.1:{port}", timeout=5).search(["Kaleno"])


@pytest.mark.parametrize("url, timeout, message", [
    ("127.0.0.1:8000", 5, "url must be an http:// or https:// URL, got '127.0.0.1:8000'"),
    ("http://127.0.0.1:8000", 0, "timeout must be a positive number of seconds, got 0"),
])
def test_http_retriever_constructor_errors(url, timeout, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HTTPRetriever(url, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Corpus IO
# ---------------------------------------------------------------------------------------------


def test_document_contents_round_trip():
    doc = Document(id="3", title="Mira Tosk", text='Line one.\nLine "two".')
    assert doc.contents == '"Mira Tosk"\nLine one.\nLine "two".'
    assert Document.from_contents("3", doc.contents) == doc
    assert Document.from_contents(5, "no title line") == Document("5", "no title line", "")
    assert Document.from_contents("1", "Unquoted title\ntext") == Document("1", "Unquoted title", "text")
    with pytest.raises(TypeError, match="contents must be a str, got int"):
        Document.from_contents("1", 7)


def test_corpus_jsonl_round_trip(tmp_path):
    docs = [*DOCS, Document("5", 'Quoted "title"', 'Line one.\nLine "two", Frànce 🙂')]
    path = write_corpus_jsonl(docs, tmp_path / "sub" / "corpus.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(docs)
    assert json.loads(lines[0]) == {"id": "0", "contents": '"Kaleno"\nKaleno is a city in Borania. Kaleno is known for its bridges.'}
    assert read_corpus_jsonl(path) == docs


def test_read_corpus_accepts_int_ids_blank_lines_and_extra_keys(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": 0, "contents": "\\"A\\"\\ntext a", "title": "ignored"}\n\n'
                    '{"id": "x", "contents": "\\"B\\"\\ntext b"}\n', encoding="utf-8")
    assert read_corpus_jsonl(path) == [Document("0", "A", "text a"), Document("x", "B", "text b")]


@pytest.mark.parametrize("content, error, message", [
    ("", ValueError, "is empty"),
    ("\n  \n", ValueError, "is empty"),
    ('{"id": "0", "contents": "a"}\n{"id": "1", "contents": \n', ValueError, "corpus.jsonl:2: not valid JSON"),
    ('["0", "a"]\n', ValueError, "corpus.jsonl:1: expected a JSON object, got list"),
    ('{"id": "0", "text": "a"}\n', ValueError, "corpus.jsonl:1: missing key(s) ['contents']; keys present: ['id', 'text']"),
    ('{"id": "0", "contents": 3}\n', ValueError, "corpus.jsonl:1: contents must be a string, got int"),
    ('{"id": null, "contents": "a"}\n', ValueError, "corpus.jsonl:1: id must be a string or an int, got None"),
    ('{"id": "0", "contents": "a"}\n{"id": "0", "contents": "b"}\n', ValueError, "corpus.jsonl:2: duplicate document id '0'"),
])
def test_read_corpus_errors(tmp_path, content, error, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=re.escape(message)):
        read_corpus_jsonl(path)


def test_read_corpus_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*nope.jsonl"):
        read_corpus_jsonl(tmp_path / "nope.jsonl")


def test_write_corpus_rejects_non_documents(tmp_path):
    with pytest.raises(TypeError, match=r"docs\[1\] must be a Document, got dict"):
        write_corpus_jsonl([Document("0", "a", "b"), {"id": "1"}], tmp_path / "c.jsonl")
