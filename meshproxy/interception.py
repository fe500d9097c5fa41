"""Wiring of the transparent listeners (`--transparent`, `--tcp-listener`): their contexts, HTTP and TCP.

Built by app.py when they are configured; nothing here runs for a proxy without them. The data path itself is
proxy/transparent.py (the hand-over) and proxy/tcp.py; the routing is routing/l4.py and routing/passthrough.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .proxy.downstream import EDGE_INBOUND, EDGE_NONE, ListenerContext, listener_limits
from .proxy.tcp import TcpContext, TcpProxy
from .proxy.transparent import Intercepted, Interception
from .routing.cluster import Cluster
from .routing.l4 import INBOUND_SOURCE_ADDRESS
from .routing.passthrough import transparent_table
from .routing.table import RouteTable
from .settings import InboundSpec
from .telemetry.core import Telemetry
from .telemetry.tcp import TcpTelemetry

if TYPE_CHECKING:
    from .app import ProxyApp

OUTBOUND: str = "virtualOutbound"  # Envoy's listener names in an Istio sidecar
INBOUND: str = "virtualInbound"


def inbound_cluster(port: int) -> Cluster:
    """Istio's inbound|PORT|| cluster: ORIGINAL_DST (the pod's own address and port), bound to 127.0.0.6."""
    return Cluster(Cluster.name_of("inbound", port, "", ""), "", port, "", (), original_destination=True,
                   bind_address=INBOUND_SOURCE_ADDRESS)


class Interceptions:
    """The transparent listeners of one proxy process and what their connections share."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        settings = app.settings
        mesh = app.telemetry
        self.outbound_http = ListenerContext(
            OUTBOUND, transparent_table(app.config.table), app.pool, rng=app.rng, clusters=app.clusters,
            telemetry=Telemetry(OUTBOUND, "outbound", app.access_log, mesh), limits=listener_limits(settings, EDGE_NONE),
            budget=app.budget, retry_reused=settings.retry_reused_connection)
        self.inbound_http: dict[tuple[str, int], ListenerContext] = {}
        self.inbound_clusters: dict[int, Cluster] = {}
        self.tcp_outbound = TcpContext(OUTBOUND, TcpTelemetry(OUTBOUND, "outbound", app.access_log, mesh),
                                       app.clusters, app.rng, settings.connect_timeout, settings.tcp_idle_timeout)
        self.tcp_inbound = TcpContext(INBOUND, TcpTelemetry(INBOUND, "inbound", app.access_log, mesh),
                                      app.clusters, app.rng, settings.connect_timeout, settings.tcp_idle_timeout)
        app.contexts.append(self.outbound_http)

    def follow(self, table: RouteTable) -> None:
        """A reload: the outbound listener's table with its catch-all host (inbound contexts read the app's)."""
        self.outbound_http.table = transparent_table(table)

    def interception(self, direction: str, fixed: tuple[str, int] | None = None) -> Interception:
        inbound = direction == "inbound"
        return Interception(
            name=INBOUND if inbound else OUTBOUND, direction=direction, table=lambda: self.app.config.table,
            http=self.inbound_context if inbound else (lambda _: self.outbound_http),
            tcp=self.tcp_inbound if inbound else self.tcp_outbound, inbound_cluster=self.inbound_cluster,
            detection_timeout=self.app.settings.protocol_detection_timeout, fixed_destination=fixed)

    def inbound_context(self, destination: tuple[str, int]) -> ListenerContext:
        """One HTTP context per inbound destination (the pod's few ports), made at its first connection."""
        ctx = self.inbound_http.get(destination)
        if ctx is None:
            from .app import INBOUND_SERVER, inbound_table

            app = self.app
            table = inbound_table(InboundSpec(destination, destination), bind_address=INBOUND_SOURCE_ADDRESS)
            ctx = ListenerContext(
                f"{INBOUND}:{destination[1]}", table, app.pool,
                server_name=b"istio-envoy", response_mutation=INBOUND_SERVER, rng=app.rng, clusters=app.clusters,
                telemetry=Telemetry(INBOUND, "inbound", app.access_log, app.telemetry,
                                    table=lambda: app.config.table, address=destination),
                limits=listener_limits(app.settings, EDGE_INBOUND), budget=app.budget,
                retry_reused=app.settings.retry_reused_connection)
            if self.outbound_http.draining:  # made during the drain (the app drains the contexts it lists)
                ctx.start_draining()
            self.inbound_http[destination] = ctx
            app.contexts.append(ctx)
        return ctx

    def inbound_cluster(self, port: int) -> Cluster:
        cluster = self.inbound_clusters.get(port)
        if cluster is None:
            cluster = self.inbound_clusters[port] = inbound_cluster(port)
        return cluster

    async def listen(self, name: str, interception: Interception, address: tuple[str, int]) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        factory = cast(Callable[[], asyncio.Protocol], lambda: Intercepted(interception))
        server = await loop.create_server(factory, address[0], address[1], reuse_address=True, backlog=4096,
                                          reuse_port=self.app.settings.concurrency > 1 or None)
        sock = server.sockets[0].getsockname()
        self.app.addresses[name] = (sock[0], sock[1])
        return server

    async def start(self) -> list[asyncio.Server]:
        settings = self.app.settings
        servers = []
        if settings.transparent:
            servers.append(await self.listen(OUTBOUND, self.interception("outbound"), settings.transparent_outbound))
            servers.append(await self.listen(INBOUND, self.interception("inbound"), settings.transparent_inbound))
        for spec in settings.tcp_listeners:
            host, port = spec.destination
            servers.append(await self.listen(f"tcp:{host}:{port}", self.interception("outbound", spec.destination),
                                             spec.listen))
        return servers

    def tcp_connections(self) -> list[TcpProxy]:
        return [*self.tcp_outbound.connections, *self.tcp_inbound.connections]
