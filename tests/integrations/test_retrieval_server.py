"""Tests for igpo_rewards.agent.retrieval_server (the igpo-retrieve command), over real HTTP on loopback.

The server runs under uvicorn in a thread (``serve_in_thread``) for the API tests and as the
``igpo-retrieve`` command in a subprocess for the command-line, cache and load tests. Expected
results come from an in-process ``BM25Retriever`` built from the same corpus file.

The load test is small by default; ``IGPO_RETRIEVAL_LOAD_FULL=1`` runs the full size (8 client
threads x 250 requests x 4 queries), ``IGPO_RETRIEVAL_LOAD_SHAPE=threads,requests,queries`` any
size, and ``IGPO_RETRIEVAL_LOAD_REPORT=path.json`` writes the measured throughput and latency
percentiles there (docs/integrations/retrieval_server.md).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.retrieval import Document, HTTPRetriever, RetrievalError, read_corpus_jsonl, write_corpus_jsonl
from igpo_rewards.agent.retrieval_server import (
    ServerLimits,
    _is_loopback,
    create_app,
    load_or_build_index,
    main,
    serve_in_thread,
)
from igpo_rewards.reference_trainer.world import build_world

LIMITS = ServerLimits(max_queries=64, max_query_chars=200, default_topk=3, max_topk=10, max_results=300,
                      max_body_bytes=32 * 1024, body_timeout_s=1.0)
"""Small limits, so that every over-limit request fits in a few kilobytes."""


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def corpus_path(world, tmp_path_factory):
    return write_corpus_jsonl(world.corpus, tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference(corpus_path):
    """The in-process retriever every server answer is compared with."""
    return BM25Retriever(read_corpus_jsonl(corpus_path))


@pytest.fixture(scope="module")
def queries(world):
    """Gold searches and whole questions of the world, plus queries with no hit."""
    pool = [query for example in world.train + world.heldout for query in example.gold_queries]
    pool += [example.question for example in world.train[:40]]
    pool += ["the of is", "zzzz unknownword", "", "Kaleno?! (city)"]
    return list(dict.fromkeys(pool))


@pytest.fixture(scope="module")
def server_url(corpus_path, tmp_path_factory):
    indexed = load_or_build_index(corpus_path, index_dir=tmp_path_factory.mktemp("index"))
    app = create_app(indexed.retriever, limits=LIMITS, corpus_sha256=indexed.corpus_sha256)
    with serve_in_thread(app) as url:
        yield url


def _address(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _request(url, method, path, body=None, headers=None):
    """One HTTP exchange; returns (status, decoded JSON body)."""
    connection = http.client.HTTPConnection(*_address(url), timeout=20)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _post(url, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _request(url, "POST", "/retrieve", body)


def _raw_exchange(url, data):
    """Send raw request bytes on one connection; return (status, decoded JSON body) of the answer.

    Requests here stay under 64 KiB, which uvicorn reads off the socket at once, so a server
    that answers early and closes does not reset the connection under the unread answer."""
    with socket.create_connection(_address(url), timeout=20) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # answered before the end of the upload
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _content_length(answer):
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _healthy(url):
    status, payload = _request(url, "GET", "/health")
    return status == 200 and payload["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# Answers: the same as the in-process retriever, in Search-R1's layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 3, 10])
def test_http_retriever_gets_the_in_process_documents(server_url, reference, queries, topk):
    client = HTTPRetriever(server_url)
    expected = reference.search(queries, topk=topk)
    assert [len(docs) for docs in expected].count(0) >= 3  # the no-hit queries are really in the pool
    size = min(LIMITS.max_queries, LIMITS.max_results // topk)  # requests within the limits
    for start in range(0, len(queries), size):
        batch = queries[start:start + size]
        assert client.search(batch, topk=topk) == expected[start:start + len(batch)]


def test_scores_and_layout_with_return_scores(server_url, reference, queries):
    batch = queries[:50]
    status, payload = _post(server_url, {"queries": batch, "topk": 5, "return_scores": True})
    assert status == 200 and list(payload) == ["result"] and len(payload["result"]) == len(batch)
    for hits, expected in zip(payload["result"], reference.search_with_scores(batch, topk=5)):
        assert all(set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"} for hit in hits)
        assert [hit["document"]["id"] for hit in hits] == [doc.id for doc, _ in expected]
        assert [hit["document"]["contents"] for hit in hits] == [doc.contents for doc, _ in expected]
        assert [hit["score"] for hit in hits] == pytest.approx([score for _, score in expected], rel=1e-6)


def test_without_scores_hits_are_bare_documents_and_topk_defaults(server_url, reference, queries):
    batch = queries[:30]
    status, payload = _post(server_url, {"queries": batch, "return_scores": False, "unknown_key": 1})
    assert status == 200
    expected = reference.search(batch, topk=LIMITS.default_topk)
    assert payload["result"] == [[{"id": doc.id, "contents": doc.contents} for doc in docs] for docs in expected]
    status, default = _post(server_url, {"queries": batch})  # return_scores defaults to false
    assert status == 200 and default == payload


def test_requests_at_the_limits_are_served(server_url, reference):
    batch = [("Kaleno Borania capital " * 10)[:LIMITS.max_query_chars]] * LIMITS.max_queries
    topk = LIMITS.max_results // LIMITS.max_queries
    status, payload = _post(server_url, {"queries": batch, "topk": topk})
    assert status == 200 and len(payload["result"]) == LIMITS.max_queries
    assert [hit["id"] for hit in payload["result"][0]] == [doc.id for doc in reference.search(batch[:1], topk)[0]]


def test_health(server_url, world, corpus_path):
    status, payload = _request(server_url, "GET", "/health")
    assert status == 200
    assert payload["status"] == "ok" and payload["documents"] == len(world.corpus)
    assert payload["corpus_sha256"] == hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    assert payload["limits"]["max_queries"] == LIMITS.max_queries and payload["limits"]["max_topk"] == LIMITS.max_topk


# ---------------------------------------------------------------------------------------------
# Bad requests: a 4xx with a message, and the server keeps serving
# ---------------------------------------------------------------------------------------------

_BAD_BODIES = [
    (b'{"queries": ["Kaleno"', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (b"[" * 5000, 400, "not valid JSON"),
    (b'[["Kaleno"]]', 422, "body: Input should be an object"),
    (b'{"topk": 3}', 422, "queries: Field required"),
    (b'{"queries": "Kaleno"}', 422, "queries: Input should be a valid array"),
    (b'{"queries": ["Kaleno", 7]}', 422, "queries[1]: Input should be a valid string"),
    (b'{"queries": ["Kaleno", null]}', 422, "queries[1]: Input should be a valid string"),
    (b'{"queries": ["Kaleno"], "topk": "3"}', 422, "topk: Input should be a valid integer"),
    (b'{"queries": ["Kaleno"], "topk": 2.5}', 422, "topk: Input should be a valid integer"),
    (b'{"queries": ["Kaleno"], "topk": true}', 422, "topk: Input should be a valid integer"),
    (b'{"queries": ["Kaleno"], "return_scores": "yes"}', 422, "return_scores: Input should be a valid boolean"),
    (b'{"queries": ["Kaleno"], "return_scores": 1}', 422, "return_scores: Input should be a valid boolean"),
    (b'{"queries": []}', 422, "queries must be a non-empty list"),
    (json.dumps({"queries": ["Kaleno"] * 65}).encode(), 422, "at most 64 queries per request, got 65"),
    (json.dumps({"queries": ["Kaleno", "x" * 201]}).encode(), 422, "queries[1] has 201 characters, the limit is 200"),
    (b'{"queries": ["Kaleno"], "topk": 0}', 422, "topk must be in [1, 10], got 0"),
    (b'{"queries": ["Kaleno"], "topk": -1}', 422, "topk must be in [1, 10], got -1"),
    (b'{"queries": ["Kaleno"], "topk": 11}', 422, "topk must be in [1, 10], got 11"),
    (json.dumps({"queries": ["Kaleno"] * 40, "topk": 10}).encode(), 422, "= 400 results, the limit per request is 300"),
]


@pytest.mark.parametrize("body, status, message", _BAD_BODIES, ids=[f"bad{i}" for i in range(len(_BAD_BODIES))])
def test_bad_requests_get_4xx_with_a_message(server_url, body, status, message):
    got_status, payload = _post(server_url, body)
    assert (got_status, list(payload)) == (status, ["detail"])
    assert message in payload["detail"]
    assert _healthy(server_url)


def test_form_content_type_is_still_read_as_json(server_url, reference):
    status, payload = _request(server_url, "POST", "/retrieve", b'{"queries": ["Kaleno"], "topk": 2}',
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert [hit["id"] for hit in payload["result"][0]] == [doc.id for doc in reference.search(["Kaleno"], 2)[0]]


def test_wrong_method_and_path(server_url):
    assert _request(server_url, "GET", "/retrieve")[0] == 405
    assert _request(server_url, "POST", "/search", b"{}")[0] == 404


def test_body_over_the_limit_by_content_length(server_url):
    body = json.dumps({"queries": ["Kaleno Borania"] * 3000}).encode()
    assert LIMITS.max_body_bytes < len(body) < 64 * 1024
    status, payload = _post(server_url, body)
    assert status == 413 and f"limit of {LIMITS.max_body_bytes} bytes (Content-Length: {len(body)})" in payload["detail"]
    # A huge declared length is refused at once, without waiting for a body that never comes.
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    status, payload = _raw_exchange(server_url, head)
    assert status == 413 and "Content-Length: 1000000000000" in payload["detail"]
    assert _healthy(server_url)


def test_streamed_body_over_the_limit(server_url):
    """A chunked upload declares no length: the cap applies while the body streams in."""
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"[" + b'"Kaleno",' * 1000
    request = head + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 4 + b"0\r\n\r\n"
    assert LIMITS.max_body_bytes < 4 * len(chunk) < 64 * 1024
    status, payload = _raw_exchange(server_url, request)
    assert status == 413 and f"larger than the limit of {LIMITS.max_body_bytes} bytes" in payload["detail"]
    assert _healthy(server_url)


def test_a_stalled_body_times_out_without_blocking_others(server_url, reference):
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    answers = []
    stalled = threading.Thread(target=lambda: answers.append(_raw_exchange(server_url, head + b'{"queries"')))
    stalled.start()
    try:
        assert HTTPRetriever(server_url).search(["Kaleno"], topk=2) == reference.search(["Kaleno"], topk=2)
    finally:
        stalled.join(timeout=30)
    ((status, payload),) = answers
    assert status == 408 and "not received within 1 s (10 bytes arrived)" in payload["detail"]


def test_http_retriever_reports_the_servers_message(server_url):
    with pytest.raises(RetrievalError, match="HTTP 422.*at most 64 queries per request, got 65"):
        HTTPRetriever(server_url).search(["Kaleno"] * 65, topk=1)


def test_server_limits_are_validated():
    with pytest.raises(ValueError, match=r"max_topk must be an int >= 1, got 0"):
        ServerLimits(max_topk=0)
    with pytest.raises(ValueError, match=r"default_topk \(5\) must be <= max_topk \(4\)"):
        ServerLimits(default_topk=5, max_topk=4)
    with pytest.raises(ValueError, match="body_timeout_s must be a positive number of seconds, got 0"):
        ServerLimits(body_timeout_s=0)
    with pytest.raises(TypeError, match="limits must be a ServerLimits, got dict"):
        create_app(BM25Retriever([Document("0", "Kaleno", "Kaleno city")]), limits={"max_topk": 3})


def test_loopback_detection():
    assert all(map(_is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(_is_loopback, ["0.0.0.0", "::", "192.168.1.4", "10.0.0.1", "example.org"]))


# ---------------------------------------------------------------------------------------------
# The index cache
# ---------------------------------------------------------------------------------------------


def test_index_is_cached_by_corpus_checksum(tmp_path, world, reference, queries):
    cache = tmp_path / "cache"
    corpus = write_corpus_jsonl(world.corpus, tmp_path / "a.jsonl")
    first = load_or_build_index(corpus, index_dir=cache)
    assert first.built and first.corpus_sha256 == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert first.index_path.parent == cache and first.index_path.name.startswith(first.corpus_sha256)

    second = load_or_build_index(corpus, index_dir=cache)
    assert not second.built and second.index_path == first.index_path
    assert second.retriever.search_with_scores(queries, 5) == reference.search_with_scores(queries, 5)

    same_bytes = tmp_path / "elsewhere" / "b.jsonl"  # the key is the content, not the path
    same_bytes.parent.mkdir()
    shutil.copyfile(corpus, same_bytes)
    assert not load_or_build_index(same_bytes, index_dir=cache).built

    other_k1 = load_or_build_index(corpus, index_dir=cache, k1=1.2)
    assert other_k1.built and other_k1.index_path != first.index_path
    assert other_k1.retriever.search_with_scores(queries, 5) == \
        BM25Retriever(world.corpus, k1=1.2).search_with_scores(queries, 5)

    # Same number of documents, one text changed: a stale index could not find the new word.
    changed_docs = [Document(world.corpus[0].id, world.corpus[0].title, "Quorvantic plinths.")] + world.corpus[1:]
    changed = load_or_build_index(write_corpus_jsonl(changed_docs, corpus), index_dir=cache)
    assert changed.built and changed.index_path != first.index_path
    assert changed.retriever.search(["quorvantic"], topk=3) == [[changed_docs[0]]]
    assert not load_or_build_index(corpus, index_dir=cache).built

    assert sorted(path.name for path in cache.iterdir()) == sorted(
        {first.index_path.name, other_k1.index_path.name, changed.index_path.name})  # no leftovers


def test_damaged_cache_entry_is_rebuilt(tmp_path, world, reference, queries):
    corpus = write_corpus_jsonl(world.corpus, tmp_path / "corpus.jsonl")
    first = load_or_build_index(corpus, index_dir=tmp_path / "cache")
    (first.index_path / "vocab.index.json").write_text("{not json", encoding="utf-8")
    rebuilt = load_or_build_index(corpus, index_dir=tmp_path / "cache")
    assert rebuilt.built and rebuilt.index_path == first.index_path
    assert rebuilt.retriever.search_with_scores(queries, 3) == reference.search_with_scores(queries, 3)
    assert not load_or_build_index(corpus, index_dir=tmp_path / "cache").built


def test_load_or_build_index_rejects_bad_arguments(tmp_path, corpus_path):
    with pytest.raises(ValueError, match=r"k1 must be a number in \[0, inf\], got -1"):
        load_or_build_index(corpus_path, index_dir=tmp_path, k1=-1)
    with pytest.raises(ValueError, match=r"b must be a number in \[0, 1.0\], got 2"):
        load_or_build_index(corpus_path, index_dir=tmp_path, b=2)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_or_build_index(tmp_path / "missing.jsonl", index_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The igpo-retrieve command
# ---------------------------------------------------------------------------------------------


class _Command:
    """``igpo-retrieve serve`` in a subprocess on a free loopback port; its log lines collected."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "igpo_rewards.agent.retrieval_server", "serve",
                                         "--port", "0", *map(str, args)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in self.log):
            try:
                self.log.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise AssertionError(f"igpo-retrieve did not start; log: {self.log}") from None
        self.url = next(line.split(" on ")[1].split()[0] for line in self.log if "serving" in line)

    def _read(self):
        for line in self.process.stderr:
            self.lines.put(line)

    def stop(self) -> int:
        """SIGTERM, as a process manager sends it; uvicorn shuts down gracefully, then (from 0.29 on)
        re-raises the signal, so the exit status is -SIGTERM (0 with older uvicorn)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.reader.join(timeout=10)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        assert any("Finished server process" in line for line in self.log), self.log
        return status


@pytest.fixture(scope="module")
def command_index_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("command_index")


@pytest.fixture(scope="module")
def command_server(corpus_path, command_index_dir):
    """The first start of the command: it builds the index."""
    command = _Command("--corpus", corpus_path, "--index-dir", command_index_dir)
    yield command
    assert command.stop() in (0, -signal.SIGTERM)


def test_command_builds_the_index_and_serves(command_server, reference, queries, corpus_path):
    assert any("built BM25 index of 256 documents" in line for line in command_server.log), command_server.log
    assert command_server.url.startswith("http://127.0.0.1:")
    assert HTTPRetriever(command_server.url).search(queries, topk=3) == reference.search(queries, topk=3)
    status, payload = _request(command_server.url, "GET", "/health")
    assert status == 200 and payload["corpus_sha256"] == hashlib.sha256(corpus_path.read_bytes()).hexdigest()


def test_command_second_start_loads_the_cached_index(command_server, corpus_path, command_index_dir, reference):
    second = _Command("--corpus", corpus_path, "--index-dir", command_index_dir, "--topk", 2, "--topk-max", 2)
    try:
        assert any("loaded cached BM25 index of 256 documents" in line for line in second.log), second.log
        assert not any("built" in line for line in second.log)
        assert HTTPRetriever(second.url).search(["Kaleno"], topk=2) == reference.search(["Kaleno"], topk=2)
        assert _post(second.url, {"queries": ["Kaleno"], "topk": 3})[0] == 422  # --topk-max 2
    finally:
        assert second.stop() in (0, -signal.SIGTERM)


def test_command_errors_exit_nonzero(tmp_path, capsys):
    assert main(["serve", "--corpus", str(tmp_path / "missing.jsonl"), "--index-dir", str(tmp_path)]) == 1
    assert "corpus file not found" in capsys.readouterr().err
    assert main(["serve", "--corpus", str(tmp_path / "missing.jsonl"), "--topk", "9", "--topk-max", "4"]) == 2
    assert "default_topk (9) must be <= max_topk (4)" in capsys.readouterr().err


def test_index_command_builds_the_cache_entry(tmp_path, corpus_path, capsys):
    assert main(["index", "--corpus", str(corpus_path), "--index-dir", str(tmp_path), "--k1", "1.2"]) == 0
    index_path = tmp_path / capsys.readouterr().out.strip()
    sha256 = hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    assert index_path == tmp_path / f"{sha256}_k1-1.2_b-0.75"
    assert json.loads((index_path / "igpo_index.json").read_text()) == {
        "format": 1, "corpus_sha256": sha256, "documents": 256, "k1": 1.2, "b": 0.75}
    assert not load_or_build_index(corpus_path, index_dir=tmp_path, k1=1.2).built


def test_console_script_is_declared():
    (script,) = [entry for entry in importlib.metadata.entry_points(group="console_scripts")
                 if entry.name == "igpo-retrieve"]
    # The script is igpo_rewards._console's wrapper, which loads this module's main (or names
    # the missing `server` extra, tested in tests/trainer/test_smoke.py).
    from igpo_rewards import _console

    assert script.load() is _console.igpo_retrieve
    assert _console._load_main("igpo-retrieve") is main


# ---------------------------------------------------------------------------------------------
# Load: concurrent clients against the command's server
# ---------------------------------------------------------------------------------------------

def _load_shape():
    """(client threads, requests per thread, queries per request): small in CI, 8 x 250 x 4 with
    IGPO_RETRIEVAL_LOAD_FULL=1, any shape with IGPO_RETRIEVAL_LOAD_SHAPE="threads,requests,queries"."""
    if os.environ.get("IGPO_RETRIEVAL_LOAD_SHAPE"):
        shape = tuple(int(part) for part in os.environ["IGPO_RETRIEVAL_LOAD_SHAPE"].split(","))
        assert len(shape) == 3 and min(shape) >= 1, f"IGPO_RETRIEVAL_LOAD_SHAPE must be 3 ints >= 1, got {shape}"
        return shape
    return (8, 250, 4) if os.environ.get("IGPO_RETRIEVAL_LOAD_FULL") == "1" else (4, 25, 4)


LOAD_THREADS, LOAD_REQUESTS, LOAD_QUERIES = _load_shape()


def test_concurrent_clients_get_correct_answers(command_server, reference, queries):
    """LOAD_THREADS clients each send LOAD_REQUESTS requests of LOAD_QUERIES queries (topk 3),
    one connection per request like the trainer's HTTPRetriever; every answer is checked."""
    expected = dict(zip(queries, reference.search(queries, topk=3)))
    latencies: list[list[float]] = [[] for _ in range(LOAD_THREADS)]
    failures: list[str] = []
    start_together = threading.Barrier(LOAD_THREADS + 1)

    def client(thread):
        retriever = HTTPRetriever(command_server.url, timeout=60)
        start_together.wait()
        for request in range(LOAD_REQUESTS):
            first = ((thread * LOAD_REQUESTS + request) * LOAD_QUERIES) % len(queries)
            batch = [queries[(first + offset) % len(queries)] for offset in range(LOAD_QUERIES)]
            started = time.perf_counter()
            try:
                answer = retriever.search(batch, topk=3)
            except RetrievalError as error:
                failures.append(f"thread {thread} request {request}: {error}")
                continue
            latencies[thread].append(time.perf_counter() - started)
            if answer != [expected[query] for query in batch]:
                failures.append(f"thread {thread} request {request}: wrong documents for {batch}")

    threads = [threading.Thread(target=client, args=(thread,)) for thread in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    start_together.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    elapsed = time.perf_counter() - started

    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    all_latencies = np.array([latency for per_thread in latencies for latency in per_thread])
    assert all_latencies.size == LOAD_THREADS * LOAD_REQUESTS
    report = {
        "clients": LOAD_THREADS, "requests": int(all_latencies.size), "queries_per_request": LOAD_QUERIES,
        "documents": len(reference.docs), "seconds": round(elapsed, 3),
        "requests_per_s": round(all_latencies.size / elapsed, 1),
        "queries_per_s": round(all_latencies.size * LOAD_QUERIES / elapsed, 1),
        "p50_ms": round(float(np.percentile(all_latencies, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(all_latencies, 99)) * 1e3, 2),
    }
    print("retrieval server load:", json.dumps(report))
    if os.environ.get("IGPO_RETRIEVAL_LOAD_REPORT"):
        with open(os.environ["IGPO_RETRIEVAL_LOAD_REPORT"], "w", encoding="utf-8") as stream:
            json.dump(report, stream, indent=1)
