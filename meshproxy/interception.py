"""Wiring of the transparent listeners (`--transparent`, `--tcp-listener`): their contexts, HTTP and TCP.

Built by app.py when they are configured; nothing here runs for a proxy without them. The data path itself is
proxy/transparent.py (the hand-over) and proxy/tcp.py; the routing is routing/l4.py and routing/passthrough.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Union, cast

from .proxy.downstream import EDGE_INBOUND, EDGE_NONE, ListenerContext, listener_limits
from .proxy.tcp import TcpContext, TcpProxy
from .proxy.transparent import Intercepted, Interception
from .routing.cluster import Cluster
from .routing.l4 import INBOUND_PASSTHROUGH_IPV4, INBOUND_PASSTHROUGH_IPV6, inbound_source
from .routing.passthrough import transparent_table
from .routing.inbound import INBOUND_SERVER, enforcing, inbound_route_table
from .routing.table import DEFAULT_PORT, RouteTable
from .telemetry.core import Telemetry
from .telemetry.tcp import TcpTelemetry

if TYPE_CHECKING:
    import random
    import ssl

    from .proxy.balancer import Clusters
    from .proxy.downstream import ConnectionBudget
    from .proxy.transparent_tls import TransparentTLSServer
    from .proxy.upstream import UpstreamPool
    from .settings import Settings
    from .telemetry.access_log import AccessLog
    from .telemetry.core import MeshTelemetry

log = logging.getLogger("meshproxy")

Server = Union[asyncio.Server, "TransparentTLSServer"]
MAX_OUTBOUND_PORTS = 256  # HTTP contexts kept per original destination port
OUTBOUND: str = "virtualOutbound"  # Envoy's listener names in an Istio sidecar
INBOUND: str = "virtualInbound"


def inbound_cluster(address: str, port: int, declared: bool) -> Cluster:
    """Istio's inbound|PORT|| cluster for a port a service declares, else InboundPassthroughClusterIpv4 (Ipv6):
    ORIGINAL_DST (the pod's own address and port), bound to 127.0.0.6 (::6)."""
    v6 = ":" in address
    name = Cluster.name_of("inbound", port, "", "") if declared else \
        INBOUND_PASSTHROUGH_IPV6 if v6 else INBOUND_PASSTHROUGH_IPV4
    return Cluster(name, "", port if declared else 0, "", (), original_destination=True,
                   bind_address=inbound_source(address))


class Interceptions:
    """The transparent listeners of one proxy process and what their connections share."""

    def __init__(self, settings: Settings, pool: UpstreamPool, rng: random.Random, clusters: Clusters,
                 access_log: AccessLog, mesh: MeshTelemetry, budget: ConnectionBudget,
                 table: Callable[[], RouteTable], contexts: list[ListenerContext],
                 tls_context: Callable[[], ssl.SSLContext] | None = None,
                 tls_mode: Callable[[int], str] | None = None) -> None:
        """`contexts` is the app's list of HTTP listener contexts (drained on SIGTERM): this adds its own to it.
        With `tls_context` (the workload certificates' server context) the inbound listener terminates mutual TLS
        as `tls_mode(original destination port)` says (PeerAuthentication: STRICT, PERMISSIVE, DISABLE)."""
        self.tls_context, self.tls_mode = tls_context, tls_mode
        self.settings, self.pool, self.rng, self.clusters = settings, pool, rng, clusters
        self.access_log, self.mesh, self.budget, self.table = access_log, mesh, budget, table
        self.outbound_http: dict[int, ListenerContext] = {}  # by original destination port, made as they come
        self.contexts = contexts  # the app's list (drained on SIGTERM): this adds its own to it
        self.inbound_http: dict[tuple[str, int], ListenerContext] = {}
        self.inbound_routes: dict[tuple[str, int], RouteTable] = {}  # each destination's table, before its policy
        self.inbound_clusters: dict[tuple[bool, int, bool], Cluster] = {}
        self.drain_new: Callable[[ListenerContext], None] | None = None  # set by the app's drain: how a new one drains
        self.tcp_outbound = TcpContext(OUTBOUND, TcpTelemetry(OUTBOUND, "outbound", access_log, mesh), clusters, rng,
                                       settings.connect_timeout, settings.tcp_idle_timeout, budget=budget)
        self.tcp_inbound = TcpContext(INBOUND, TcpTelemetry(INBOUND, "inbound", access_log, mesh), clusters, rng,
                                      settings.connect_timeout, settings.tcp_idle_timeout, budget=budget)

    def follow(self, table: RouteTable) -> None:
        """A reload: the outbound contexts' tables with their catch-all host, the inbound ones' security policy."""
        for port, ctx in self.outbound_http.items():
            ctx.table = transparent_table(table, port or DEFAULT_PORT)
        for destination, ctx in self.inbound_http.items():
            ctx.table = enforcing(self.inbound_routes[destination], table, destination[1])

    def outbound_context(self, destination: tuple[str, int]) -> ListenerContext:
        """One HTTP context per outbound destination port (Istio's outbound route configuration per port)."""
        port = destination[1]
        ctx = self.outbound_http.get(port)
        if ctx is None and len(self.outbound_http) >= MAX_OUTBOUND_PORTS:
            port = 0  # bounded: beyond, one shared context (a Host without a port means 80 there)
            ctx = self.outbound_http.get(port)
        if ctx is None:
            settings = self.settings
            ctx = ListenerContext(
                f"{OUTBOUND}:{port}", transparent_table(self.table(), port or DEFAULT_PORT), self.pool, rng=self.rng,
                clusters=self.clusters, telemetry=Telemetry(OUTBOUND, "outbound", self.access_log, self.mesh),
                limits=listener_limits(settings, EDGE_NONE), budget=self.budget,
                retry_reused=settings.retry_reused_connection)
            self._add(ctx)
            self.outbound_http[port] = ctx
        return ctx

    def _add(self, ctx: ListenerContext) -> None:
        if self.drain_new is not None:  # made during the drain
            self.drain_new(ctx)
        self.contexts.append(ctx)

    def interception(self, direction: str, fixed: tuple[str, int] | None = None) -> Interception:
        inbound = direction == "inbound"
        return Interception(
            name=INBOUND if inbound else OUTBOUND, direction=direction, table=self.table,
            http=self.inbound_context if inbound else self.outbound_context,
            tcp=self.tcp_inbound if inbound else self.tcp_outbound, inbound_cluster=self.inbound_cluster,
            detection_timeout=self.settings.protocol_detection_timeout, fixed_destination=fixed,
            authorizes=inbound or (fixed is not None and "mesh" not in self.settings.gateways))

    def inbound_context(self, destination: tuple[str, int]) -> ListenerContext:
        """One HTTP context per inbound destination (the pod's few ports), made at its first connection."""
        ctx = self.inbound_http.get(destination)
        if ctx is None:
            settings, table = self.settings, self.table
            routes = self.inbound_routes[destination] = inbound_route_table(destination, inbound_source(destination[0]))
            ctx = ListenerContext(
                f"{INBOUND}:{destination[1]}", enforcing(routes, table(), destination[1]), self.pool,
                server_name=b"istio-envoy", response_mutation=INBOUND_SERVER, rng=self.rng, clusters=self.clusters,
                telemetry=Telemetry(INBOUND, "inbound", self.access_log, self.mesh, table=table, address=destination),
                limits=listener_limits(settings, EDGE_INBOUND), budget=self.budget,
                retry_reused=settings.retry_reused_connection, secure=self.tls_context is not None)
            self._add(ctx)
            self.inbound_http[destination] = ctx
        return ctx

    def inbound_cluster(self, destination: tuple[str, int], declared: bool) -> Cluster:
        key = (":" in destination[0], destination[1] if declared else 0, declared)
        cluster = self.inbound_clusters.get(key)
        if cluster is None:
            cluster = self.inbound_clusters[key] = inbound_cluster(destination[0], destination[1], declared)
        return cluster

    async def listen(self, interception: Interception, address: tuple[str, int]) -> asyncio.Server:
        """A listener; 0.0.0.0 also listens on [::] where the host has IPv6 (a dual-stack pod's IPv6 traffic is
        redirected too, as Envoy's listeners with an additional [::] address)."""
        loop = asyncio.get_running_loop()
        factory = cast(Callable[[], asyncio.Protocol], lambda: Intercepted(interception))
        reuse_port = self.settings.concurrency > 1 or None
        host, port = address
        if host == "0.0.0.0" and socket.has_ipv6:
            try:
                return await loop.create_server(factory, [host, "::"], port, reuse_address=True, backlog=4096,
                                                reuse_port=reuse_port)
            except OSError as exc:
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                log.info("%s: IPv6 unavailable here (%s): listening on IPv4 only", interception.name, exc)
        return await loop.create_server(factory, host, port, reuse_address=True, backlog=4096, reuse_port=reuse_port)

    def listen_tls(self, interception: Interception, address: tuple[str, int]) -> TransparentTLSServer:
        """The inbound listener terminating mutual TLS (proxy/transparent_tls.py)."""
        from .proxy.transparent_tls import TransparentTLSServer, listen_sockets

        assert self.tls_context is not None and self.tls_mode is not None
        socks = listen_sockets(address[0], address[1], self.settings.concurrency > 1)
        return TransparentTLSServer(socks, interception, self.tls_mode, self.tls_context,
                                    self.settings.protocol_detection_timeout)

    async def start(self) -> list[tuple[str, Server]]:
        """The listeners, by the name their address is logged under."""
        settings = self.settings
        servers: list[tuple[str, Server]] = []
        if settings.transparent:
            servers.append((OUTBOUND, await self.listen(self.interception("outbound"), settings.transparent_outbound)))
            inbound = self.interception("inbound")
            servers.append((INBOUND, self.listen_tls(inbound, settings.transparent_inbound) if self.tls_context
                            else await self.listen(inbound, settings.transparent_inbound)))
        for spec in settings.tcp_listeners:
            host, port = spec.destination
            servers.append((f"tcp:{host}:{port}", await self.listen(self.interception("outbound", spec.destination),
                                                                    spec.listen)))
        return servers

    def tcp_connections(self) -> list[TcpProxy]:
        return [*self.tcp_outbound.connections, *self.tcp_inbound.connections]
