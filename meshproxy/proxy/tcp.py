"""Plain TCP proxying, as Envoy's tcp_proxy filter: byte for byte, one upstream connection per downstream one.

- The upstream: the cluster the routing chose (routing/l4.py), an endpoint of it by its load balancer, or, for an
  ORIGINAL_DST cluster (PassthroughCluster, a service found by an endpoint address, the inbound app), the
  connection's original destination, from the cluster's bind address (Istio's inbound 127.0.0.6).
- Failures close the client connection, as Envoy does: no cluster `NC`, no endpoint `UH` (BlackHoleCluster has
  none), the cluster's `tcp.maxConnections` reached `UO`, connect refused or timed out `UF`.
- Upstream TLS as for HTTP (security/client_tls.py, proxy/upstream_tls.py): the endpoint's DestinationRule `tls`
  or auto mTLS, ALPN for TCP (ISTIO_MUTUAL: Istio's in-mesh names; SIMPLE: none), no SNI nor name check unless
  the rule gives `sni` / `subjectAltNames` (auto SNI is Envoy's for HTTP only), the server's identity checked
  before a client byte goes out; a failed handshake is `UF` with its transport failure reason in the access log,
  and a mutual TLS peer's principal labels the TCP metrics (`destination_principal`).
- Half-close is honoured both ways: an EOF from one side is passed on (`write_eof`) and the other direction keeps
  flowing until it ends too; then both sides close (after their buffered bytes are written). A TLS upstream is
  half-closed as Envoy does it: close_notify, then reading goes on (proxy/tls_stream.py).
- Backpressure both ways: when one side's write buffer passes the high-water mark, the other side stops reading
  until it drains; bytes received before the upstream connects are held (up to PENDING_LIMIT, then reading pauses).
- Timeouts: connect (the cluster's `connectTimeout`, else the mesh's, 10 s), idle (no byte either way: Istio's
  tcp_proxy idle_timeout default, 1 h).
- Telemetry (telemetry/tcp.py): Istio's TCP metrics, updated as bytes move, and an access-log line at close.
- Authorization (`deny`): a connection the workload's AuthorizationPolicy refuses is closed before any upstream is
  dialled, its bytes dropped, as Envoy's network RBAC filter (termination details
  `rbac_access_denied_matched_policy[...]`, no response flag).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from ..routing.cluster import Cluster
from ..security.client_tls import PEER_EXCHANGE, TCP, UpstreamTLS
from ..stream_info import UF, UH, UO, NC, L4Info, format_address
from ..telemetry.metrics import Service, TcpSeries
from ..telemetry.peer import PEER_METADATA
from ..telemetry.peer_exchange import PeerExchangeReader, exchange_header
from ..telemetry.tcp import TcpTelemetry
from .balancer import Clusters, ClusterState
from .downstream import ConnectionBudget
from .local_reply import RBAC_DENIED_PREFIX, ConnectFailureError, connect_error
from .upstream import WRITE_HIGH_WATER, WRITE_LOW_WATER
from .upstream_tls import connect_tls

log = logging.getLogger("meshproxy.tcp")

DEFAULT_IDLE_TIMEOUT: Final = 3600.0  # Istio's tcp_proxy idle_timeout
DEFAULT_CONNECT_TIMEOUT: Final = 10.0  # meshConfig.connectTimeout
PENDING_LIMIT: Final = WRITE_HIGH_WATER  # downstream bytes held while the upstream connects


@dataclass(slots=True)
class TcpContext:
    """What every TCP connection of one listener shares."""

    name: str
    telemetry: TcpTelemetry
    clusters: Clusters
    rng: random.Random = field(default_factory=random.Random)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0 disables it
    connections: set[TcpProxy] = field(default_factory=set)
    budget: ConnectionBudget = field(default_factory=ConnectionBudget)  # --max-connections, shared by all listeners
    peer_exchange: bytes | None = None  # our TCP metadata exchange header, made at first use

    def exchange_header(self) -> bytes:
        """What this sidecar writes first on a mutual TLS connection that chose `istio-peer-exchange`."""
        if self.peer_exchange is None:
            mesh = self.telemetry.mesh
            metadata = dict(mesh.metadata) if mesh is not None else {}
            self.peer_exchange = exchange_header(mesh.node_id if mesh is not None else "",
                                                 metadata.get(PEER_METADATA, b""))
        return self.peer_exchange


class TcpProxy:
    """One proxied connection: the downstream transport's protocol, and the owner of the upstream one."""

    __slots__ = ("ctx", "info", "service", "loop", "downstream", "upstream", "pending", "pending_size",
                 "downstream_eof", "upstream_eof", "downstream_closed", "upstream_closed", "connecting", "done",
                 "last_activity", "timer", "series", "state", "opened", "counted", "upstream_tls", "exchange")

    def __init__(self, ctx: TcpContext, info: L4Info, service: Service) -> None:
        self.ctx = ctx
        self.info = info
        self.service = service  # the destination service of the metrics' labels
        self.loop = asyncio.get_running_loop()
        self.downstream: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.downstream_eof = False
        self.upstream_eof = False
        self.downstream_closed = False
        self.upstream_closed = True  # until a connection exists
        self.connecting: asyncio.Task[None] | None = None
        self.done = False
        self.last_activity = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.series: TcpSeries | None = None
        self.state: ClusterState | None = None
        self.opened = False  # counted in the metrics (see _open)
        self.counted = False  # holds a slot of the connection budget
        self.upstream_tls: UpstreamTLS | None = None  # the picked endpoint's TLS (None: plaintext)
        self.exchange: PeerExchangeReader | None = None  # Istio's TCP metadata exchange, when its ALPN was chosen

    # ---- start: the transparent listener hands over an accepted connection and what it has read of it

    def take(self, transport: asyncio.Transport, buffered: bytes, cluster: Cluster | None) -> None:
        self.downstream = transport
        transport.set_protocol(self)  # type: ignore[arg-type]  # an asyncio protocol by its methods
        if not self.ctx.budget.take():
            log.debug("tcp %s: over the limit of %d connections: closed", self.ctx.name, self.ctx.budget.limit)
            self.done = True
            transport.abort()
            return
        self.counted = True
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.ctx.connections.add(self)
        self.info.cluster = cluster
        if buffered:
            self._from_downstream(buffered)
        address = self._target(cluster)
        if address is None:
            self._open()
            self._close_downstream()
            return
        self._arm()
        self.upstream_closed = False
        self.connecting = self.loop.create_task(self._connect(address, cluster))

    def deny(self, transport: asyncio.Transport, buffered: bytes, cluster: Cluster | None, policy_id: str) -> None:
        """Refused by authorization (`policy_id`: the DENY rule that matched, or `none`): closed at once, nothing
        forwarded. Envoy decides on the first bytes after connecting its upstream and then closes both; here the
        app is never dialled. Counted opened and closed, and logged, as Envoy's TCP proxy does."""
        self.downstream = transport
        transport.set_protocol(self)  # type: ignore[arg-type]  # its connection_lost finishes the record
        info = self.info
        info.cluster = cluster
        info.received = len(buffered)
        info.termination_details = f"{RBAC_DENIED_PREFIX}[{policy_id}]"
        log.debug("tcp %s: connection from %s denied by %s", self.ctx.name, info.connection.peer_ip.decode(),
                  policy_id)
        self._open()
        transport.close()

    def _target(self, cluster: Cluster | None) -> tuple[str, int] | None:
        """The endpoint to connect to, or None (flags set) when there is none."""
        info = self.info
        if cluster is None:
            info.flags |= NC
            return None
        if cluster.original_destination:
            original = info.connection.original_destination
            if original is None:
                info.flags |= UH
                return None
            state = self.ctx.clusters.state(cluster)
            address = original
        else:
            state = self.ctx.clusters.state(cluster)
            target = state.pick(None, (), self.ctx.rng, self.loop.time())
            if target is None:
                info.flags |= UH
                return None
            address = (target.endpoint.address, target.endpoint.port)
            self.upstream_tls = target.tls
        if state.connections >= state.policy.pool.max_connections:  # tcp.maxConnections: Envoy's overflow
            info.flags |= UO
            return None
        state.connections += 1
        self.state = state
        info.endpoint = format_address(address)
        return address

    def _open(self) -> None:
        """Counted opened once the upstream connect has an outcome (its flags label the series); what moved before
        (bytes held while connecting) is counted then."""
        if self.opened:
            return
        self.opened = True
        info = self.info
        self.ctx.telemetry.on_open(info, self.service)
        series = self.series = info.series
        if series is not None:
            series.received += info.received
            series.sent += info.sent

    async def _connect(self, address: tuple[str, int], cluster: Cluster | None) -> None:
        assert cluster is not None
        timeout = cluster.policy.pool.connect_timeout or self.ctx.connect_timeout
        local = (cluster.bind_address, 0) if cluster.bind_address else None
        factory = cast(Callable[[], asyncio.Protocol], lambda: _Upstream(self))
        tls = self.upstream_tls
        try:
            if tls is None:
                async with asyncio.timeout(timeout):
                    await self.loop.create_connection(factory, address[0], address[1], local_addr=local)
            else:
                connected, principal = await connect_tls(address[0], address[1], timeout, tls, TCP,
                                                         cluster.bind_address)
                self.info.upstream_principal = principal  # before the open binds the metrics' labels
                if connected.selected_alpn() == PEER_EXCHANGE:
                    self.exchange = PeerExchangeReader()
                connected.hand_over(factory())
        except (OSError, TimeoutError, ConnectFailureError) as exc:
            if isinstance(exc, ConnectFailureError):
                reason = exc.transport or exc.reason
            else:
                reason = connect_error(exc.errno if isinstance(exc, OSError) else errno.ETIMEDOUT)
            log.debug("tcp %s: connect to %s failed: %s", self.ctx.name, self.info.endpoint, reason)
            self.info.transport_failure = reason
            self.info.flags |= UF
            self._open()
            self._upstream_gone()
            self._close_downstream()
        except asyncio.CancelledError:  # the client left while connecting
            self._open()
            self._upstream_gone()
        finally:
            self.connecting = None

    # ---- upstream side (called by _Upstream)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        if self.exchange is None:
            self._open()  # else once the server's metadata is in: it labels the metrics
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        local = transport.get_extra_info("sockname")
        self.info.upstream_local = format_address(local)
        if self.downstream_closed:
            transport.close()
            return
        if self.exchange is not None:  # Istio's TCP metadata exchange: our header before any client byte
            header = self.ctx.exchange_header()
            if header:
                transport.write(header)
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0
            if self.downstream is not None:
                self.downstream.resume_reading()
        if self.downstream_eof and transport.can_write_eof():
            transport.write_eof()

    def from_upstream(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        exchange = self.exchange
        if exchange is not None and not exchange.done:  # the server's metadata exchange header comes off first
            data = exchange.feed(data)
            if exchange.done:
                log.debug("tcp %s: peer metadata exchanged with %s", self.ctx.name, exchange.peer_id or "-")
                self.info.upstream_peer = exchange.peer
                self._open()
            if not data:
                return
        size = len(data)
        self.info.sent += size
        series = self.series
        if series is not None:
            series.sent += size
        if self.downstream is not None and not self.downstream_closed:
            self.downstream.write(data)

    def upstream_eof_received(self) -> None:
        self.upstream_eof = True
        downstream = self.downstream
        if downstream is not None and not self.downstream_closed and downstream.can_write_eof():
            downstream.write_eof()
        self._maybe_both_done()

    def upstream_lost(self, exc: Exception | None) -> None:
        self._open()  # counted even if it ended in the middle of a metadata exchange
        self._upstream_gone()
        if not self.downstream_closed and self.downstream is not None:
            if exc is not None:
                self.downstream.abort()  # a reset is passed on as a reset
            elif not self.upstream_eof or not self.downstream_eof:
                self.downstream.close()

    def _upstream_gone(self) -> None:
        if not self.upstream_closed:
            self.upstream_closed = True
            if self.state is not None:
                self.state.connections -= 1
                self.state.wake_one()
                self.state = None
        self._maybe_finish()

    # ---- downstream side (the asyncio protocol of the client connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set in take(): the connection was accepted by the transparent listener

    def data_received(self, data: bytes) -> None:
        self._from_downstream(data)

    def _from_downstream(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        size = len(data)
        self.info.received += size
        series = self.series
        if series is not None:
            series.received += size
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            return
        self.pending.append(data)
        self.pending_size += size
        if self.pending_size >= PENDING_LIMIT and self.downstream is not None:
            self.downstream.pause_reading()

    def eof_received(self) -> bool:
        self.downstream_eof = True
        upstream = self.upstream
        if upstream is not None and not self.upstream_closed and upstream.can_write_eof():
            upstream.write_eof()  # over TLS: close_notify, as Envoy (proxy/tls_stream.py)
        self._maybe_both_done()
        return True  # keep the transport open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream_closed = True
        upstream = self.upstream
        if self.connecting is not None:
            self.connecting.cancel()
        if upstream is not None and not self.upstream_closed:
            if exc is not None:
                upstream.abort()
            else:
                upstream.close()
        self._maybe_finish()

    def pause_writing(self) -> None:  # the client reads slower than the upstream sends
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.resume_reading()

    def pause_upstream_writing(self) -> None:  # the upstream reads slower than the client sends
        if self.downstream is not None and not self.downstream_closed:
            self.downstream.pause_reading()

    def resume_upstream_writing(self) -> None:
        if self.downstream is not None and not self.downstream_closed:
            self.downstream.resume_reading()

    # ---- closing

    def _maybe_both_done(self) -> None:
        """Both directions ended (an EOF each way): close both sides once their buffered bytes are written."""
        if self.downstream_eof and self.upstream_eof:
            if self.upstream is not None and not self.upstream_closed:
                self.upstream.close()
            self._close_downstream()

    def _close_downstream(self) -> None:
        if self.downstream is not None and not self.downstream_closed:
            self.downstream.close()

    def _maybe_finish(self) -> None:
        if self.done or not (self.downstream_closed and self.upstream_closed):
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.ctx.budget.give_back()
        self.ctx.connections.discard(self)
        self.ctx.telemetry.on_close(self.info, self.service)

    def abort(self) -> None:
        """The drain time is over: reset both sides."""
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.abort()
        if self.downstream is not None and not self.downstream_closed:
            self.downstream.abort()

    # ---- idle timeout: one timer, re-armed from the last activity when it fires

    def _arm(self) -> None:
        idle = self.ctx.idle_timeout
        if idle > 0:
            self.timer = self.loop.call_at(self.last_activity + idle, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.loop.time() >= self.last_activity + self.ctx.idle_timeout:
            log.debug("tcp %s: idle timeout", self.ctx.name)
            if self.upstream is not None and not self.upstream_closed:
                self.upstream.close()
            self._close_downstream()
            return
        self._arm()


class _Upstream:
    """The upstream connection's asyncio protocol: everything goes to its TcpProxy."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.proxy.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.proxy.from_upstream(data)

    def eof_received(self) -> bool:
        self.proxy.upstream_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.proxy.pause_upstream_writing()

    def resume_writing(self) -> None:
        self.proxy.resume_upstream_writing()

