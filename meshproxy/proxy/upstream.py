"""Upstream connections and their pool, keyed by endpoint.

One UpstreamConnection carries one request at a time (HTTP/1.1, the codec in `http1/client.py`). Its codec's
callbacks hand the response straight to the attached `ResponseSink` (the exchange's stream), which hands it
downstream, so no response byte waits for a task switch. Idle connections are kept per endpoint for reuse and
closed after `idle_timeout`, shorter than the usual application keep-alive, so the proxy is not the one surprised
by a server-side close (istio/istio#55138).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from mypy_extensions import trait

from ..http1.client import ClientCodec, TunnelClientCodec
from ..http1.errors import ProtocolError, Upgraded
from ..http1.wire import LAST_CHUNK, chunk, request_head
from ..messages import HeaderBlock, ResponseEvents
from .local_reply import (
    ConnectFailureError,
    ConnectionTerminationError,
    ResponseResetError,
    UpstreamError,
    UpstreamOverflowError,
    UpstreamProtocolError,
    connect_error,
)

if TYPE_CHECKING:
    from ..security.client_tls import UpstreamTLS
    from .balancer import ClusterState, EndpointState

log = logging.getLogger("meshproxy.upstream")

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024

@trait
class ResponseSink(ResponseEvents):
    """What an UpstreamConnection reports to: the exchange's Stream, or a mirror's sink. The codec's response events
    and the connection's; a mypyc trait (the Stream's base class is its record), so compiled code calls it directly.
    """

    __slots__ = ()

    def flush(self) -> None:  # after each read (and after an end by close): deliver what it produced
        raise NotImplementedError

    def on_upstream_error(self, error: UpstreamError) -> None:
        raise NotImplementedError

    def pause_upstream_writes(self) -> None:
        raise NotImplementedError

    def resume_upstream_writes(self) -> None:
        raise NotImplementedError


class UpstreamStream:
    """One attempt's request and its response, as the exchange sees it, whatever the protocol: the seam an upstream
    codec plugs into (HTTP/1.1's is a whole `UpstreamConnection`; HTTP/2's would be a stream on a shared one).
    The exchange sends the request through it and hears the response through its `ResponseSink`; when the
    attempt is over it releases the stream (the response ended whole) or discards it (anything else)."""

    __slots__ = ("sink", "reused", "served", "peer_principal")

    def __init__(self) -> None:
        self.sink: ResponseSink | None = None
        self.reused = False  # its connection had served before (a reset then is the reused-connection case)
        self.served = 0  # responses its connection has completed
        self.peer_principal = ""  # the server's SPIFFE principal on a mutual TLS connection (telemetry's label)

    def attach(self, sink: ResponseSink, head_only: bool) -> None:
        raise NotImplementedError

    def send_head(self, method: bytes, path: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
                  drop: frozenset[bytes], extra: list[HeaderBlock], content_length: int | None,
                  end_stream: bool) -> None:
        """The request head: `headers` less the names in `drop`, then `extra`; a body of unknown length
        (`content_length` None, not `end_stream`) is streamed as the protocol frames it."""
        raise NotImplementedError

    def send_body(self, data: bytes) -> None:
        raise NotImplementedError

    def end_body(self) -> None:
        raise NotImplementedError

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """End the request with trailers; HTTP/1.1 drops them (Envoy's default, without enable_trailers)."""
        self.end_body()

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class UpstreamConnection(UpstreamStream, ResponseEvents):
    """One HTTP/1.1 connection to an endpoint: the asyncio protocol around a `ClientCodec` (one request at a time).
    The codec's response events go on to the attached `ResponseSink`."""

    __slots__ = ("pool", "key", "transport", "codec", "chunked_request", "closed", "idle_until", "owner")

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int], owner: ClusterState | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.key = key  # (cluster name, address, port): each cluster has its own connections, as in Envoy
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.codec = ClientCodec(self)
        self.chunked_request = False
        self.closed = False
        self.idle_until = 0.0  # loop time after which an idle connection is closed (the pool's sweep)

    @property
    def keep_alive(self) -> bool:
        return self.codec.keep_alive

    # ---- request side (called by the exchange)

    def attach(self, sink: ResponseSink, head_only: bool) -> None:
        self.sink = sink
        self.codec.expect(head_only)

    def send_head(self, method: bytes, path: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
                  drop: frozenset[bytes], extra: list[HeaderBlock], content_length: int | None,
                  end_stream: bool) -> None:
        assert self.transport is not None
        self.chunked_request = chunked = content_length is None and not end_stream  # HTTP/1.1 streams chunked
        self.transport.write(request_head(method, path, authority, headers, drop, extra, content_length, chunked))

    def send_body(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(chunk(data) if self.chunked_request else data)

    def end_body(self) -> None:
        if self.chunked_request:
            assert self.transport is not None
            self.transport.write(LAST_CHUNK)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def release(self) -> None:
        self.pool.release(self)

    def discard(self) -> None:
        self.pool.discard(self)

    def abort(self) -> None:
        self.sink = None
        self.mark_closed()
        if self.transport is not None:
            self.transport.abort()

    def mark_closed(self) -> None:
        """Once per connection: give its slot back to the cluster's circuit breaker."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        if owner is not None:
            owner.connections -= 1
            owner.wake_one()

    # ---- asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream_transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        stream_transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection (or after a complete response): the connection is unusable.
            log.debug("upstream %s sent %d unexpected bytes; closing", self.key, len(data))
            self.abort()
            self.pool.forget(self)
            return
        try:
            self.codec.feed(data)
        except ProtocolError as exc:
            self._fail(UpstreamProtocolError(), exc.detail)
        except Upgraded as upgrade:  # 101 Switching Protocols: the rest of the connection is the tunnel's
            self.codec = TunnelClientCodec(self)
            self.codec.feed(upgrade.rest)
        sink.flush()  # after the whole read: a response that ended in it is handed over only now

    def eof_received(self) -> bool:
        self._closed_by_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_upstream_writes()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_upstream_writes()

    # ---- codec callbacks (ResponseEvents)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_response_head(status, headers, content_length, end_stream)

    def on_response_body(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_response_body(data)

    def on_response_end(self) -> None:
        sink = self.sink
        self.sink = None
        self.served += 1
        if sink is not None:
            sink.on_response_end()

    # ---- internals

    def _fail(self, error: UpstreamError, detail: str) -> None:
        log.debug("upstream %s: %s (%s)", self.key, error.reason, detail)
        sink = self.sink
        head_done = self.codec.head_done
        self.abort()
        self.pool.forget(self)
        if sink is not None:
            sink.on_upstream_error(ResponseResetError() if head_done else error)

    def _closed_by_peer(self) -> None:
        if self.closed:
            return
        self.mark_closed()
        self.pool.forget(self)
        sink = self.sink
        if sink is None:
            if self.transport is not None:
                self.transport.close()
            return
        if self.codec.close():  # a close-delimited body ends here
            sink.flush()
        else:
            self.sink = None
            sink.on_upstream_error(ResponseResetError() if self.codec.head_done else ConnectionTerminationError())
        if self.transport is not None:
            self.transport.close()


class MultiplexedPool:
    """One endpoint's multiplexed (HTTP/2) connections, as the pool sees them (proxy/h2_upstream.py): a stream on a
    connection with room, at once, or after connecting within the cluster's limits."""

    __slots__ = ()

    def open_stream(self) -> UpstreamStream | None:
        raise NotImplementedError

    async def acquire(self, state: ClusterState, connect_timeout: float, tls: UpstreamTLS | None = None
                      ) -> UpstreamStream:
        raise NotImplementedError

    def close_idle(self) -> None:
        raise NotImplementedError

    def retire(self) -> None:
        """Its cluster's TLS settings changed: no new stream on its connections; each closes when idle."""
        raise NotImplementedError


MultiplexerFactory = Callable[["UpstreamPool", tuple[str, str, int], "ClusterState"], MultiplexedPool]


class UpstreamPool:
    """Idle keep-alive connections per (cluster, endpoint); new ones on demand, within the cluster's limits.
    A cluster whose upstream speaks HTTP/2 has a `MultiplexedPool` per endpoint instead, made by `multiplexer`."""

    def __init__(self, idle_timeout: float, connect_timeout: float,
                 multiplexer: MultiplexerFactory | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.multiplexer = multiplexer
        self.multiplexed: dict[tuple[str, str, int], MultiplexedPool] = {}
        self.client_view: UpstreamPool | None = None
        self.idle: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self.active = 0  # connections out of the pool, carrying a request
        self.opened = 0
        # One timer for the whole pool, at the earliest idle deadline, instead of a timer set and cancelled per
        # request (a connection back in the pool after each response, out again with the next request).
        self.sweep: asyncio.TimerHandle | None = None
        self.sweep_at = 0.0

    async def acquire(self, state: ClusterState, target: EndpointState, connect_timeout: float | None = None
                      ) -> UpstreamStream:
        key = target.pool_key
        limits = state.policy.pool
        if state.cluster.http2 and self.multiplexer is not None:
            return await self.acquire_stream(key, state, connect_timeout, target.tls)
        while True:
            conn = self.reuse(key)
            if conn is not None:
                return conn
            if state.connections < limits.max_connections or self._evict_idle(state):
                break
            # tcp.maxConnections reached: queue as a pending request, within http1MaxPendingRequests.
            if state.pending >= limits.max_pending:
                raise UpstreamOverflowError()
            waiter = asyncio.get_running_loop().create_future()
            state.waiters.append(waiter)
            state.pending += 1
            try:
                await waiter
            finally:
                state.pending -= 1
        state.connections += 1
        try:
            conn = await self._connect(key, state, connect_timeout or limits.connect_timeout or self.connect_timeout,
                                       target.tls)
        except BaseException:
            state.connections -= 1
            state.wake_one()
            raise
        self.active += 1
        return conn

    async def acquire_stream(self, key: tuple[str, str, int], state: ClusterState,
                             connect_timeout: float | None = None, tls: UpstreamTLS | None = None) -> UpstreamStream:
        """A stream on one of the endpoint's HTTP/2 connections (`key`'s pool), connecting within the limits (over
        TLS when `tls`, the endpoint's)."""
        assert self.multiplexer is not None
        mux = self.multiplexed.get(key)
        if mux is None:
            mux = self.multiplexed[key] = self.multiplexer(self, key, state)
        return await mux.acquire(state, connect_timeout or state.policy.pool.connect_timeout or self.connect_timeout,
                                 tls)

    def for_http2_clients(self) -> UpstreamPool:
        """The pool as HTTP/2 clients' streams use it (made once): clusters that follow the client go HTTP/2."""
        view = self.client_view
        if view is None:
            view = self.client_view = ClientProtocolPool(self)
        return view

    def reuse(self, key: tuple[str, str, int]) -> UpstreamStream | None:
        """An idle keep-alive connection for (cluster name, address, port), or a stream on a multiplexed connection
        with room, without waiting; None if there is none."""
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the warmest, and the others may expire
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                self.active += 1
                return conn
        # Only when no HTTP/1.1 connection is idle (the HTTP/1.1 path then connects anyway): one dict lookup.
        mux = self.multiplexed.get(key) if self.multiplexed else None
        return mux.open_stream() if mux is not None else None

    def _evict_idle(self, state: ClusterState) -> bool:
        """At the connection limit, an idle connection to another endpoint of the cluster makes room."""
        name = state.cluster.name
        for key, conns in self.idle.items():
            if key[0] == name and conns:
                self._expire(conns[0])
                return True
        return False

    async def _connect(self, key: tuple[str, str, int], state: ClusterState, timeout: float,
                       tls: UpstreamTLS | None = None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        # The connection is a protocol by its methods, not by asyncio.Protocol as a base (its base is the codec's
        # handler); the event loop asks for no more.
        factory = cast(Callable[[], asyncio.Protocol], lambda: UpstreamConnection(self, key, state))
        bind = state.cluster.bind_address  # Istio's inbound clusters connect from 127.0.0.6
        if tls is not None:
            return await self._connect_tls(key, factory, timeout, tls, bind)
        try:
            async with asyncio.timeout(timeout):
                _, connected = await loop.create_connection(factory, key[1], key[2],
                                                            local_addr=(bind, 0) if bind else None)
        except TimeoutError:
            raise ConnectFailureError("connection timeout") from None
        except ConnectionRefusedError as exc:
            raise ConnectFailureError("remote connection failure",
                                      connect_error(exc.errno or errno.ECONNREFUSED)) from None
        except OSError as exc:
            raise ConnectFailureError("remote connection failure", connect_error(exc.errno)) from None
        self.opened += 1
        return cast(UpstreamConnection, connected)

    async def _connect_tls(self, key: tuple[str, str, int], factory: Callable[[], asyncio.Protocol], timeout: float,
                           tls: UpstreamTLS, bind: str = "") -> UpstreamConnection:
        """TCP, the TLS handshake (ALPN for HTTP/1.1), the server's SANs (upstream_tls.py); a failure is Envoy's 503
        UF with the TLS transport failure reason."""
        from ..security.client_tls import HTTP11
        from .upstream_tls import connect_tls

        connected, principal = await connect_tls(key[1], key[2], timeout, tls, HTTP11, bind)
        conn = cast(UpstreamConnection, factory())
        conn.peer_principal = principal
        connected.hand_over(cast(asyncio.Protocol, conn))
        self.opened += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool after a complete response, or closed if it cannot be reused."""
        self.active -= 1
        conn.sink = None
        owner = conn.owner
        limits = owner.policy.pool if owner is not None else None
        if conn.closed or not conn.keep_alive or conn.transport is None or conn.transport.is_closing() or \
                (limits is not None and limits.max_requests_per_connection
                 and conn.served >= limits.max_requests_per_connection) or (owner is not None and owner.retired):
            conn.mark_closed()
            if conn.transport is not None:
                conn.transport.close()
            return
        idle_timeout = limits.idle_timeout if limits is not None and limits.idle_timeout else self.idle_timeout
        loop = asyncio.get_running_loop()
        conn.idle_until = until = loop.time() + idle_timeout
        if self.sweep is None or until < self.sweep_at:
            if self.sweep is not None:
                self.sweep.cancel()
            self.sweep_at = until
            self.sweep = loop.call_at(until, self._sweep)
        self.idle.setdefault(conn.key, []).append(conn)
        if owner is not None and owner.waiters:
            owner.wake_one()

    def discard(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange did not end cleanly: never reused."""
        self.active -= 1
        conn.abort()
        self.forget(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        """Close the connections idle past their deadline; come back at the next deadline, if any."""
        self.sweep = None
        now = asyncio.get_running_loop().time()
        expired = [conn for conns in self.idle.values() for conn in conns if conn.idle_until <= now]
        for conn in expired:
            self._expire(conn)
        following = min((conn.idle_until for conns in self.idle.values() for conn in conns), default=None)
        if following is not None:
            self.sweep_at = following
            self.sweep = asyncio.get_running_loop().call_at(following, self._sweep)

    def _expire(self, conn: UpstreamConnection) -> None:
        self.forget(conn)
        conn.mark_closed()
        if conn.transport is not None:
            conn.transport.close()

    def close_idle_of(self, cluster_name: str) -> None:
        """Close a cluster's idle connections and retire its HTTP/2 ones (its TLS settings changed: see
        Clusters.state), so that no request goes out on a connection whose server was checked under the old ones."""
        for key, conns in list(self.idle.items()):
            if key[0] == cluster_name:
                for conn in list(conns):
                    self._expire(conn)
        if self.multiplexed:
            names = (f"{cluster_name}|h2", f"{cluster_name}{FOLLOWS_CLIENT}|h2")
            for key, mux in list(self.multiplexed.items()):
                if key[0] in names:
                    mux.retire()

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def close_idle(self) -> None:
        for mux in list(self.multiplexed.values()):
            mux.close_idle()
        for conns in list(self.idle.values()):
            for conn in list(conns):
                self._expire(conn)
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None


FOLLOWS_CLIENT: Final = "|client"  # balancer.FOLLOWS_CLIENT_KEY: the pool key suffix of a cluster that follows the client


class ClientProtocolPool(UpstreamPool):
    """The pool as an HTTP/2 client's streams see it: a cluster that follows the client's protocol (its pool keys
    end in FOLLOWS_CLIENT: useClientProtocol, the inbound cluster) gets HTTP/2 streams here, under a key of its
    own; everything else is the shared pool's. HTTP/1.1 clients use the shared pool directly, at no cost."""

    def __init__(self, shared: UpstreamPool) -> None:
        super().__init__(shared.idle_timeout, shared.connect_timeout, shared.multiplexer)
        self.shared = shared
        self.multiplexed = shared.multiplexed

    def reuse(self, key: tuple[str, str, int]) -> UpstreamStream | None:
        if not key[0].endswith(FOLLOWS_CLIENT) or self.multiplexer is None:
            return self.shared.reuse(key)
        mux = self.multiplexed.get((key[0] + "|h2", key[1], key[2]))
        return mux.open_stream() if mux is not None else None

    async def acquire(self, state: ClusterState, target: EndpointState, connect_timeout: float | None = None
                      ) -> UpstreamStream:
        key = target.pool_key
        if not key[0].endswith(FOLLOWS_CLIENT) or self.multiplexer is None:
            return await self.shared.acquire(state, target, connect_timeout)
        return await self.shared.acquire_stream((key[0] + "|h2", key[1], key[2]), state, connect_timeout,
                                                target.tls)

    def close_idle(self) -> None:
        self.shared.close_idle()
