"""The downstream side, HTTP/2 cleartext: one transport object per client connection, one `Downstream` per stream.

A connection starts as HTTP/1.1 (`listener.DownstreamProtocol`); when its first bytes are HTTP/2's connection
preface (h2c with prior knowledge, RFC 9113 3.3) it hands its transport to an `H2DownstreamConnection` here, which
answers with its SETTINGS (Envoy's defaults) and serves each stream as a `Stream` through the unchanged exchange.
The HTTP/1.1 `Upgrade: h2c` dance is not taken: the request is served as HTTP/1.1, as Envoy does (http1/server.py).

Each stream has its own `H2DownstreamStream`, the exchange's `Downstream`: the response goes out on that stream
(HEADERS, DATA within the client's windows, trailers), a local reply to a gRPC request is gRPC-shaped (trailers-
only, HTTP 200, `grpc-status` from the HTTP status as Envoy maps it: local_reply.py), and pausing its reading holds
back that stream's window credit only. RST_STREAM from the client stops the stream's exchange with Envoy's `DR`
(downstream remote reset); PING is answered by h2; drain (SIGTERM, reload) sends GOAWAY with the last stream id and
closes once the streams in flight are done. The connection's idle timeout counts while no stream is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from ..http1.errors import ProtocolError
from ..http1.wire import DATE
from ..http2.codec import CANCEL, INTERNAL_ERROR, NO_ERROR, ConnectionEvents, H2Codec, H2Error, H2Stream, StreamEvents
from ..http2.grpc import MessageCounter, grpc_status_of, grpc_timeout, is_grpc
from ..messages import HeaderBlock, RequestHead
from ..stream_info import DC, DR, GRPC_NO_STATUS, ConnectionInfo
from .downstream import Connection, ListenerContext
from .exchange import Downstream, Stream, abandon, start
from .local_reply import (
    grpc_local_reply_headers,
    protocol_error_body,
    protocol_error_flag,
    stream_idle_timeout,
)

log = logging.getLogger("meshproxy.h2")

REMOTE_RESET: Final = "http2.remote_reset"
BODY_TOO_LARGE: Final = ProtocolError(413, "request_payload_too_large")  # Envoy's response code details for a stream the client reset
STATUS_VALUES: Final = {code: b"%d" % code for code in range(100, 600)}


def status_value(status: int) -> bytes:
    value = STATUS_VALUES.get(status)
    return value if value is not None else b"%d" % status


class H2DownstreamConnection(Connection, ConnectionEvents):
    """One HTTP/2 client connection (an asyncio protocol, taken over from the HTTP/1.1 one that saw the preface)."""

    __slots__ = ("ctx", "loop", "transport", "codec", "info", "active", "closed", "counted", "draining", "timer", "pool",
                 "idle_timeout", "telemetry", "live", "stream_idle", "stream_timer")

    def __init__(self, ctx: ListenerContext, transport: asyncio.Transport, info: ConnectionInfo, counted: bool) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.info = info
        self.counted = counted  # holds a slot of the connection budget (taken at accept)
        self.codec = H2Codec(False, self, policy=ctx.limits.head)
        self.pool = ctx.pool.for_http2_clients()
        self.active = 0  # streams whose exchange is not done
        self.closed = False
        self.draining = False
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timeout = ctx.limits.idle_timeout
        self.stream_idle = ctx.limits.stream_idle_timeout
        self.live: set[H2DownstreamStream] = set()  # the streams whose exchange runs (stream idle timeout)
        self.stream_timer: asyncio.TimerHandle | None = None
        assert ctx.telemetry is not None
        self.telemetry = ctx.telemetry

    def take_over(self, received: bytes) -> None:
        """Become the transport's protocol; `received` is every byte read so far (the preface first)."""
        self.transport.set_protocol(self)  # type: ignore[arg-type]  # a protocol by its methods
        self.ctx.connections.add(self)
        self.codec.initiate()
        self.data_received(received)
        if self.ctx.draining:
            self.drain()
        elif not self.closed and self.active == 0:
            self._arm_idle()

    # ---- asyncio protocol callbacks

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.codec.feed(data)
        except H2Error as error:
            log.debug("downstream %s: %s", self.info.peer_ip.decode(), error.detail)
            self.flush()
            self._close()
            if self.codec.write_paused:  # a peer that does not read would hold a graceful close open forever
                self.transport.abort()
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        if self.counted:
            self.counted = False
            self.ctx.budget.give_back()
        self.ctx.connections.discard(self)
        self.codec.fail_all(CANCEL)  # every stream in flight is stopped (DC)

    def pause_writing(self) -> None:
        self.codec.pause_writing()

    def resume_writing(self) -> None:
        self.codec.resume_writing()
        self.flush()

    # ---- codec callbacks (ConnectionEvents)

    def on_request(self, h2stream: H2Stream, head: RequestHead, end_stream: bool) -> None:
        self._cancel_idle()
        downstream = H2DownstreamStream(self, h2stream, head)
        self.live.add(downstream)
        if self.stream_idle and self.stream_timer is None:
            self.stream_timer = self.loop.call_at(downstream.last_activity + self.stream_idle, self._on_stream_timer)
        stream = Stream(downstream, head, self.info, time.monotonic())
        if self.ctx.response_mutation is not None:
            stream.response_mutation = self.ctx.response_mutation
        telemetry = self.telemetry
        stream.upstream_extra = telemetry.on_request(stream)
        stream.downstream_extra = telemetry.response_extra
        if end_stream:
            stream.request_complete = True
        if downstream.grpc:
            stream.grpc_status = GRPC_NO_STATUS
            stream.grpc_timeout = grpc_timeout(head.header(b"grpc-timeout"))
        downstream.stream = stream
        h2stream.events = downstream
        self.active += 1
        start(downstream, stream)  # may finish the stream (stream_done) before it returns

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """The client goes away: finish what is in flight, then close."""
        self.draining = True
        if self.active == 0:
            self._close()

    def on_capacity(self, max_streams: int) -> None:
        pass  # a server opens no streams

    # ---- for the streams

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def stream_finished(self, downstream: H2DownstreamStream) -> None:
        self.live.discard(downstream)
        self.active -= 1
        self.flush()
        if self.active == 0 and not self.closed:
            if self.draining or self.ctx.draining:
                self._close()
            else:
                self._arm_idle()

    # ---- Connection (the listener's drain)

    def drain(self) -> None:
        """GOAWAY with the last stream id; close once the streams in flight are done."""
        self.draining = True
        self.codec.goaway(NO_ERROR)
        self.flush()
        if self.active == 0:
            self._close()

    def reset_after_write(self) -> None:
        self.closed = True
        self._cancel_idle()
        self.transport.abort()

    # ---- internals

    def _close(self) -> None:
        if not self.codec.goaway_sent:
            self.codec.goaway(NO_ERROR)
            self.flush()
        self.closed = True
        self._cancel_idle()
        self.transport.close()

    def _arm_idle(self) -> None:
        if self.idle_timeout and self.timer is None:
            self.timer = self.loop.call_later(self.idle_timeout, self._on_idle)

    def _cancel_idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.closed and self.stream_timer is not None:
            self.stream_timer.cancel()
            self.stream_timer = None

    def _on_stream_timer(self) -> None:
        """Envoy's stream idle timeout, per stream: no byte either way on it for that long stops it (SI)."""
        self.stream_timer = None
        if self.closed:
            return
        now = self.loop.time()
        following = 0.0
        for downstream in list(self.live):
            at = downstream.last_activity + self.stream_idle
            if at <= now:
                downstream.idle_out()
            elif not following or at < following:
                following = at
        if following:
            self.stream_timer = self.loop.call_at(following, self._on_stream_timer)
        self.flush()

    def _on_idle(self) -> None:
        self.timer = None
        if self.active == 0 and not self.closed:
            self._close()


class H2DownstreamStream(Downstream, StreamEvents):
    """One HTTP/2 stream as the exchange's downstream: its response goes out on this stream alone."""

    __slots__ = ("connection", "codec", "h2", "stream", "grpc", "remote_reset", "server_name", "last_activity",
                 "error", "max_body", "body_bytes", "messages_in", "messages_out")

    def __init__(self, connection: H2DownstreamConnection, h2stream: H2Stream, head: RequestHead) -> None:
        super().__init__(connection.ctx, connection.loop)
        self.pool = connection.pool  # clusters that follow the client's protocol go HTTP/2 for this stream
        self.connection = connection
        self.codec = connection.codec
        self.h2 = h2stream
        self.stream: Stream | None = None
        self.grpc = is_grpc(head)
        # gRPC messages each way, for Istio's istio_request_messages_total and istio_response_messages_total (their
        # only reader); None: not gRPC, or no metrics
        counted = self.grpc and self.telemetry.metrics is not None
        self.messages_in: MessageCounter | None = MessageCounter() if counted else None
        self.messages_out: MessageCounter | None = MessageCounter() if counted else None
        self.remote_reset = False
        self.server_name = connection.ctx.server_name
        self.last_activity = self.loop.time()  # of the last byte either way (the stream idle timeout)
        self.error: ProtocolError | None = None  # why the transport stopped the stream (idle, body too large)
        self.max_body = connection.ctx.limits.head.max_body_bytes  # --max-request-body; 0: none
        self.body_bytes = 0

    # ---- the response (called by the exchange)

    def send_response_head(self, stream: Stream, status: int, headers: list[tuple[bytes, bytes]],
                           extra: list[HeaderBlock], content_length: int | None, end_stream: bool) -> None:
        if self.grpc and end_stream:
            stream.grpc_status = grpc_status_of(headers)  # trailers-only
        self.last_activity = self.loop.time()
        # connection-specific fields an HTTP/1.1 upstream sent are left out by the codec (RFC 9113 8.2.2)
        self.codec.send_response_head(self.h2, status_value(status), headers, extra, DATE.value(), end_stream)

    def send_response_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.messages_out is not None:
            self.messages_out.feed(data)
        self.codec.send_data(self.h2, data)

    def send_response_end(self) -> None:
        self.codec.end_stream(self.h2)

    def send_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.grpc and self.stream is not None:
            self.stream.grpc_status = grpc_status_of(trailers)
        self.codec.end_stream(self.h2, trailers)

    def flush(self) -> None:
        self.connection.flush()

    def send_local_reply(self, stream: Stream, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> None:
        if self.h2.closed:
            return
        date = (b"date", DATE.value())
        server = (b"server", self.server_name)
        if self.grpc:  # trailers-only, as Envoy's sendLocalReply answers a gRPC request
            headers = grpc_local_reply_headers(status, body, extra)
            stream.grpc_status = grpc_status_of(headers)
            stream.status = 200  # what went on the wire (the access log's and the metrics' response code)
            block = [(b":status", b"200"), *headers, date, server]
            self.codec.send_headers(self.h2, block, True)
        else:
            head_only = stream.head.method == b"HEAD"
            block = [(b":status", status_value(status)), (b"content-length", b"%d" % len(body))]
            if body:
                block.append((b"content-type", b"text/plain"))
            block += extra
            block.append(date)
            block.append(server)
            no_body = not body or head_only
            self.codec.send_headers(self.h2, block, no_body)
            if not no_body:
                self.codec.send_data(self.h2, body)
                self.codec.end_stream(self.h2)
        self.connection.flush()

    def send_continue(self, stream: Stream) -> None:
        pass  # HTTP/2 requests carry no Expect here (the codec never sets expect_continue)

    def reset_stream(self, stream: Stream) -> None:
        """The response was cut short: RST_STREAM, so the client never takes it for complete."""
        self.codec.reset(self.h2, INTERNAL_ERROR)
        self.connection.flush()

    def pause_reading(self, reason: int) -> None:
        if not self.read_paused:
            self.codec.pause(self.h2)
        self.read_paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.read_paused & reason:
            return
        self.read_paused &= ~reason
        if not self.read_paused:
            self.codec.resume(self.h2)
            self.connection.flush()

    def stream_done(self, stream: Stream) -> None:
        self.active_task = None
        if self.remote_reset:
            stream.flags = (stream.flags & ~DC) | DR
            stream.details = REMOTE_RESET
        error = self.error
        if error is not None:
            stream.flags = (stream.flags & ~DC) | protocol_error_flag(error)
            stream.details = error.detail
            if not stream.response_started:  # e.g. 408 while the request comes, 504 after it (stream idle)
                stream.status = error.status
                self.send_local_reply(stream, error.status, protocol_error_body(error), ())
                stream.response_started = stream.response_complete = True
        if self.messages_in is not None and self.messages_out is not None:
            stream.request_messages = self.messages_in.count
            stream.response_messages = self.messages_out.count
        self.connection.telemetry.on_complete(stream)
        h2stream = self.h2
        if not h2stream.closed:
            if stream.response_started and not stream.response_complete:
                self.codec.reset(h2stream, INTERNAL_ERROR)  # a response cut short must not look complete
            elif not stream.response_started:
                self.codec.reset(h2stream, CANCEL)
            elif not stream.request_complete:
                self.codec.reset(h2stream, NO_ERROR)  # answered whole: the rest of the request is not wanted
        h2stream.events = None
        self.stream = None  # no cycle left: freed by its last reference, not by the cyclic collector
        self.connection.stream_finished(self)

    # ---- Connection (a stream is drained with its connection)

    def drain(self) -> None:
        self.connection.drain()

    def reset_after_write(self) -> None:
        self.codec.reset(self.h2, INTERNAL_ERROR)
        self.connection.flush()

    # ---- the stream's events (StreamEvents, from the codec)

    def on_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        stream = self.stream
        if stream is not None and not stream.ended:
            if self.max_body:
                self.body_bytes += len(data)
                if self.body_bytes > self.max_body:  # Envoy's 413 for a body over the buffer limit
                    self.error = BODY_TOO_LARGE
                    self._stop()
                    return
            if self.messages_in is not None:
                self.messages_in.feed(data)
            stream.on_request_body(data)

    def on_end(self) -> None:
        stream = self.stream
        if stream is not None and not stream.ended and not stream.request_complete:
            stream.on_request_end()

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        stream = self.stream
        if stream is not None and not stream.ended and not stream.request_complete:
            stream.on_request_trailers(headers)

    def on_reset(self, error_code: int, remote: bool) -> None:
        """RST_STREAM from the client (DR), or the connection is gone (DC): stop the exchange."""
        stream = self.stream
        if stream is None or stream.ended:
            return
        self.remote_reset = remote
        self._stop()

    def idle_out(self) -> None:
        stream = self.stream
        if stream is None or stream.ended:
            return
        self.error = stream_idle_timeout(stream.request_complete)
        self._stop()

    def _stop(self) -> None:
        """Stop the exchange, which then finishes the stream (stream_done)."""
        stream = self.stream
        assert stream is not None
        task = self.active_task
        if task is not None and not task.done():
            task.cancel()
            task.add_done_callback(self._finish_if_never_ran)
        else:
            abandon(self, stream)

    def _finish_if_never_ran(self, task: asyncio.Task[None]) -> None:
        stream = self.stream
        if task.cancelled() and stream is not None and not stream.ended:
            abandon(self, stream)

    def on_write_blocked(self) -> None:
        if self.stream is not None:
            self.stream.pause_upstream_reads()

    def on_writable(self) -> None:
        if self.stream is not None:
            self.stream.resume_upstream_reads()

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        pass  # a server stream receives no response
