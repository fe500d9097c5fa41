"""Wiring: load -> compile -> listeners + admin + watcher (lifecycle.py: reload, signals); drain on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import hot_path
from .istio.load import load
from .istio.model import Snapshot
from .istio.problems import Problem
from .lifecycle import ConfigReloader, ConfigState, handle_signals, ignore_stop_signals
from .proxy.balancer import Clusters, ClusterState
from .proxy.downstream import (
    EDGE_GATEWAY,
    EDGE_INBOUND,
    EDGE_NONE,
    ListenerContext,
    connection_budget,
    listener_limits,
)
from .proxy.listener import DownstreamProtocol
from .proxy.upstream import MultiplexedPool, UpstreamPool
from .routing.cluster import Cluster, Endpoint
from .routing.compile import Identity, compile_table
from .routing.match import CATCH_ALL
from .routing.picker import WeightedPicker
from .routing.policy import ACTION_ROUTE, HeaderMutation, RetryPolicy, Route, RouteDestination
from .routing.table import RouteTable, VirtualHost
from .settings import InboundSpec, Settings
from .telemetry.access_log import AccessLog
from .telemetry.core import MeshTelemetry, Telemetry

if TYPE_CHECKING:
    from .admin import AdminServer

log = logging.getLogger("meshproxy")

INBOUND_SERVER = HeaderMutation(set=((b"server", b"istio-envoy"),))
# Istio's inbound route retry: only what cannot have reached the app (ConvertInboundPolicy).
INBOUND_RETRY = RetryPolicy.compile(2, "reset-before-request,connect-failure")


def http2_pool(pool: UpstreamPool, key: tuple[str, str, int], state: ClusterState) -> MultiplexedPool:
    """An endpoint's HTTP/2 connections; the HTTP/2 code loads with the first cluster that needs it."""
    from .proxy.h2_upstream import H2EndpointPool

    return H2EndpointPool(pool, key, state)


def identity_of(settings: Settings) -> Identity:
    return Identity(name=settings.workload, namespace=settings.namespace, labels=dict(settings.labels),
                    gateways=settings.gateways,
                    default_retry=RetryPolicy.compile(settings.default_retry_attempts, settings.default_retry_on))


def inbound_table(spec: InboundSpec) -> RouteTable:
    """The inbound side: every request goes to the local app (cluster inbound|PORT||)."""
    port = spec.app[1]
    # The app's protocol is not declared here: as Istio's inbound cluster of a sniffed port, it follows the client's
    # (an HTTP/2 or gRPC client reaches the app over HTTP/2, an HTTP/1.1 one over HTTP/1.1).
    cluster = Cluster(Cluster.name_of("inbound", port, "", ""), "", port, "", (Endpoint(spec.app[0], port),),
                      follows_client=True)
    dest = RouteDestination("", "", cluster)
    route = Route(name="default", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_ROUTE,
                  picker=WeightedPicker.compile([(dest, 1)]), retry=INBOUND_RETRY, operation=f"inbound|{port}||")
    vhost = VirtualHost(f"inbound|http|{port}", ("*",), (route,))
    return RouteTable(exact={}, wildcards=(), catch_all=vhost)


def load_config(settings: Settings) -> tuple[RouteTable, Snapshot, list[Problem]]:
    """Load and compile; raises ConfigError. Warnings are returned, not raised."""
    result = load(settings.config)
    table, warnings = compile_table(result.snapshot, identity_of(settings))
    return table, result.snapshot, result.warnings + warnings


class ProxyApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # file watch, SIGHUP and POST /reload all reload through this one object
        self.reloader = ConfigReloader(settings.config, lambda: load_config(settings), self._follow)
        self.rng = random.Random(settings.seed)
        self.pool = UpstreamPool(settings.upstream_idle_timeout, settings.connect_timeout, multiplexer=http2_pool)
        self.access_log = AccessLog(settings.access_log, path=settings.access_log_file)
        self.telemetry = MeshTelemetry.from_settings(settings)  # metrics, tracing, peer metadata: one per process
        self.clusters = Clusters()
        self.contexts: list[ListenerContext] = []
        self.servers: list[asyncio.Server] = []
        self.ready = False
        self.stopping: asyncio.Event | None = None  # created in start(), inside the loop
        self.addresses: dict[str, tuple[str, int]] = {}
        self.admin: AdminServer | None = None
        self._watcher: asyncio.Task[None] | None = None

    # ---- config

    @property
    def config(self) -> ConfigState:
        return self.reloader.state

    def _follow(self, table: RouteTable) -> None:
        for ctx in self.contexts:
            if ctx.follows_config:
                ctx.table = table

    # ---- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        settings = self.settings
        budget = connection_budget(settings)  # one downstream connection limit for the whole process
        if settings.listen is not None:
            edge = EDGE_NONE if "mesh" in settings.gateways else EDGE_GATEWAY  # a gateway's clients are outside
            ctx = ListenerContext("outbound", self.config.table, self.pool, rng=self.rng, clusters=self.clusters,
                                  telemetry=Telemetry("outbound", "outbound", self.access_log, self.telemetry),
                                  limits=listener_limits(settings, edge), budget=budget, follows_config=True,
                                  retry_reused=settings.retry_reused_connection)
            await self._listen(ctx, settings.listen)
        for spec in settings.inbound:
            table = inbound_table(spec)
            name = f"inbound:{spec.app[1]}"
            ctx = ListenerContext(name, table, self.pool, server_name=b"istio-envoy",
                                  response_mutation=INBOUND_SERVER, rng=self.rng, clusters=self.clusters,
                                  telemetry=Telemetry(name, "inbound", self.access_log, self.telemetry,
                                                      table=lambda: self.config.table, address=spec.listen),
                                  limits=listener_limits(settings, EDGE_INBOUND), budget=budget,
                                  retry_reused=settings.retry_reused_connection)
            await self._listen(ctx, spec.listen)
        if settings.admin is not None:
            from .admin import ProxyAdmin, serve_admin  # prometheus-client is only needed for the admin port

            self.admin = await serve_admin(ProxyAdmin(self), settings.admin, settings.admin_allow_remote)
            # a worker's own admin (on an ephemeral port, for its supervisor) is not the sidecar's admin
            self.addresses["admin" if settings.worker_index is None else "worker-admin"] = self.admin.address
        handle_signals(loop, self.request_stop, self.reloader.reload)
        if settings.watch_interval > 0 and settings.config:
            self._watcher = loop.create_task(self.reloader.watch(settings.watch_interval))
        tune_memory()
        self.ready = True
        for name, (host, port) in self.addresses.items():
            log.info("%s listening on %s:%d", name, host, port)

    async def _listen(self, ctx: ListenerContext, address: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        # a protocol by its methods (its base is the exchange's Downstream), which is all the event loop asks
        factory = cast(Callable[[], asyncio.Protocol], lambda: DownstreamProtocol(ctx))
        server = await loop.create_server(factory, address[0], address[1],
                                          reuse_address=True, backlog=4096,
                                          reuse_port=self.settings.concurrency > 1 or None)  # sibling workers
        sock = server.sockets[0].getsockname()
        self.addresses[ctx.name] = (sock[0], sock[1])
        self.contexts.append(ctx)
        self.servers.append(server)

    def request_stop(self, reason: str = "") -> None:
        if self.stopping is not None:
            self.stopping.set()

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded by drain_time), then close."""
        self.ready = False
        for server in self.servers:
            server.close()
        for ctx in self.contexts:
            ctx.start_draining()
        deadline = time.monotonic() + self.settings.drain_time
        while any(ctx.connections for ctx in self.contexts) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = sum(len(ctx.connections) for ctx in self.contexts)
        if left:
            log.warning("drain time over: closing %d connections", left)
            for ctx in self.contexts:
                for conn in list(ctx.connections):
                    conn.reset_after_write()
        self.pool.close_idle()
        self.access_log.close()  # the lines of the last requests, before the process exits

    async def run(self) -> None:
        await self.start()
        assert self.stopping is not None
        await self.stopping.wait()
        log.info("draining (up to %.1fs)", self.settings.drain_time)
        await self.drain()
        ignore_stop_signals(asyncio.get_running_loop())
        log.info("stopped")


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def tune_memory() -> None:
    """Once the proxy is up: the collector and the allocator, set for a long-lived server.

    - Everything made so far (modules, the config, the telemetry SDK) lives as long as the process: the garbage of
      start-up is collected first. Frozen, the rest is
      out of the collector's sight: a full collection, which the steady churn of requests triggers now and then,
      walks only what was made since, instead of stopping the loop for a walk of the whole heap (37-45 ms here).
    - Body bytes come in reads of up to 256 KiB, each a new bytes object (uvloop's read, httptools' body slice).
      glibc serves such sizes with mmap, or trims the heap when they are freed, so every read touched fresh pages
      (page faults, zeroing): 1 MiB bodies cost 3.0 ms of CPU per request, 1.0 ms with freed memory kept for
      reuse (benchmarks, bodies-1mib). Large buffers come from the heap and up to 128 MiB of free heap is kept.
    """
    gc.collect()  # what loading and compiling the config left behind, before the rest is frozen
    gc.freeze()
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; other C libraries keep their own defaults
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 4 << 20)
    mallopt(M_TRIM_THRESHOLD, 128 << 20)


def report_hot_path() -> None:
    state = hot_path.status()
    log.info("hot path: %s", state.describe())
    if state.stale:
        log.warning("hot path: the old code runs until the package is built again (pip install -e .)")


def run(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain."""
    import uvloop

    report_hot_path()
    app = ProxyApp(settings)
    uvloop.run(app.run())
    return 0
