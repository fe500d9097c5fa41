"""The downstream side, HTTP/1.1: one transport object per client connection, around the codec's server side.

The codec (`http1/server.py`) turns bytes into request heads and body events; each request head becomes a
Stream and its exchange (`exchange.py`), which answers through the `send_*` methods here (the one place that
frames a response for this connection). Requests on one connection are served one at a time, in order
(pipelined requests wait, and reading pauses while they do), so responses leave in request order. After any
protocol error the connection answers and closes.

Limits and timeouts (Envoy's names; values from `ListenerLimits`, built from Settings):
- request head over `max_header_bytes` (request-target + names + values) or `max_header_count`
  lines -> 431; a request body over `max_body_bytes` -> 413 (declared: before any byte is
  forwarded; chunked: when the count passes the limit); at most MAX_PIPELINED requests queued.
- request_headers_timeout: a request head (or, on a new connection, its first request) must be
  complete within it -> 408 and close (a connection that sent nothing is closed without a reply).
- idle_timeout: a keep-alive connection with no request in progress is closed after it.
- stream_idle_timeout: no byte either way on the active request for this long -> 408 while the
  request is still being received, 504 once it is complete (flag SI); reset if the response began.
- max connections: a ConnectionBudget shared by the listeners of a process; connections over it
  are closed at accept, the open ones are not touched.
Errors are answered with `connection: close`, then the proxy half-closes and discards what the
client still sends for up to LINGER_SECONDS (a lingering close, as nginx), so the client reads the
answer instead of a reset caused by its own unread request bytes.

Mesh edge: the listener's HeadPolicy strips x-envoy-* control headers before routing. The
outbound listener's client is the local app (trusted): nothing is stripped. The inbound listener
(traffic from other workloads, or anything that reaches the pod port) strips Envoy's control
headers (ENVOY_CONTROL_HEADERS: retry, timeout, force-trace, internal, ...) and keeps the
informational ones (attempt count, peer metadata). A gateway (`--gateway`) strips every x-envoy-*.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, cast

from ..http1.errors import ProtocolError, Upgraded
from ..http1.server import H2_PREFACE_DETAIL, H2_PREFACE_START, ServerCodec, TunnelCodec
from ..http1.wire import CONTINUE_100, LAST_CHUNK, chunk, local_reply, response_head
from ..messages import HTTP11, HeaderBlock, HeaderTemplate, RequestEvents, RequestHead
from ..security.peer import peer_principal, requested_server_name
from ..stream_info import DC, ConnectionInfo
from .downstream import ListenerContext
from .exchange import Downstream, Stream, abandon, start
from .local_reply import protocol_error_body, protocol_error_flag, stream_idle_timeout
from .upstream import WRITE_HIGH_WATER, WRITE_LOW_WATER

log = logging.getLogger("meshproxy.listener")

UPGRADE: Final = b"upgrade"
UPGRADE_BLOCK: Final = HeaderTemplate((b"connection", UPGRADE))  # a 101's `connection: upgrade`, `upgrade: PROTOCOL`
WEBSOCKET: Final = b"websocket"
READ_PAUSED_BY_PIPELINE: Final = 4
READ_PAUSED_BY_ERROR: Final = 8

MAX_PIPELINED: Final = 100  # requests held per connection (the active one + parsed ahead); one more is a 400 (memory bound)
LINGER_SECONDS: Final = 2.0  # after an error reply: how long the client's remaining bytes are read and discarded
class DownstreamProtocol(Downstream, RequestEvents):
    """One client connection (an asyncio protocol): the codec's handler, the streams' downstream transport."""

    __slots__ = (
        "transport", "codec", "info", "peer_ip", "streams", "parsing", "closed", "error", "limits", "head_deadline",
        "last_activity", "timer", "timer_at", "aborted", "lingering", "counted", "header_timeout", "stream_idle",
        "idle_timeout", "starting", "start_next", "server_name", "out", "close_after", "response_chunked",
        "response_head_only",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        super().__init__(ctx, asyncio.get_running_loop())
        self.server_name = ctx.server_name
        self.transport: asyncio.Transport | None = None
        self.codec = ServerCodec(self, ctx.limits.head)
        self.info = ConnectionInfo()
        self.peer_ip = b"unknown"
        self.streams: list[Stream] = []  # the active one first, then pipelined ones (a list: a deque's first
        # block costs half a kilobyte on every idle keep-alive connection; the queue is one long, MAX_PIPELINED at most)
        self.parsing: Stream | None = None
        self.closed = False
        self.error: ProtocolError | None = None
        self.limits = ctx.limits
        self.header_timeout = ctx.limits.request_headers_timeout
        self.stream_idle = ctx.limits.stream_idle_timeout
        self.idle_timeout = ctx.limits.idle_timeout
        self.head_deadline = 0.0  # when the head in progress (or the first one) must be complete; 0 = none
        self.last_activity = 0.0  # loop time of the last byte read or written
        self.timer: asyncio.TimerHandle | None = None  # the one timer of the connection (see _on_timer)
        self.timer_at = 0.0
        self.aborted: Stream | None = None  # the active stream stopped by the transport (self.error says why)
        self.lingering = False
        self.counted = False  # holds a slot of the connection budget
        self.starting = False  # in _start_queued's loop
        self.start_next = False
        # The active stream's response, as this connection frames it.
        self.out: list[bytes] = []  # response bytes not yet written (see flush)
        self.close_after = False  # no further request on this connection after the active one
        self.response_chunked = False
        self.response_head_only = False

    # ---- asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        if not self.ctx.budget.take():
            log.debug("downstream connection over the limit of %d: closed at accept", self.ctx.budget.limit)
            self.closed = True
            stream_transport.abort()
            return
        self.counted = True
        stream_transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = str(peer[0]).encode()
        self.info = ConnectionInfo(self.peer_ip, transport)
        if self.ctx.secure:  # once per connection; plaintext listeners skip it
            ssl_object = transport.get_extra_info("ssl_object")
            self.info.peer_principal = peer_principal(ssl_object)
            self.info.requested_server_name = requested_server_name(ssl_object)
        self.ctx.connections.add(self)  # accepted while draining: served, `connection: close` after its response
        now = self.last_activity = self.loop.time()
        limits = self.limits
        if limits.request_headers_timeout:
            self.head_deadline = now + limits.request_headers_timeout  # the first request, from accept
            self._arm(self.head_deadline)
        elif limits.idle_timeout:
            self._arm(now + limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return  # after an error reply: discarded (lingering close)
        self.last_activity = self.loop.time()
        try:
            self.codec.feed(data)
        except ProtocolError as error:
            if error.detail == H2_PREFACE_DETAIL and self._switch_to_http2(data):
                return
            self._protocol_error(error)
            return
        except Upgraded as upgrade:
            self._tunnel(upgrade.rest)
            return
        if self.codec.head_started and not self.head_deadline and self.header_timeout:
            self.head_deadline = self.last_activity + self.header_timeout
            self._arm(self.head_deadline)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def _tunnel(self, rest: bytes) -> None:
        """A WebSocket upgrade request was parsed (its exchange runs): the client's further bytes are its body, and
        the connection closes after it, whether the upstream switched protocols or not."""
        stream = self.parsing or (self.streams[-1] if self.streams else None)
        self.parsing = None
        if stream is None:
            self._close()
            return
        self.close_after = True
        self.codec = TunnelCodec(self, stream.on_request_body)
        if rest:
            stream.on_request_body(rest)

    def _switch_to_http2(self, data: bytes) -> bool:
        """The connection opened with HTTP/2's preface (h2c, prior knowledge): hand the transport to an HTTP/2
        connection, with every byte read so far (the codec counted those of the head in progress)."""
        if self.streams or self.parsing is not None or self.transport is None:
            return False
        seen = H2_PREFACE_START[:max(0, self.codec.head_fed - len(data))] + data
        if not seen.startswith(H2_PREFACE_START):
            return False
        from .h2_listener import H2DownstreamConnection  # HTTP/2 code is loaded by the first HTTP/2 client

        self.closed = True  # this object hears nothing more from the transport
        self._cancel_timer()
        self.ctx.connections.discard(self)
        counted, self.counted = self.counted, False
        H2DownstreamConnection(self.ctx, self.transport, self.info, counted).take_over(seen)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.counted:
            self.counted = False
            self.ctx.budget.give_back()
        self.ctx.connections.discard(self)
        queued = self.streams[1:]  # behind the active one: never started
        for stream in queued:
            self.streams.remove(stream)
        self._stop_active()
        for stream in queued:
            stream.flags |= DC
            self.telemetry.on_complete(stream)

    def pause_writing(self) -> None:
        if self.streams:
            self.streams[0].pause_upstream_reads()

    def resume_writing(self) -> None:
        if self.streams:
            self.streams[0].resume_upstream_reads()

    # ---- codec callbacks (RequestEvents)

    def on_request_head(self, head: RequestHead) -> None:
        self.head_deadline = 0.0
        if len(self.streams) >= MAX_PIPELINED:
            raise ProtocolError(400, "http1.too_many_pipelined_requests")
        stream = Stream(self, head, self.info, time.monotonic())
        if self.ctx.response_mutation is not None:
            stream.response_mutation = self.ctx.response_mutation
        telemetry = self.telemetry
        stream.upstream_extra = telemetry.on_request(stream)
        stream.downstream_extra = telemetry.response_extra
        self.parsing = stream
        if not (head.chunked or head.content_length):  # no body
            stream.request_complete = True
        self.streams.append(stream)
        if len(self.streams) == 1:
            self._start(stream)
        else:
            self.pause_reading(READ_PAUSED_BY_PIPELINE)

    def on_request_body(self, data: bytes) -> None:
        if self.parsing is not None:
            self.parsing.on_request_body(data)

    def on_request_end(self) -> None:
        stream = self.parsing
        self.parsing = None
        if stream is not None and not stream.request_complete:
            stream.on_request_end()

    # ---- the active stream's response (called by its exchange)

    def send_response_head(self, stream: Stream, status: int, headers: list[tuple[bytes, bytes]],
                           extra: list[HeaderBlock], content_length: int | None, end_stream: bool) -> None:
        head = stream.head
        chunked = False
        if content_length is None and not end_stream:
            if status == 101:  # switching protocols: the body is the tunnel, raw; no route timeout from here on
                self._switch_protocols(stream, headers, extra)
                return
            if head.version == HTTP11:
                chunked = True
            else:
                self.close_after = True  # HTTP/1.0 client: the body ends when we close
        if self.ctx.draining or not stream.request_complete:  # Envoy: a response before the request ended closes
            self.close_after = True  # an HTTP/1 connection (downstream_rq_response_before_rq_complete)
        self.response_chunked = chunked
        self.response_head_only = head.method == b"HEAD"
        # Written with the body bytes of the same upstream read: one send (see flush).
        self.out.append(response_head(status, headers, extra, content_length, chunked, self.close_after))

    def _switch_protocols(self, stream: Stream, headers: list[tuple[bytes, bytes]],
                          extra: list[HeaderBlock]) -> None:
        stream.cancel_timers()
        self.close_after = True
        self.response_chunked = False
        self.response_head_only = False
        protocol = next((v for n, v in headers if n == UPGRADE), WEBSOCKET)
        self.out.append(response_head(101, headers, [*extra, (UPGRADE_BLOCK, (UPGRADE, protocol))], None,
                                      False, False))

    def send_response_body(self, data: bytes) -> None:
        if not self.response_head_only:
            self.out.append(chunk(data) if self.response_chunked else data)

    def send_response_end(self) -> None:
        if self.response_chunked and not self.response_head_only:
            self.out.append(LAST_CHUNK)

    def flush(self) -> None:
        out = self.out
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def send_local_reply(self, stream: Stream, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> None:
        if not stream.request_complete:
            self.close_after = True  # the rest of the request body is not read
        head = stream.head
        self.write(local_reply(status, body, close=self.close_after or self.ctx.draining, server=self.server_name,
                               extra=extra, head_only=head.method == b"HEAD"))

    def send_continue(self, stream: Stream) -> None:
        self.write(CONTINUE_100)

    def reset_stream(self, stream: Stream) -> None:
        """Abort the connection: a response cut short must not look complete to the client."""
        self.close_after = True
        self.reset_after_write()

    # ---- stream lifecycle

    def _start(self, stream: Stream) -> None:
        if self.stream_idle:
            self._arm(self.last_activity + self.stream_idle)
        self.close_after = not stream.head.keep_alive
        start(self, stream)  # may finish the stream (stream_done) before it returns

    def stream_done(self, stream: Stream) -> None:
        """Called by the exchange when its response is fully written (or abandoned)."""
        if self.streams and self.streams[0] is stream:
            del self.streams[0]
        self.active_task = None
        error = self.error
        if stream is self.aborted and error is not None:
            self.aborted = None
            stream.flags = (stream.flags & ~DC) | protocol_error_flag(error)  # the transport knows the reason
            stream.details = error.detail
            if not stream.response_started:
                stream.status = error.status
            own_error = True
        else:
            own_error = error is not None and not stream.request_complete
        self.telemetry.on_complete(stream)
        if self.closed:
            return
        self.last_activity = self.loop.time()
        if stream.response_started and not stream.response_complete:
            self.reset_after_write()  # a response cut short must not look complete
            return
        if error is not None:
            if own_error:  # this request is the bad one: its answer is the error, unless a response began
                if stream.response_started:
                    self._close()
                else:
                    self._send_error(error)
                return
            if not self.streams:  # the bad request came after this one
                if self.close_after or not stream.request_complete:
                    self._close()
                else:
                    self._send_error(error)
                return
        if self.close_after or self.ctx.draining or not stream.request_complete:
            self._close()
            return
        if self.streams:
            if len(self.streams) == 1:
                self.resume_reading(READ_PAUSED_BY_PIPELINE)
            self._start_queued()
        elif self.codec.head_started and self.header_timeout:
            # The next head began while this request was served: its time starts now (Envoy parses one at a time).
            self.head_deadline = self.last_activity + self.header_timeout
            self._arm(self.head_deadline)
        elif self.idle_timeout:
            self._arm(self.last_activity + self.idle_timeout)

    def _start_queued(self) -> None:
        """Start the next pipelined request. One that is answered at once finishes (stream_done) inside _start; its
        successor is then started by this loop, not from inside that call, so a long pipeline never nests deeper."""
        if self.starting:
            self.start_next = True
            return
        self.starting = True
        try:
            while True:
                self.start_next = False
                self._start(self.streams[0])
                if not self.start_next:
                    return
        finally:
            self.starting = False

    def _stop_active(self) -> bool:
        """Stop the active stream's exchange, which then finishes it (stream_done); False if none is running."""
        task = self.active_task
        if task is not None and not task.done():
            task.cancel()
            task.add_done_callback(self._finish_if_never_ran)
            return True
        if self.streams and not self.streams[0].ended:
            abandon(self, self.streams[0])  # between callbacks (waiting for its upstream): no task to cancel
            return True
        return False

    def _finish_if_never_ran(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never ran: finish its stream here."""
        if task.cancelled() and self.streams and self.active_task is task:
            abandon(self, self.streams[0])

    def drain(self) -> None:
        if not self.streams and self.ctx.drain_closes_idle:
            self._close()

    # ---- timers: one per connection, re-armed only when a deadline moves earlier

    def _arm(self, at: float) -> None:
        timer = self.timer
        if timer is not None:
            if self.timer_at <= at:
                return  # fires first; _on_timer then looks at the state and re-arms
            timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_at(at, self._on_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.transport is None or (self.closed and not self.lingering):
            return
        now = self.loop.time()
        if self.lingering:
            if now >= self.head_deadline:
                self.lingering = False
                self.transport.abort()
            else:
                self._arm(self.head_deadline)
            return
        limits = self.limits
        if self.streams:
            if limits.stream_idle_timeout:
                at = self.last_activity + limits.stream_idle_timeout
                if now < at:
                    self._arm(at)
                elif self.aborted is None:
                    self._fail_active(stream_idle_timeout(self.streams[0].request_complete))
            return
        if self.head_deadline:
            if now < self.head_deadline:
                self._arm(self.head_deadline)
            elif self.codec.head_started:
                self._protocol_error(ProtocolError(408, "request_header_timeout"))
            else:
                self._close()  # nothing of a request arrived: no reply to send
            return
        if limits.idle_timeout:
            at = self.last_activity + limits.idle_timeout
            if now < at:
                self._arm(at)
            else:
                self._close()

    # ---- writing and flow control

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.last_activity = self.loop.time()
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
        self.lingering = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.closed = True
        self.lingering = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, error: ProtocolError) -> None:
        log.debug("downstream %s: %s", self.peer_ip.decode(), error)
        self.error = error
        self.pause_reading(READ_PAUSED_BY_ERROR)
        parsing = self.parsing
        self.parsing = None
        self.codec.stop()
        self.head_deadline = 0.0
        if parsing is not None and parsing in self.streams and self.streams[0] is not parsing:
            self.streams.remove(parsing)  # a queued request whose body was bad: never started
            parsing.flags |= protocol_error_flag(error)
            parsing.details = error.detail
            parsing.status = error.status
            self.telemetry.on_complete(parsing)
        if not self.streams:
            self._send_error(error)
        elif not self.streams[0].request_complete:
            self._fail_active(error)  # the active request's own body is bad: stop its exchange

    def _fail_active(self, error: ProtocolError) -> None:
        """Stop the active stream's exchange; stream_done then answers with `error` (or resets)."""
        self.error = error
        self.aborted = self.streams[0]
        self.pause_reading(READ_PAUSED_BY_ERROR)
        if not self._stop_active():
            self.reset_after_write()

    def _send_error(self, error: ProtocolError) -> None:
        """Answer, close our side, and read (discarding) what the client still sends for a moment."""
        self.error = error
        self.write(local_reply(error.status, protocol_error_body(error), close=True, server=self.ctx.server_name))
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            self._close()
            return
        self.closed = True
        transport.write_eof()
        self.lingering = True
        self.head_deadline = self.loop.time() + LINGER_SECONDS
        self._arm(self.head_deadline)
        self.read_paused = 0
        transport.resume_reading()
