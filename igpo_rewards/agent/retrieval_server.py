"""A Search-R1 compatible retrieval server: BM25 (bm25s) over a jsonl corpus, behind FastAPI.

The ``igpo-retrieve`` command (the ``server`` extra, ``pip install "igpo-rewards[server] @ git+$IGPO_GIT"``; also
``python -m igpo_rewards.agent.retrieval_server``):

    igpo-retrieve serve --corpus corpus.jsonl [--host 127.0.0.1] [--port 8000] [--index-dir DIR]
    igpo-retrieve index --corpus corpus.jsonl [--index-dir DIR]     # build the cached index and exit

API (the one Search-R1's ``retrieval_server.py`` serves, so its trainers and ours can use it):

    POST /retrieve  {"queries": [str, ...], "topk": int (optional), "return_scores": bool (optional, false)}
      return_scores=true  -> {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
      return_scores=false -> {"result": [[{"id": str, "contents": str}, ...], ...]}
    GET /health     -> {"status": "ok", "documents": N, "corpus_sha256": ..., "limits": {...}}

One result list per query, best first, at most ``topk`` hits; like Lucene, a document is a hit
only if it shares a word with the query, so a query of stopwords or unknown words gets [].
``contents`` is the corpus line's ``'"Title"\\ntext'``. ``igpo_rewards.agent.retrieval.HTTPRetriever``
is a client of this API.

The bm25s index is built once and cached in ``--index-dir`` (default ``default_index_dir()``:
``$XDG_CACHE_HOME/igpo-rewards/bm25s``, else ``~/.cache/igpo-rewards/bm25s``), in a folder named by
the corpus file's SHA-256 and the BM25 parameters; a later start with the same corpus bytes
loads it, a changed corpus gets a new folder (old folders are left for the user to delete).

Safe by default: binds 127.0.0.1; every request is bounded (``ServerLimits``): body bytes
(checked on Content-Length before reading and again while streaming, 413), the time to
receive the body (408), queries per request, characters per query, topk and hits per request
(422). Malformed JSON is a 400, a wrong type a 422, each with a readable ``detail`` message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

# Without the `server` extra these imports fail; the `igpo-retrieve` console script
# (igpo_rewards._console) turns that into a message naming the extra.
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from igpo_rewards.agent.bm25 import BM25Retriever
from igpo_rewards.agent.retrieval import Document, read_corpus_jsonl

__all__ = [
    "INDEX_FORMAT",
    "IndexedCorpus",
    "RetrieveRequest",
    "ServerLimits",
    "bind_socket",
    "corpus_sha256",
    "create_app",
    "default_index_dir",
    "load_or_build_index",
    "main",
    "serve_in_thread",
]

logger = logging.getLogger("igpo_retrieve")

INDEX_FORMAT = 1
"""Version of the cache layout; a cached index written under another version is rebuilt."""

_META_NAME = "igpo_index.json"


# ---------------------------------------------------------------------------------------------
# The index cache
# ---------------------------------------------------------------------------------------------


def corpus_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_index_dir() -> Path:
    """Where indexes are cached when no ``index_dir`` is given: ``$XDG_CACHE_HOME/igpo-rewards/bm25s``
    (``~/.cache/igpo-rewards/bm25s`` when XDG_CACHE_HOME is unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "igpo-rewards" / "bm25s"


class IndexedCorpus(NamedTuple):
    """What ``load_or_build_index`` returns."""

    retriever: BM25Retriever
    """Searches the corpus (``search`` / ``search_with_scores``)."""
    index_path: Path
    """The cache folder holding the bm25s index."""
    corpus_sha256: str
    """SHA-256 of the corpus file the index was built from."""
    built: bool
    """True when the index was built by this call, False when it was loaded from the cache."""


def _index_meta(sha256: str, num_documents: int, k1: float, b: float) -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "corpus_sha256": sha256, "documents": num_documents, "k1": k1, "b": b}


def _load_cached(index_path: Path, docs: list[Document], expected_meta: dict[str, Any]) -> BM25Retriever | None:
    """The cached retriever, or None when the folder is missing, incomplete or for other settings."""
    meta_path = index_path / _META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta != expected_meta:
            logger.warning("cached index %s was written for %s, not %s; rebuilding", index_path, meta, expected_meta)
            return None
        return BM25Retriever.from_saved_index(docs, index_path)
    except Exception as error:  # a damaged or mismatched cache is rebuilt, never fatal
        logger.warning("cannot load cached index %s (%s: %s); rebuilding", index_path, type(error).__name__, error)
        return None


def load_or_build_index(corpus_path: str | Path, *, index_dir: str | Path | None = None,
                        k1: float = 1.5, b: float = 0.75) -> IndexedCorpus:
    """Read a Search-R1 corpus jsonl and load its bm25s index from the cache, building it on a miss.

    The cache entry is ``index_dir / f"{sha256}_k1-{k1}_b-{b}"``: the same corpus bytes and BM25
    parameters load it, anything else builds a new entry. An entry is written to a temporary
    folder and renamed into place, so a crash mid-build leaves no half-written entry, and two
    processes building the same entry at once both end up using one complete copy. An entry
    that cannot be loaded (damaged files, other settings) is rebuilt.

    Args:
        corpus_path: the corpus, one ``{"id", "contents"}`` JSON object per line (``read_corpus_jsonl``).
        index_dir: the cache folder (created if needed); default ``default_index_dir()``.
        k1, b: the BM25 parameters, as in ``BM25Retriever``.

    Returns:
        ``IndexedCorpus(retriever, index_path, corpus_sha256, built)``; the retriever answers
        exactly like ``BM25Retriever(read_corpus_jsonl(corpus_path), k1=k1, b=b)``.

    Raises:
        FileNotFoundError / ValueError: from ``read_corpus_jsonl`` (missing file, bad lines).
        ValueError: k1 or b not a finite number >= 0 (b at most 1).
    """
    for name, value, upper in (("k1", k1, float("inf")), ("b", b, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
            raise ValueError(f"{name} must be a number in [0, {upper}], got {value!r}")
    corpus_path = Path(corpus_path)
    docs = read_corpus_jsonl(corpus_path)
    sha256 = corpus_sha256(corpus_path)
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
    index_path = index_dir / f"{sha256}_k1-{float(k1):g}_b-{float(b):g}"
    expected_meta = _index_meta(sha256, len(docs), float(k1), float(b))

    retriever = _load_cached(index_path, docs, expected_meta)
    if retriever is not None:
        logger.info("loaded cached BM25 index of %d documents from %s", len(docs), index_path)
        return IndexedCorpus(retriever, index_path, sha256, built=False)

    start = time.perf_counter()
    retriever = BM25Retriever(docs, k1=float(k1), b=float(b))
    index_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=index_dir))
    try:
        retriever.save_index(staging)
        (staging / _META_NAME).write_text(json.dumps(expected_meta, indent=1), encoding="utf-8")
        if index_path.exists():  # a damaged or outdated entry: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=index_dir))
            index_path.rename(stale / "entry")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(index_path)
        except OSError:  # another process renamed its copy into place first: keep theirs
            if not (index_path / _META_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built BM25 index of %d documents in %.1f s, cached in %s",
                len(docs), time.perf_counter() - start, index_path)
    return IndexedCorpus(retriever, index_path, sha256, built=True)


# ---------------------------------------------------------------------------------------------
# The HTTP service
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on every request; a request beyond one gets a 4xx answer naming the limit.

    Attributes:
        max_queries: queries in one request. Search-R1 sends all the live rollouts' queries of a
            turn in one request (batch size x group size), hence the generous default.
        max_query_chars: characters in one query.
        default_topk: topk of a request that gives none (Search-R1's server default is 3).
        max_topk: the largest topk accepted.
        max_results: queries x topk in one request, which bounds the response size.
        max_body_bytes: request body size; checked on Content-Length before the body is read
            and again while it streams in (chunked uploads). Over it: 413.
        body_timeout_s: seconds allowed to receive the whole body. Over it: 408.
    """

    max_queries: int = 4096
    max_query_chars: int = 1024
    default_topk: int = 3
    max_topk: int = 50
    max_results: int = 65536
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("max_queries", "max_query_chars", "default_topk", "max_topk", "max_results", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be an int >= 1, got {value!r}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"ServerLimits.default_topk ({self.default_topk}) must be <= max_topk ({self.max_topk})")
        timeout = self.body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"ServerLimits.body_timeout_s must be a positive number of seconds, got {timeout!r}")


class RetrieveRequest(BaseModel):
    """The body of POST /retrieve. Strict types: "3" is not a topk, 1 is not a boolean.
    Unknown keys are ignored, as by Search-R1's server."""

    model_config = ConfigDict(strict=True)

    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


class _BodyLimit:
    """ASGI middleware: read the whole request body up to ``max_body_bytes`` within ``timeout_s``
    before the application sees it; answer 413 (too large, by Content-Length or while
    streaming) or 408 (too slow) itself, so the application never waits on a client."""

    def __init__(self, app: Any, *, max_body_bytes: int, timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s

    async def _reject(self, scope: Any, receive: Any, send: Any, status: int, detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than the limit of {self.max_body_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(scope, receive, send, 400, f"invalid Content-Length header {declared[:40]!r}")
                return
            if int(declared) > self.max_body_bytes:
                await self._reject(scope, receive, send, 413, too_large + f" (Content-Length: {int(declared)})")
                return
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                await self._reject(scope, receive, send, 408,
                                   f"request body not received within {self.timeout_s:g} s ({size} bytes arrived)")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _location(error: dict[str, Any]) -> str:
    """'queries[3]' for pydantic's loc ('queries', 3)."""
    text = ""
    for part in error.get("loc", ()):
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "body"


def _parse_request(body: bytes) -> RetrieveRequest:
    """Validate a /retrieve body; HTTPException 400 (not JSON) or 422 (wrong shape or types)."""
    try:
        return RetrieveRequest.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        for item in errors:
            if item.get("type") == "json_invalid":
                reason = (item.get("ctx") or {}).get("error", "")
                raise HTTPException(400, f"request body is not valid JSON: {reason}".rstrip(": ")) from None
        shown = "; ".join(f"{_location(item)}: {item.get('msg', 'invalid')}" for item in errors[:5])
        more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
        raise HTTPException(422, f"invalid request: {shown}{more}") from None


def create_app(retriever: BM25Retriever, *, limits: ServerLimits = ServerLimits(),
               corpus_sha256: str | None = None) -> FastAPI:
    """The FastAPI application serving ``retriever`` on POST /retrieve and GET /health.

    Args:
        retriever: answers the queries (``search_with_scores``); it is only read, so
            concurrent requests may share it.
        limits: the request bounds (see ``ServerLimits``).
        corpus_sha256: reported by /health so clients can tell which corpus they talk to.

    Run it with uvicorn (``main`` / ``serve_in_thread``), or any ASGI server.
    """
    if not isinstance(limits, ServerLimits):
        raise TypeError(f"limits must be a ServerLimits, got {type(limits).__name__}")
    if not callable(getattr(retriever, "search_with_scores", None)):
        raise TypeError(f"retriever must have a search_with_scores method, got {type(retriever).__name__}")
    app = FastAPI(title="igpo-retrieve", summary="Search-R1 compatible BM25 retrieval",
                  docs_url=None, redoc_url=None, openapi_url=None)
    num_documents = len(retriever.docs) if hasattr(retriever, "docs") else None

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "documents": num_documents, "corpus_sha256": corpus_sha256, "limits": asdict(limits)}

    @app.post("/retrieve")
    async def retrieve(http_request: Request) -> JSONResponse:
        # The body is parsed as JSON whatever its Content-Type (curl -d sends a form type).
        request = _parse_request(await http_request.body())
        queries = request.queries
        topk = limits.default_topk if request.topk is None else request.topk
        if not queries:
            raise HTTPException(422, "queries must be a non-empty list of strings, got []")
        if len(queries) > limits.max_queries:
            raise HTTPException(422, f"at most {limits.max_queries} queries per request, got {len(queries)}")
        for position, query in enumerate(queries):
            if len(query) > limits.max_query_chars:
                raise HTTPException(422, f"queries[{position}] has {len(query)} characters, "
                                         f"the limit is {limits.max_query_chars}")
        if not 1 <= topk <= limits.max_topk:
            raise HTTPException(422, f"topk must be in [1, {limits.max_topk}], got {topk}")
        if len(queries) * topk > limits.max_results:
            raise HTTPException(422, f"{len(queries)} queries x topk {topk} = {len(queries) * topk} results, "
                                     f"the limit per request is {limits.max_results}")
        hits = await run_in_threadpool(retriever.search_with_scores, queries, topk)
        if request.return_scores:
            result = [[{"document": {"id": doc.id, "contents": doc.contents}, "score": score} for doc, score in row]
                      for row in hits]
        else:
            result = [[{"id": doc.id, "contents": doc.contents} for doc, _ in row] for row in hits]
        return JSONResponse({"result": result})

    app.add_middleware(_BodyLimit, max_body_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free port (read it back with getsockname)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: Any, *, max_connections: int, log_level: str) -> "uvicorn.Config":
    # limit_concurrency: connections beyond it get 503 instead of queueing without bound.
    return uvicorn.Config(app, log_level=log_level, access_log=False, limit_concurrency=max_connections,
                          timeout_keep_alive=5, server_header=False)


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, max_connections: int = 256,
                    log_level: str = "warning", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL ("http://127.0.0.1:PORT").

    The server stops (open connections are closed) when the ``with`` block ends.

    Raises:
        RuntimeError: the server did not start within ``startup_timeout_s``.
    """
    sock = bind_socket(host, port)
    server = uvicorn.Server(_uvicorn_config(app, max_connections=max_connections, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="igpo-retrieve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the retrieval server on {_url(sock)} did not start within {startup_timeout_s} s")
            time.sleep(0.01)
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    defaults = ServerLimits()
    parser = argparse.ArgumentParser(prog="igpo-retrieve", description=(
        "Search-R1 compatible BM25 retrieval server (POST /retrieve, GET /health) over a jsonl corpus."))
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "build or load the index, then serve it over HTTP"),
                            ("index", "build the cached index (if needed) and exit")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--corpus", required=True, type=Path,
                             help='Search-R1 corpus jsonl, one {"id", "contents"} object per line')
        command.add_argument("--index-dir", type=Path, default=None,
                             help=f"index cache folder (default: {default_index_dir()})")
        command.add_argument("--k1", type=float, default=1.5, help="BM25 k1 (default: 1.5)")
        command.add_argument("--b", type=float, default=0.75, help="BM25 b (default: 0.75)")
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        if name == "serve":
            command.add_argument("--host", default="127.0.0.1",
                                 help="address to bind (default: 127.0.0.1; the server has no authentication)")
            command.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
            command.add_argument("--topk", type=int, default=defaults.default_topk,
                                 help=f"topk of requests that give none (default: {defaults.default_topk})")
            command.add_argument("--topk-max", type=int, default=defaults.max_topk,
                                 help=f"largest topk accepted (default: {defaults.max_topk})")
            command.add_argument("--max-queries", type=int, default=defaults.max_queries,
                                 help=f"queries per request (default: {defaults.max_queries})")
            command.add_argument("--max-query-chars", type=int, default=defaults.max_query_chars,
                                 help=f"characters per query (default: {defaults.max_query_chars})")
            command.add_argument("--max-results", type=int, default=defaults.max_results,
                                 help=f"queries x topk per request (default: {defaults.max_results})")
            command.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                                 help=f"request body bytes (default: {defaults.max_body_bytes})")
            command.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                                 help=f"seconds to receive a request body (default: {defaults.body_timeout_s:g})")
            command.add_argument("--max-connections", type=int, default=256,
                                 help="concurrent connections; more get 503 (default: 256)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``igpo-retrieve`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,  # other libraries: warnings only
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    if args.command == "serve":  # check the limits before spending time on the index
        try:
            limits = ServerLimits(max_queries=args.max_queries, max_query_chars=args.max_query_chars,
                                  default_topk=args.topk, max_topk=args.topk_max, max_results=args.max_results,
                                  max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout)
        except ValueError as error:
            print(f"igpo-retrieve: {error}", file=sys.stderr)
            return 2
    try:
        indexed = load_or_build_index(args.corpus, index_dir=args.index_dir, k1=args.k1, b=args.b)
    except (OSError, ValueError) as error:
        print(f"igpo-retrieve: {error}", file=sys.stderr)
        return 1
    if args.command == "index":
        print(indexed.index_path)
        return 0

    try:
        sock = bind_socket(args.host, args.port)
    except (OSError, ValueError) as error:
        print(f"igpo-retrieve: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    if not _is_loopback(args.host):
        logger.warning("listening on %s, which is reachable from other machines; the server has no "
                       "authentication, so keep it behind a firewall", args.host)
    app = create_app(indexed.retriever, limits=limits, corpus_sha256=indexed.corpus_sha256)
    server = uvicorn.Server(_uvicorn_config(app, max_connections=args.max_connections, log_level=args.log_level))
    logger.info("serving %d documents on %s (POST /retrieve, GET /health)", len(indexed.retriever.docs), _url(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
