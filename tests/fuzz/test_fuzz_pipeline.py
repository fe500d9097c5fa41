"""R13: hypothesis over the request pipeline (head builder, downstream protocol, exchange, upstream write).

Invariants for any input, split into reads at any points:
- the proxy logs no error (no unexpected exception anywhere on the data path);
- what it writes to the client parses as HTTP/1.1 responses whose statuses are 200 (forwarded)
  or one of the codec errors; after a codec error the connection is closed;
- everything it sent upstream re-parses identically with h11, with one framing header at most;
- build_request_head returns a RequestHead or raises ProtocolError, nothing else.

Inputs: a grammar of near-valid requests (framing, Host, versions, control characters, pipelining),
and byte-level mutations of the corpus. Crashers are kept in tests/corpus/fuzz/pipeline/ and
replayed first (test_regression_corpus). MESHPROXY_SOAK=1 runs many more examples.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.inmemory import Outcome, Pipeline
from meshproxy.http1.errors import ProtocolError
from meshproxy.http1.head import build_request_head
from meshproxy.messages import RequestHead

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
REGRESSIONS = CORPUS / "fuzz" / "pipeline"
SOAK = os.environ.get("MESHPROXY_SOAK") == "1"
EXAMPLES = 3000 if SOAK else 120
ALLOWED = {200, 400, 403, 408, 413, 431, 501, 505}
pytestmark = pytest.mark.timeout(3600 if SOAK else 120)  # a soak runs far past the CI per-test limit
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SOAK, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# ---- strategies

TOKENS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"get", b"G(T", b"PRI"]
TARGETS = [b"/", b"/a/b?c=d", b"/a/../b", b"*", b"http://svc/x", b"https://svc/", b"svc:80", b"//x", b"/%zz",
           b"/a#f", b"http://u@svc/", b"/\x7f", b"/ /", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Upgrade", b"X_Under",
         b"x-envoy-retry-on", b"Trailer", b"TE", b"Keep-Alive", b"X-A", b"Host ", b"", b"X\x00", b"Content_Length"]
VALUES = [b"svc", b"svc:80", b"evil", b"a b", b"5", b"0", b"-1", b"0x5", b"chunked", b"identity", b"gzip, chunked",
          b",chunked", b"close", b"keep-alive, X-A", b"upgrade", b"h2c", b"websocket", b"100-continue", b"",
          b"a\x85\xa0", b"a\rb", b"a\nb", b"a\x00b", b" v ", b"\tchunked", b"99999999999999999999"]
EOLS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"]


@st.composite
def request(draw: st.DrawFn) -> bytes:
    eol = lambda: draw(st.sampled_from(EOLS))  # noqa: E731
    method = draw(st.sampled_from(TOKENS) | st.binary(max_size=6))
    target = draw(st.sampled_from(TARGETS) | st.binary(max_size=12))
    version = draw(st.sampled_from(VERSIONS))
    line = method + b" " + target + (b" " + version if version else b"") + eol()
    headers = [(b"Host", b"svc")] if draw(st.booleans()) else []
    extra = draw(st.lists(st.tuples(st.sampled_from(NAMES) | st.binary(max_size=8),
                                    st.sampled_from(VALUES) | st.binary(max_size=12)), max_size=5))
    headers += extra
    head = line + b"".join(n + b":" + draw(st.sampled_from([b" ", b"", b"\t", b"  "])) + v + eol()
                           for n, v in headers) + eol()
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"5\r\nhel",
                                 b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n", b"zz\r\n"]) | st.binary(max_size=20))
    return head + body


@st.composite
def pipelined(draw: st.DrawFn) -> bytes:
    return b"".join(draw(st.lists(request(), min_size=1, max_size=3)))


def _corpus_requests() -> list[bytes]:
    doc = json.loads((CORPUS / "http1" / "requests.json").read_text())
    return [c["request"].encode("latin-1") for c in doc["cases"] if len(c["request"]) < 4096]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_corpus_requests())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data)))
        if kind == 0:  # insert
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"\t", b",", b"_"])
                               | st.binary(min_size=1, max_size=4))
        elif kind == 1 and data:  # delete
            del data[at:at + draw(st.integers(1, 4))]
        elif data:  # replace one byte
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    if len(data) < 2 or draw(st.booleans()):
        return [data]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=6))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# ---- the checks


def check(outcome: Outcome, data: bytes, pipeline: Pipeline) -> None:
    assert not outcome.errors, outcome.errors
    statuses = outcome.statuses()
    if b"HEAD" not in data:  # a HEAD response has no body: the simple parser here would misread what follows
        assert -1 not in statuses, outcome.out[:500]
        assert set(statuses) <= ALLOWED, (statuses, outcome.out[:500])
        if statuses and statuses[-1] != 200:
            assert outcome.closed, outcome.out[-300:]  # codec error: the connection closes
    assert pipeline.differential() == []
    for seen in outcome.seen:
        names = [n for n, _ in seen.headers]
        assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1, seen.headers
        if (b"upgrade", b"websocket") in seen.headers:  # a WebSocket upgrade asks for it again, and only that
            assert names.count(b"upgrade") == 1 and seen.headers.count((b"connection", b"upgrade")) == 1, seen.headers
            assert names.count(b"connection") == 1, seen.headers
        else:
            assert b"upgrade" not in names and b"connection" not in names, seen.headers


@pytest.fixture(scope="module")
def pipeline() -> Iterator[tuple[asyncio.AbstractEventLoop, Pipeline]]:
    loop = uvloop.new_event_loop()
    p = Pipeline()
    loop.run_until_complete(p.__aenter__())
    yield loop, p
    loop.run_until_complete(p.__aexit__(None, None, None))
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


def replay(pipeline: tuple[asyncio.AbstractEventLoop, Pipeline], chunks: list[bytes]) -> None:
    loop, p = pipeline
    data = b"".join(chunks)
    outcome = loop.run_until_complete(p.exchange(chunks, settle=1.0, quiet=0.03))
    check(outcome, data, p)


def test_regression_corpus(pipeline: tuple[asyncio.AbstractEventLoop, Pipeline]) -> None:
    files = sorted(REGRESSIONS.glob("*.bin"))
    assert files, "the regression corpus is empty"
    for path in files:
        data = path.read_bytes()
        replay(pipeline, [data])
        replay(pipeline, [data[i:i + 1] for i in range(len(data))])  # and one byte per read


@FUZZ
@given(data=st.data())
def test_grammar_requests(pipeline: tuple[asyncio.AbstractEventLoop, Pipeline], data: st.DataObject) -> None:
    raw = data.draw(pipelined())
    replay(pipeline, data.draw(split(raw)))


@FUZZ
@given(data=st.data())
def test_mutated_corpus(pipeline: tuple[asyncio.AbstractEventLoop, Pipeline], data: st.DataObject) -> None:
    raw = data.draw(mutated())
    replay(pipeline, data.draw(split(raw)))


@settings(max_examples=EXAMPLES * 2, deadline=None, derandomize=not SOAK, database=None)
@given(method=st.binary(max_size=8), target=st.binary(max_size=40),
       headers=st.lists(st.tuples(st.sampled_from(NAMES).map(bytes.lower) | st.binary(max_size=10),
                                  st.sampled_from(VALUES) | st.binary(max_size=20)), max_size=8),
       version=st.sampled_from(["1.1", "1.0", "2.0", "0.9", "1.2", ""]), keep_alive=st.booleans())
def test_head_builder_parses_or_raises_protocol_error(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                                                      version: str, keep_alive: bool) -> None:
    try:
        head = build_request_head(method, target, headers, version, keep_alive)
    except ProtocolError as exc:
        assert 400 <= exc.status < 600 and exc.detail
        return
    assert isinstance(head, RequestHead)
    assert head.path.startswith(b"/") or head.path == b"*"
    assert not (head.chunked and head.content_length is not None)
