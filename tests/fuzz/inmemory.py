"""The request pipeline in one process: DownstreamProtocol on an in-memory transport, a recording upstream.

The client side is a fake transport (bytes in, in any split; bytes out, collected), so a test
controls exactly how the request arrives. The upstream is a real loopback server in the same loop
(the proxy's own pool connects to it), which records every request twice: as httptools framed it
live, and as the raw byte stream per connection, re-parsed afterwards with h11 (`reparse_h11`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h11
import httptools

from meshproxy.app import inbound_table
from meshproxy.http1.head import HeadPolicy
from meshproxy.proxy.balancer import Clusters
from meshproxy.proxy.downstream import ConnectionBudget, ListenerContext, ListenerLimits
from meshproxy.proxy.listener import DownstreamProtocol
from meshproxy.proxy.upstream import UpstreamPool
from meshproxy.settings import InboundSpec

UPSTREAM_REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Seen:
    """One request as the upstream's live parser (httptools) framed it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


class RecordingUpstream(asyncio.Protocol):
    """Answers every complete request with 200 "ok"; keeps what it saw."""

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.raw = bytearray()
        self.seen: list[Seen] = []
        self.current: Seen | None = None
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.append(self)
        self.server.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.server.errors.append(f"upstream parser: {exc!r}")
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.current = Seen(self.parser.get_method(), self.url, self.headers)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None and self.transport is not None
        self.server.seen.append(self.current)
        self.seen.append(self.current)
        self.current = None
        self.transport.write(UPSTREAM_REPLY)


@dataclass
class UpstreamServer:
    seen: list[Seen] = field(default_factory=list)
    conns: list[RecordingUpstream] = field(default_factory=list)  # each with its raw byte stream
    errors: list[str] = field(default_factory=list)
    open: set[RecordingUpstream] = field(default_factory=set)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RecordingUpstream(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for proto in list(self.open):
            if proto.transport is not None:
                proto.transport.close()
        await self.server.wait_closed()


def reparse_h11(raw: bytes) -> list[Seen]:
    """A second parser over the bytes the proxy sent upstream; raises h11.RemoteProtocolError if malformed."""
    conn = h11.Connection(our_role=h11.SERVER)
    conn.receive_data(bytes(raw))
    out: list[Seen] = []
    current: Seen | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            if event is h11.PAUSED:  # a complete request: answer it so the next one can be read
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
                continue
            break
        if isinstance(event, h11.Request):
            current = Seen(event.method, event.target, [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()])
            current.headers = [(n.lower(), v) for n, v in current.headers]
        elif isinstance(event, h11.Data):
            assert current is not None
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            out.append(current)
            current = None
        elif isinstance(event, h11.ConnectionClosed):
            break
    return out


class MemoryTransport(asyncio.Transport):
    """The client's connection as the proxy sees it: writes collected, close/abort reported back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: DownstreamProtocol) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.eof = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof, "write after write_eof"
        if not self.closing:
            self.out += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


@dataclass
class Outcome:
    out: bytes  # everything the proxy wrote to the client
    closed: bool  # the proxy closed (or half-closed) the connection
    aborted: bool  # ... with a reset
    seen: list[Seen]  # what the upstream received, as httptools framed it
    errors: list[str]  # error log records of meshproxy, upstream parser errors

    def statuses(self) -> list[int]:
        """Status codes of the responses written, in order (responses are parsed, not searched for)."""
        codes: list[int] = []

        class Sink:
            def on_headers_complete(self) -> None:
                codes.append(parser.get_status_code())

        parser = httptools.HttpResponseParser(Sink())
        try:
            parser.feed_data(self.out)
        except httptools.HttpParserError:
            codes.append(-1)
        return codes


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage() + (f" {record.exc_info[1]!r}" if record.exc_info else ""))


class Pipeline:
    """One listener context wired to a recording upstream; `exchange()` runs one client connection."""

    def __init__(self, policy: HeadPolicy | None = None, **timeouts: float) -> None:
        self.policy = policy or HeadPolicy()
        self.timeouts = timeouts

    async def __aenter__(self) -> Pipeline:
        self.upstream = UpstreamServer()
        await self.upstream.start()
        table = inbound_table(InboundSpec(("127.0.0.1", 0), ("127.0.0.1", self.upstream.port)))
        self.pool = UpstreamPool(4.0, 2.0)
        limits = ListenerLimits(self.policy, **self.timeouts)
        self.ctx = ListenerContext("test", table, self.pool, clusters=Clusters(), limits=limits,
                                   budget=ConnectionBudget(0))
        self.log = _ErrorLog()
        logging.getLogger("meshproxy").addHandler(self.log)
        return self

    async def __aexit__(self, *exc: object) -> None:
        logging.getLogger("meshproxy").removeHandler(self.log)
        self.pool.close_idle()
        await self.upstream.stop()
        await asyncio.sleep(0)

    async def exchange(self, chunks: Iterable[bytes], settle: float = 2.0,
                       between: Callable[[], Any] | None = None, until_closed: bool = False,
                       quiet: float = 0.0) -> Outcome:
        """Deliver `chunks` as separate reads (respecting pause_reading), wait until the proxy is done
        (or, with `until_closed`, until it closes the connection), then close the client side.
        With `quiet`, also stop once nothing has changed for that long (a request waiting for bytes
        that never come, as fuzzed input often is)."""
        loop = asyncio.get_running_loop()
        proto = DownstreamProtocol(self.ctx)
        transport = MemoryTransport(loop, proto)
        proto.connection_made(transport)
        seen_before = len(self.upstream.seen)
        errors_before = len(self.log.records)
        deadline = loop.time() + settle
        for data in chunks:
            pause_deadline = min(deadline, loop.time() + quiet * 3) if quiet else deadline
            while transport.paused and not transport.closing and not transport.eof and loop.time() < pause_deadline:
                await asyncio.sleep(0.001)
            if transport.closing or transport.eof:
                break
            if transport.paused:
                break  # never resumed within `settle`: the client gives up
            proto.data_received(data)
            await asyncio.sleep(0)
            if between is not None:
                await between()
        state: tuple[Any, ...] = ()
        quiet_since = loop.time()
        while loop.time() < deadline and not transport.closing and not transport.eof and \
                (until_closed or proto.streams or proto.active_task is not None):
            await asyncio.sleep(0.001)
            if quiet:
                now_state = (len(transport.out), len(self.upstream.seen), transport.paused, len(proto.streams),
                             sum(len(c.raw) for c in self.upstream.conns))
                if now_state != state:
                    state, quiet_since = now_state, loop.time()
                elif loop.time() - quiet_since >= quiet:
                    break
        closed = transport.closing or transport.eof
        if not transport.closing:
            transport.close()  # the client goes away
        for _ in range(20):
            await asyncio.sleep(0)
        # let the upstream side see the last bytes
        await asyncio.sleep(0.01)
        return Outcome(bytes(transport.out), closed, transport.aborted, self.upstream.seen[seen_before:],
                       self.log.records[errors_before:] + self.upstream.errors)

    def differential(self) -> list[str]:
        """Every upstream byte stream re-parsed with h11 must give what httptools framed live."""
        problems = []
        for i, conn in enumerate(self.upstream.conns):
            try:
                again = reparse_h11(bytes(conn.raw))
            except h11.RemoteProtocolError as exc:
                problems.append(f"upstream connection {i}: h11 rejects what the proxy sent: {exc}: {bytes(conn.raw)!r}")
                continue
            if again != conn.seen:
                problems.append(f"upstream connection {i}: h11 {again!r} != httptools {conn.seen!r}")
        return problems


def run(coro_fn: Callable[[], Any]) -> Any:
    """Run one async test body on a fresh uvloop loop (the proxy's loop)."""
    import uvloop

    return uvloop.run(coro_fn())
