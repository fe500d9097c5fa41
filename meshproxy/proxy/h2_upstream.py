"""The upstream side, HTTP/2: few connections per endpoint, many streams on each (`UpstreamStream` per stream).

A cluster speaks HTTP/2 upstream when Istio would (routing/traffic.upstream_http2). Its endpoint pool
(`H2EndpointPool`, the `MultiplexedPool` of upstream.py) opens a stream on a connection with room: fewer streams
than the peer's SETTINGS_MAX_CONCURRENT_STREAMS and the DestinationRule's `maxConcurrentStreams`, and fewer
requests so far than `maxRequestsPerConnection`. When none has room it connects another, within the cluster's
`maxConnections` (then waits as a pending request, within `http1MaxPendingRequests`, as Envoy's pool does);
`http2MaxRequests` is the exchange's circuit breaker (503 `UO`). A connection idle (no stream) for the idle
timeout is closed; one the upstream sent GOAWAY on takes no new stream and closes when its streams are done.

Translation from any downstream (Envoy's): `:authority` from the request's authority (an HTTP/1.1 Host),
connection-specific headers never sent (they are in the exchange's drop set), `te` only as `trailers`; a response
hands its trailers on (an HTTP/1.1 client's transport drops them). An upstream RST_STREAM is Envoy's `UR`
(`remote reset`; `remote refused stream reset` for REFUSED_STREAM or a stream above a GOAWAY), a connection lost
under a stream `UC`, a protocol error `UPE`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from ..http2.codec import CANCEL, REFUSED_STREAM, ConnectionEvents, H2Codec, H2Error, H2Settings, H2Stream, StreamEvents
from ..messages import HeaderBlock, RequestHead
from .local_reply import (
    ConnectFailureError,
    ConnectionTerminationError,
    RefusedStreamError,
    RemoteResetError,
    UpstreamError,
    UpstreamOverflowError,
    UpstreamProtocolError,
)
from .upstream import WRITE_HIGH_WATER, WRITE_LOW_WATER, MultiplexedPool, ResponseSink, UpstreamPool, UpstreamStream

if TYPE_CHECKING:
    from ..security.client_tls import UpstreamTLS
    from .balancer import ClusterState

log = logging.getLogger("meshproxy.h2.upstream")

DEFAULT_MAX_STREAMS: Final = 1024  # Envoy's max_concurrent_streams default


class H2UpstreamStream(UpstreamStream, StreamEvents):
    """One request on a shared HTTP/2 connection."""

    __slots__ = ("connection", "h2", "head_done", "done", "pending_flush")

    def __init__(self, connection: H2UpstreamConnection) -> None:
        super().__init__()
        self.connection = connection
        self.h2: H2Stream | None = None
        self.head_done = False  # the response head arrived
        self.done = False  # released or discarded
        self.pending_flush = False
        self.reused = False  # a refused stream is retried by policy (refused-stream), not as a reused connection
        self.served = connection.served
        self.peer_principal = connection.peer_principal  # the server's, on mutual TLS (telemetry's label)

    # ---- request side (called by the exchange)

    def attach(self, sink: ResponseSink, head_only: bool) -> None:
        self.sink = sink

    def send_head(self, method: bytes, path: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
                  drop: frozenset[bytes], extra: list[HeaderBlock], content_length: int | None,
                  end_stream: bool) -> None:
        connection = self.connection
        self.h2 = h2 = connection.codec.open_stream(self)
        length = content_length if content_length is not None and not end_stream else -1
        connection.codec.send_request_head(h2, method, authority, path, headers, drop, extra, length, end_stream)
        connection.flush_soon()

    def send_body(self, data: bytes) -> None:
        if self.h2 is not None:
            self.connection.codec.send_data(self.h2, data)
            self.connection.flush_soon()

    def end_body(self) -> None:
        if self.h2 is not None:
            self.connection.codec.end_stream(self.h2)
            self.connection.flush_soon()

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.h2 is not None:
            self.connection.codec.end_stream(self.h2, trailers)
            self.connection.flush_soon()

    def pause_reading(self) -> None:
        if self.h2 is not None:
            self.connection.codec.pause(self.h2)

    def resume_reading(self) -> None:
        if self.h2 is not None:
            self.connection.codec.resume(self.h2)
            self.connection.flush()

    def release(self) -> None:
        self._finish(False)

    def discard(self) -> None:
        self._finish(True)

    def _finish(self, reset: bool) -> None:
        if self.done:
            return
        self.done = True
        self.sink = None
        h2stream = self.h2
        if h2stream is not None:
            h2stream.events = None
            if reset and not h2stream.closed:
                self.connection.codec.reset(h2stream, CANCEL)
                self.connection.flush()
        self.connection.stream_finished(self, not reset)

    # ---- the stream's events (StreamEvents, from the codec)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        self.head_done = True
        h2 = self.h2
        content_length = h2.expected if h2 is not None and h2.expected >= 0 else None  # the codec read it
        self._touch()
        sink.on_response_head(status, headers, 0 if end_stream else content_length, end_stream)

    def on_data(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            self._touch()
            sink.on_response_body(data)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is not None:
            self._touch()
            self.connection.served += 1
            sink.on_response_trailers(headers)

    def on_end(self) -> None:
        sink = self.sink
        if sink is not None:
            self._touch()
            self.connection.served += 1
            sink.on_response_end()

    def on_reset(self, error_code: int, remote: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        error: UpstreamError
        if remote:
            error = RefusedStreamError() if error_code == REFUSED_STREAM and not self.head_done else RemoteResetError()
        else:
            error = self.connection.failure or ConnectionTerminationError()
        self.done = True
        self.connection.stream_finished(self, False)
        sink.on_upstream_error(error)

    def on_write_blocked(self) -> None:
        if self.sink is not None:
            self.sink.pause_upstream_writes()

    def on_writable(self) -> None:
        if self.sink is not None:
            self.sink.resume_upstream_writes()

    def _touch(self) -> None:
        if not self.pending_flush:
            self.pending_flush = True
            self.connection.touched.append(self)


class H2UpstreamConnection(ConnectionEvents):
    """One HTTP/2 connection to an endpoint (an asyncio protocol by its methods)."""

    __slots__ = ("pool", "key", "transport", "codec", "streams", "started", "served", "peer_max", "closed",
                 "going_away", "touched", "failure", "idle_timer", "limits_max_streams", "limits_max_requests",
                 "idle_timeout", "peer_principal", "flush_pending", "loop")

    def __init__(self, pool: H2EndpointPool, key: tuple[str, str, int], settings: H2Settings,
                 max_requests: int, idle_timeout: float) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.codec = H2Codec(True, self, settings)
        self.streams = 0  # streams in flight
        self.started = 0  # streams ever opened (maxRequestsPerConnection)
        self.served = 0  # responses completed
        self.peer_max = DEFAULT_MAX_STREAMS  # until the server's SETTINGS says otherwise
        self.limits_max_streams = settings.max_concurrent_streams
        self.limits_max_requests = max_requests  # 0: unlimited
        self.idle_timeout = idle_timeout
        self.closed = False
        self.going_away = False  # GOAWAY received (or the request limit reached): no new stream
        self.touched: list[H2UpstreamStream] = []  # streams with events in the read being handled
        self.failure: UpstreamError | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.peer_principal = ""  # the server's SPIFFE principal on a mutual TLS connection
        self.flush_pending = False
        # kept: asyncio.get_running_loop() costs a getpid() system call on CPython 3.11, per request here
        self.loop = asyncio.get_running_loop()

    def has_room(self) -> bool:
        return not self.closed and not self.going_away and \
            self.streams < min(self.peer_max, self.limits_max_streams) and \
            (not self.limits_max_requests or self.started < self.limits_max_requests)

    def new_stream(self) -> H2UpstreamStream:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.streams += 1
        self.started += 1
        return H2UpstreamStream(self)

    def stream_finished(self, stream: H2UpstreamStream, clean: bool) -> None:
        self.streams -= 1
        if self.limits_max_requests and self.started >= self.limits_max_requests:
            self.going_away = True
        if self.streams == 0:
            if self.going_away or self.closed:
                self.close()
            elif self.idle_timeout:
                self.idle_timer = self.loop.call_later(self.idle_timeout, self._on_idle)
        self.pool.room_made()

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Write once the callback running now is over: a request's head, body and end (and other streams' parts
        from the same downstream read) go out in one write instead of one each."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self.flush_pending = False
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.pool.forget(self)
        if self.transport is not None:
            self.codec.goaway()
            self.flush()
            self.transport.close()

    def _on_idle(self) -> None:
        self.idle_timer = None
        if self.streams == 0:
            self.close()

    # ---- asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport = cast(asyncio.Transport, transport)
        stream_transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.codec.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.codec.feed(data)
        except H2Error as error:
            log.debug("upstream %s: %s", self.key, error.detail)
            self.failure = UpstreamProtocolError()
            self.flush()
            self._lost()
            return
        self.flush()
        touched = self.touched
        if touched:
            self.touched = []
            for stream in touched:
                stream.pending_flush = False
                sink = stream.sink
                if sink is not None:
                    sink.flush()  # after the whole read: one downstream write per stream

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def pause_writing(self) -> None:
        self.codec.pause_writing()

    def resume_writing(self) -> None:
        self.codec.resume_writing()
        self.flush()

    def _lost(self) -> None:
        was_closed = self.closed
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not was_closed:
            self.pool.forget(self)
        self.codec.fail_all(CANCEL)  # each stream in flight: on_reset, not remote -> UC (or UPE)
        if self.transport is not None:
            self.transport.close()

    # ---- codec callbacks (ConnectionEvents)

    def on_request(self, stream: H2Stream, head: RequestHead, end_stream: bool) -> None:
        pass  # a client receives no requests (h2 refuses pushes: ENABLE_PUSH 0)

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """No new stream here; the streams above `last_stream_id` were never processed: refused (retriable)."""
        self.going_away = True
        self.pool.forget(self)
        for stream in list(self.codec.streams.values()):
            if stream.id > last_stream_id or error_code:
                self.codec.streams.pop(stream.id, None)
                stream.closed = True
                if stream.events is not None:
                    stream.events.on_reset(REFUSED_STREAM if stream.id > last_stream_id else error_code,
                                           stream.id > last_stream_id)
        if self.streams == 0:
            self.close()

    def on_capacity(self, max_streams: int) -> None:
        self.peer_max = max_streams
        self.pool.room_made()


class H2EndpointPool(MultiplexedPool):
    """One endpoint's HTTP/2 connections (see the module docstring)."""

    __slots__ = ("pool", "key", "connections", "connecting", "state")

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int], state: ClusterState) -> None:
        self.pool = pool
        self.key = key
        self.state = state
        self.connections: list[H2UpstreamConnection] = []
        self.connecting: asyncio.Future[H2UpstreamConnection] | None = None  # one connect at a time, shared

    def open_stream(self) -> UpstreamStream | None:
        for connection in self.connections:
            if connection.has_room():
                return connection.new_stream()
        return None

    async def acquire(self, state: ClusterState, connect_timeout: float, tls: UpstreamTLS | None = None
                      ) -> UpstreamStream:
        self.state = state  # a reload may bring a new ClusterState for the same cluster
        limits = state.policy.pool
        while True:
            stream = self.open_stream()
            if stream is not None:
                return stream
            if self.connecting is not None:  # a connect under way: its connection will have room
                await asyncio.shield(self.connecting)
                continue
            if state.connections < limits.max_connections:
                break
            if state.pending >= limits.max_pending:  # maxConnections reached and no room: pending, within limits
                raise UpstreamOverflowError()
            waiter = asyncio.get_running_loop().create_future()
            state.waiters.append(waiter)
            state.pending += 1
            try:
                await waiter
            finally:
                state.pending -= 1
        state.connections += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[H2UpstreamConnection] = loop.create_future()
        self.connecting = future
        try:
            connection = await self._connect(state, connect_timeout, tls)
        except BaseException as exc:
            state.connections -= 1
            state.wake_one()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self.connecting = None
        self.connections.append(connection)
        future.set_result(connection)
        stream = connection.new_stream()
        return stream

    async def _connect(self, state: ClusterState, timeout: float, tls: UpstreamTLS | None) -> H2UpstreamConnection:
        """A new connection, over TLS when the endpoint's `tls` says so (upstream_tls.py: ALPN for HTTP/2, the
        server's identity checked before the preface is sent)."""
        loop = asyncio.get_running_loop()
        limits = state.policy.pool
        settings = H2Settings(max_concurrent_streams=limits.max_concurrent_streams or DEFAULT_MAX_STREAMS)
        idle = limits.idle_timeout if limits.idle_timeout else self.pool.idle_timeout
        factory = cast(Callable[[], asyncio.Protocol],
                       lambda: H2UpstreamConnection(self, self.key, settings, limits.max_requests_per_connection,
                                                    idle))
        if tls is not None:
            return await self._connect_tls(state, factory, timeout, tls)
        try:
            async with asyncio.timeout(timeout):
                _, connected = await loop.create_connection(factory, self.key[1], self.key[2])
        except TimeoutError:
            raise ConnectFailureError("connection timeout") from None
        except ConnectionRefusedError as exc:
            raise ConnectFailureError("remote connection failure",
                                      f"delayed connect error: {exc.errno or errno.ECONNREFUSED}") from None
        except OSError as exc:
            raise ConnectFailureError("remote connection failure", f"delayed connect error: {exc.errno}") from None
        self.pool.opened += 1
        return cast(H2UpstreamConnection, connected)

    async def _connect_tls(self, state: ClusterState, factory: Callable[[], asyncio.Protocol], timeout: float,
                           tls: UpstreamTLS) -> H2UpstreamConnection:
        from ..security.client_tls import HTTP2
        from .upstream_tls import connect_tls

        bind = state.cluster.bind_address
        connected, principal = await connect_tls(self.key[1], self.key[2], timeout, tls, HTTP2, bind)
        connection = cast(H2UpstreamConnection, factory())
        connection.peer_principal = principal
        connected.hand_over(cast(asyncio.Protocol, connection))  # the preface goes out now, to a checked server
        self.pool.opened += 1
        return connection

    def forget(self, connection: H2UpstreamConnection) -> None:
        """A connection that takes no new stream: out of the list, its slot back to the circuit breaker."""
        if connection in self.connections:
            self.connections.remove(connection)
            self.state.connections -= 1
            self.state.wake_one()

    def room_made(self) -> None:
        if self.state.waiters:
            self.state.wake_one()

    def close_idle(self) -> None:
        for connection in list(self.connections):
            if connection.streams == 0:
                connection.close()

    def retire(self) -> None:
        """No new stream on the connections made so far (its cluster's TLS changed); busy ones close when done."""
        for connection in list(self.connections):
            connection.going_away = True
            self.forget(connection)
            if connection.streams == 0:
                connection.close()
