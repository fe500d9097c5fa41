"""R1 + R2: a malformed-request corpus over raw sockets, and a differential check of what gets forwarded.

Cases come from tests/corpus/http1/requests.json (llhttp's request fixtures, Envoy's integration
cases and defaults, RFC 9110/9112 rules; see its `about`) plus generated Transfer-Encoding /
Content-Length permutations judged by the RFC 9112 section 6 rule below. Every case must be
answered (within 10 s: a missing answer, not a slow one) with an allowed status, or closed cleanly; a case to reject is never
forwarded; after a codec error the connection closes. Every forwarded request is re-parsed with
h11 and must equal what the upstream's httptools saw; it carries exactly one framing header, no
hop-by-hop header, and the client's header values unchanged.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import httptools
import pytest
from fuzz.inmemory import UpstreamServer, reparse_h11

from harness import ProxyProcess, service_entry, virtual_service, write_config
from meshproxy.http1.wire import HOP_BY_HOP

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "http1" / "requests.json"
CODEC_ERRORS = [400, 403, 405, 408, 413, 414, 426, 431, 501, 505]
ANSWER_WITHIN = 10.0  # generous: an answer is normally there in milliseconds; this catches none at all
BARRIER = b"/__barrier"

VS = virtual_service("svc")


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    expect: str  # accept | reject | either
    status: tuple[int, ...] = tuple(CODEC_ERRORS)
    forwarded: int | None = None

    @property
    def must_forward(self) -> int:
        if self.forwarded is not None:
            return self.forwarded
        return 1 if self.expect == "accept" else 0


def corpus_cases() -> list[Case]:
    doc = json.loads(CORPUS.read_text())
    return [Case(c["name"], c["request"].encode("latin-1"), c["expect"], tuple(c.get("status", CODEC_ERRORS)),
                 c.get("forwarded")) for c in doc["cases"]]


# ---- generated framing permutations, judged by RFC 9112 section 6 (+ Envoy: only a final, single chunked)

TE_VALUES = ["chunked", "Chunked", "\tchunked", "chunked ", "identity", "gzip", "gzip, chunked", "chunked, gzip",
             ",chunked", "chunked,", "xchunked", "chunkedx", "chunked;x=1", "identity, chunked"]
CL_VALUES = ["5", "05", " 5", "5 ", "+5", "-5", "0x5", "5.0", "", "5,5", "5 5", "99999999999999999999999"]


def _cl_ok(value: str) -> bool:
    return value.strip(" \t").isdigit() and int(value.strip(" \t")) == 5


def _framing_case(te: list[str], cl: list[str], te_first: bool) -> Case:
    lines = [f"Transfer-Encoding: {v}" for v in te]
    cl_lines = [f"Content-Length: {v}" for v in cl]
    lines = lines + cl_lines if te_first else cl_lines + lines
    accept = (not te and len(cl) == 1 and _cl_ok(cl[0])) or \
             (len(te) == 1 and te[0].strip(" \t").lower() == "chunked" and not cl)
    body = "5\r\nhello\r\n0\r\n\r\n" if te else "hello"
    head = "POST /framing HTTP/1.1\r\nHost: svc\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n"
    name = f"te={te!r} cl={cl!r}{'' if te_first else ' cl-first'}"
    return Case(name, (head + body).encode("latin-1"), "accept" if accept else "reject", (400, 501))


def framing_cases() -> list[Case]:
    cases = [_framing_case([te], [], True) for te in TE_VALUES]
    cases += [_framing_case([], [cl], True) for cl in CL_VALUES]
    cases += [_framing_case([te], ["5"], first) for te in TE_VALUES[:8] for first in (True, False)]
    cases += [_framing_case(list(pair), [], True) for pair in itertools.product(["chunked", "identity", "gzip"], repeat=2)]
    cases += [_framing_case([], ["5", "5"], True), _framing_case([], ["5", "6"], True),
              _framing_case(["chunked", "chunked"], ["5"], True)]
    return cases


ALL = corpus_cases() + framing_cases()


# ---- the recording upstream (in its own thread) and the proxy


class ThreadedUpstream:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = UpstreamServer()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    server = ThreadedUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedUpstream) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("corpus")
    p = ProxyProcess(write_config(folder, "c.yaml", service_entry("svc", [(upstream.server.port, {})], port=80), VS))
    yield p
    assert p.stop() == 0, p.log
    assert "Traceback" not in p.log, p.log


# ---- the raw client


@dataclass
class Reply:
    statuses: list[int]  # final statuses of complete responses, in order
    ended: str  # "close" (EOF), "reset", or "open" (still open when we stopped reading)
    elapsed: float
    raw: bytes


def replay(port: int, data: bytes, responses_wanted: int, read_to_close: bool) -> Reply:
    statuses: list[int] = []
    complete = [0]

    class Sink:
        def on_headers_complete(self) -> None:
            code = parser.get_status_code()
            if code >= 200:
                statuses.append(code)

        def on_message_complete(self) -> None:
            if statuses and len(statuses) > complete[0]:
                complete[0] = len(statuses)

    parser = httptools.HttpResponseParser(Sink())
    raw = b""
    started = time.monotonic()
    ended = "open"
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy answered and closed before reading everything: what it sent is still readable
        while True:
            remaining = started + ANSWER_WITHIN + 0.5 - time.monotonic()
            if remaining <= 0:
                break
            if complete[0] and statuses[complete[0] - 1] == 404 and read_to_close:
                break  # no route: not a codec error, the connection stays open
            if not read_to_close and complete[0] >= responses_wanted:
                sock.settimeout(0.02)  # anything unexpected after the wanted responses?
            else:
                sock.settimeout(remaining)
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                ended = "reset"
                break
            if not piece:
                ended = "close"
                break
            raw += piece
            try:
                parser.feed_data(piece)
            except httptools.HttpParserError:
                statuses.append(-1)
    return Reply(statuses, ended, time.monotonic() - started, raw)


def barrier(port: int) -> None:
    """A good request through the proxy to the upstream, answered: what the proxy forwarded before is seen."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_WITHIN)
    conn.request("GET", BARRIER.decode(), headers={"Host": "svc"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200


def forwarded_invariants(case: Case, upstream: ThreadedUpstream, new: list) -> None:
    problems = []
    for conn in upstream.server.conns:
        try:
            again = reparse_h11(bytes(conn.raw))
        except h11.RemoteProtocolError as exc:
            problems.append(f"h11 rejects what the proxy sent: {exc}: {bytes(conn.raw)[-500:]!r}")
            continue
        if again != conn.seen[: len(again)] or len(again) < len(conn.seen):
            problems.append(f"h11 {again!r} != httptools {conn.seen!r}")
    assert not problems, problems
    for seen in new:
        names = [n for n, _ in seen.headers]
        framing = names.count(b"content-length") + names.count(b"transfer-encoding")
        assert framing <= 1, seen.headers
        assert names.count(b"transfer-encoding") == 0 or (b"transfer-encoding", b"chunked") in seen.headers
        hop = HOP_BY_HOP - {b"content-length", b"transfer-encoding"}
        if (b"upgrade", b"websocket") in seen.headers and (b"connection", b"upgrade") in seen.headers:
            hop = hop - {b"upgrade", b"connection"}  # a WebSocket upgrade asks for it again upstream, and only that
            assert names.count(b"upgrade") == 1 and names.count(b"connection") == 1, seen.headers
        assert not (set(names) & hop), seen.headers
        for _, value in seen.headers:
            assert not any(c in value for c in (b"\r", b"\n", b"\x00")), seen.headers
    # the client's header values arrive unchanged (h11 as the reference reading of the original bytes)
    original = _h11_request_headers(case.request)
    if original is not None and len(new) == 1:
        skip = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"}
        connection_listed = {t.strip().lower() for n, v in original if n == b"connection" for t in v.split(b",")}
        expected = [(n, v) for n, v in original if n not in skip and n not in connection_listed
                    and not n.startswith(b"x-envoy-")]
        got = [(n, v) for n, v in new[0].headers if (n, v) in expected]
        assert got == expected, (expected, new[0].headers)


def _h11_request_headers(data: bytes) -> list[tuple[bytes, bytes]] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return [(bytes(n).lower(), bytes(v)) for n, v in event.headers.raw_items()]


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_request_corpus(proxy: ProxyProcess, upstream: ThreadedUpstream, case: Case) -> None:
    before = len(upstream.server.seen)
    wanted = max(1, case.must_forward)
    reply = replay(proxy.port, case.request, wanted, read_to_close=case.expect == "reject")
    barrier(proxy.port)  # a wrongly forwarded request reaches the upstream before this one (instead of a sleep)
    new = [seen for seen in upstream.server.seen[before:] if seen.target != BARRIER]
    assert reply.elapsed < ANSWER_WITHIN + 0.5, f"no answer within {ANSWER_WITHIN}s"
    assert -1 not in reply.statuses, f"the proxy's answer does not parse: {reply.raw[:300]!r}"
    if case.expect == "accept":
        assert reply.statuses == [200] * case.must_forward, reply.raw[:300]
        assert len(new) == case.must_forward
    elif case.expect == "reject":
        assert len(new) == case.must_forward, f"forwarded a request that must be rejected: {new!r}"
        assert reply.ended != "reset", reply.raw[:300]
        if reply.statuses:
            assert reply.statuses[-1] in case.status, reply.raw[:300]
        if not reply.statuses or reply.statuses[-1] != 404:  # a codec error closes the connection
            assert reply.ended == "close", reply.raw[:300]
    else:
        assert reply.statuses and all(s in (200, 404, *CODEC_ERRORS) for s in reply.statuses), reply.raw[:300]
        assert len(new) <= (case.forwarded if case.forwarded is not None else 1)
    forwarded_invariants(case, upstream, new)
