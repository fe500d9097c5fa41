"""The downstream side: one protocol object per client connection.

httptools calls back into this object; each complete request head becomes a
Stream. Requests on one connection are served one at a time, in order
(pipelined requests wait, and reading pauses while they do), so responses
leave in request order. After any protocol error the connection answers and closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from ..http1.errors import ProtocolError
from ..http1.head import MAX_HEADER_BYTES, MAX_HEADER_COUNT, build_request_head
from ..http1.wire import local_reply
from ..routing.policy import HeaderMutation
from ..routing.table import RouteTable
from ..http1.wire import HOP_BY_HOP
from ..telemetry.access_log import AccessLog
from ..telemetry.core import Telemetry
from .balancer import Clusters
from .exchange import Stream, exchange
from .upstream import WRITE_HIGH_WATER, WRITE_LOW_WATER, UpstreamPool

log = logging.getLogger("meshproxy.listener")

READ_PAUSED_BY_PIPELINE = 4
READ_PAUSED_BY_ERROR = 8


@dataclass(slots=True)
class ListenerContext:
    """What every connection of one listener shares."""

    name: str  # "outbound" or "inbound"
    table: Callable[[], RouteTable]  # read once per request
    pool: UpstreamPool
    server_name: bytes = b"envoy"
    response_mutation: HeaderMutation | None = None
    rng: random.Random = field(default_factory=random.Random)
    connections: set[DownstreamProtocol] = field(default_factory=set)
    draining: bool = False
    clusters: Clusters = field(default_factory=Clusters)  # shared by all listeners of the process
    telemetry: Telemetry | None = None

    def __post_init__(self) -> None:
        if self.telemetry is None:
            self.telemetry = Telemetry(self.name, "outbound", AccessLog())

    def start_draining(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.drain()


class _HeaderLimitError(Exception):
    pass


class DownstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "ctx", "loop", "transport", "parser", "peer_ip", "streams", "parsing", "active_task", "url", "headers",
        "head_size", "in_head", "head_fed", "read_paused", "closed", "error", "randbelow", "random", "telemetry",
        "strip_request",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = b"unknown"
        self.streams: deque[Stream] = deque()
        self.parsing: Stream | None = None
        self.active_task: asyncio.Task[None] | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.in_head = True
        self.head_fed = 0
        self.read_paused = 0
        self.closed = False
        self.error: ProtocolError | None = None
        self.randbelow = ctx.rng.randrange
        self.random = ctx.rng
        assert ctx.telemetry is not None
        self.telemetry = ctx.telemetry
        self.strip_request = HOP_BY_HOP | ctx.telemetry.strip_request  # never forwarded upstream

    # ---- what the exchange reads

    @property
    def table(self) -> RouteTable:
        return self.ctx.table()

    @property
    def pool(self) -> UpstreamPool:
        return self.ctx.pool

    @property
    def draining(self) -> bool:
        return self.ctx.draining

    @property
    def server_name(self) -> bytes:
        return self.ctx.server_name

    @property
    def clusters(self) -> Clusters:
        return self.ctx.clusters

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = str(peer[0]).encode()
        self.ctx.connections.add(self)
        if self.ctx.draining:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.in_head:
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except _HeaderLimitError:
            self._protocol_error(ProtocolError(431, "http1.headers_too_large"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                self._protocol_error(cause)
            elif isinstance(cause, _HeaderLimitError):
                self._protocol_error(ProtocolError(431, "http1.headers_too_large"))
            else:
                log.exception("request callback failed", exc_info=cause)
                self._protocol_error(ProtocolError(400, "http1.codec_error"))
        except httptools.HttpParserUpgrade:
            if self.parser.get_method() == b"CONNECT":
                self._protocol_error(ProtocolError(403, "http1.connect_not_supported"))
            else:
                self._protocol_error(ProtocolError(400, "http1.upgrade_not_supported"))
        except httptools.HttpParserInvalidMethodError:
            self._protocol_error(ProtocolError(400, "http1.invalid_method"))
        except httptools.HttpParserError:
            self._protocol_error(ProtocolError(400, "http1.codec_error"))
        else:
            if self.in_head and self.head_fed > MAX_HEADER_BYTES + 4096:
                self._protocol_error(ProtocolError(431, "http1.headers_too_large"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        if self.active_task is not None and not self.active_task.done():
            self.active_task.cancel()

    def pause_writing(self) -> None:
        stream = self.streams[0] if self.streams else None
        if stream is not None and stream.upstream is not None and stream.upstream.transport is not None:
            stream.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        stream = self.streams[0] if self.streams else None
        if stream is not None and stream.upstream is not None and stream.upstream.transport is not None:
            stream.upstream.transport.resume_reading()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEADER_BYTES:
            raise _HeaderLimitError

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # trailers: not forwarded
        self.head_size += len(name) + len(value)
        self.headers.append((name.lower(), value))
        if self.head_size > MAX_HEADER_BYTES or len(self.headers) > MAX_HEADER_COUNT:
            raise _HeaderLimitError

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_fed = 0
        parser = self.parser
        head = build_request_head(parser.get_method(), self.url, self.headers, parser.get_http_version(),
                                  parser.should_keep_alive())
        stream = Stream(self, head)
        if self.ctx.response_mutation is not None:
            stream.response_mutation = self.ctx.response_mutation
        self.telemetry.on_request(stream)
        self.parsing = stream
        if not head.has_body:
            stream.request_complete = True
        self.streams.append(stream)
        if len(self.streams) == 1:
            self._start(stream)
        else:
            self.pause_reading(READ_PAUSED_BY_PIPELINE)

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.on_request_body(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_fed = 0
        stream = self.parsing
        self.parsing = None
        if stream is not None and not stream.request_complete:
            stream.on_request_end()

    # ---- stream lifecycle

    def _start(self, stream: Stream) -> None:
        self.active_task = self.loop.create_task(exchange(self, stream))

    def stream_done(self, stream: Stream) -> None:
        """Called by the exchange when its response is fully written (or abandoned)."""
        if self.streams and self.streams[0] is stream:
            self.streams.popleft()
        self.active_task = None
        self.telemetry.on_complete(stream)
        if self.closed:
            return
        if self.error is not None and (not self.streams or not stream.request_complete):
            if stream.response_started:
                self._close()
            else:
                self._send_error(self.error)
            return
        if stream.close_after or self.ctx.draining or not stream.request_complete:
            self._close()
            return
        if self.streams:
            if len(self.streams) == 1:
                self.resume_reading(READ_PAUSED_BY_PIPELINE)
            self._start(self.streams[0])

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        if not self.streams:
            self._close()

    # ---- writing and flow control

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self, reason: int) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.read_paused & reason:
            return
        self.read_paused &= ~reason
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def reset_after_write(self) -> None:
        """Abort the connection: a response cut short must not look complete to the client."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, error: ProtocolError) -> None:
        log.debug("downstream %s: %s", self.peer_ip.decode(), error)
        self.error = error
        self.pause_reading(READ_PAUSED_BY_ERROR)
        if self.parsing is not None and self.parsing in self.streams and self.streams[0] is not self.parsing:
            self.streams.remove(self.parsing)  # a queued request whose body was bad: never started
        self.parsing = None
        if not self.streams:
            self._send_error(error)
        elif not self.streams[0].request_complete and self.active_task is not None:
            self.active_task.cancel()  # the active request's own body is bad: stop its exchange

    def _send_error(self, error: ProtocolError) -> None:
        self.write(local_reply(error.status, _ERROR_BODIES.get(error.status, b"Bad Request"), close=True,
                               server=self.ctx.server_name))
        self._close()


_ERROR_BODIES = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    505: b"HTTP Version Not Supported",
}
