"""Wiring: load -> compile -> listeners + admin + watcher (lifecycle.py: reload, signals); drain on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import hot_path
from .istio.load import load
from .istio.model import Snapshot
from .istio.problems import ConfigError, Problem
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
from .proxy.secure_server import DISABLE, INBOUND_ALPN, PERMISSIVE, STRICT, SecureServer
from .proxy.upstream import MultiplexedPool, UpstreamPool
from .routing.cluster import Cluster, Endpoint
from .routing.compile import Identity, compile_table
from .routing.inbound import INBOUND_SERVER, enforcing, inbound_route_table
from .routing.policy import RetryPolicy
from .routing.table import RouteTable
from .security.certs import CertError, CertStore
from .security.client_tls import UpstreamTLS, UpstreamTLSCompiler, broken_tls, check_tls_files
from .security.jwks_fetch import JwksFetcher
from .security.jwt_authn import JwksCache
from .security.peer_authn import NO_CERTIFICATES, UNSET, strict_without_tls
from .security.policy import compile_workload_policy
from .security.scope import Workload
from .settings import InboundSpec, Settings
from .telemetry.access_log import AccessLog
from .telemetry.core import MeshTelemetry, Telemetry

if TYPE_CHECKING:
    from .admin import AdminServer, ProxyAdmin
    from .gateway import GatewayPorts
    from .interception import Interceptions
    from .status_ports import StatusPorts
    from .proxy.tcp import TcpProxy
    from .proxy.transparent_tls import TransparentTLSServer

log = logging.getLogger("meshproxy")


def http2_pool(pool: UpstreamPool, key: tuple[str, str, int], state: ClusterState) -> MultiplexedPool:
    """An endpoint's HTTP/2 connections; the HTTP/2 code loads with the first cluster that needs it."""
    from .proxy.h2_upstream import H2EndpointPool

    return H2EndpointPool(pool, key, state)


def identity_of(settings: Settings) -> Identity:
    return Identity(name=settings.workload, namespace=settings.namespace, labels=dict(settings.labels),
                    gateways=settings.gateways, outbound_policy=settings.outbound_traffic_policy,
                    default_retry=RetryPolicy.compile(settings.default_retry_attempts, settings.default_retry_on))


def inbound_table(spec: InboundSpec) -> RouteTable:
    """The inbound side of an `--inbound LISTEN=APP` listener: every request goes to the local app."""
    return inbound_route_table(spec.app)


def load_config(settings: Settings, jwks: JwksCache | None = None, upstream_tls: UpstreamTLSCompiler | None = None,
                gateway: GatewayPorts | None = None) -> tuple[RouteTable, Snapshot, list[Problem]]:
    """Load and compile (routes, and the security policy of this workload in `table.security`); raises
    ConfigError. Warnings are returned, not raised. With `upstream_tls`, every DestinationRule tls must load (its
    certificate files, or the workload certificates ISTIO_MUTUAL needs)."""
    result = load(settings.config)
    workload = Workload(settings.namespace, dict(settings.labels))
    # STRICT is enforced by the TLS of the inbound listeners (--inbound, and the transparent one); without
    # certificates every connection would be plaintext: a STRICT mode for this workload is refused, never ignored.
    strict = [] if settings.cert_dir else strict_without_tls(result.snapshot.peer_authentications, workload,
                                                             reason=NO_CERTIFICATES)
    if strict:
        raise ConfigError(strict + result.warnings)
    table, warnings = compile_table(result.snapshot, identity_of(settings))
    table.security = compile_workload_policy(result.snapshot, workload, jwks if jwks is not None else JwksCache())
    problems = result.warnings + warnings
    if upstream_tls is not None:
        errors = check_tls_files(result.snapshot, upstream_tls)
        if errors:
            raise ConfigError(errors + problems)
        upstream_tls.cache.clear()  # contexts are made again from the files as they are now
    if gateway is not None:  # the gateway's server ports: their hosts and TLS files (gateway.py)
        problems += gateway.prepare(result.snapshot)
    return table, result.snapshot, problems


class ProxyApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jwks = JwksCache()  # the keys of every jwksUri, shared across reloads
        # Workload certificates (CertError when they do not load: the proxy does not start without them) and the
        # upstream TLS of every cluster, compiled with each config load.
        self.certs = CertStore(settings.cert_dir) if settings.cert_dir else None
        self.upstream_tls = UpstreamTLSCompiler(self.certs)
        self.gateway: GatewayPorts | None = None  # a gateway's server ports (--gateway-port; gateway.py)
        if "mesh" not in settings.gateways:
            from .gateway import GatewayPorts

            self.gateway = GatewayPorts(settings)
        # file watch, SIGHUP and POST /reload all reload through this one object
        self.reloader = ConfigReloader(settings.config, lambda: load_config(settings, self.jwks, self.upstream_tls,
                                                                      self.gateway),
                                       self._follow)
        self.jwks_fetcher: JwksFetcher | None = None  # created in start(), inside the loop
        self.inbound_tables: dict[int, tuple[RouteTable, int]] = {}  # id(ctx) -> (routes, app port)
        self.rng = random.Random(settings.seed)
        self.pool = UpstreamPool(settings.upstream_idle_timeout, settings.connect_timeout, multiplexer=http2_pool)
        self.access_log = AccessLog(settings.access_log, path=settings.access_log_file)
        self.telemetry = MeshTelemetry.from_settings(settings)  # metrics, tracing, peer metadata: one per process
        self.clusters = Clusters(self._upstream_tls_of, self.pool.close_idle_of)
        self.contexts: list[ListenerContext] = []
        self.servers: list[asyncio.Server | SecureServer | TransparentTLSServer] = []
        self.secure_servers: dict[int, SecureServer] = {}  # inbound listeners by app port: `mode` is settable
        self.ready = False
        self.stopping: asyncio.Event | None = None  # created in start(), inside the loop
        self.addresses: dict[str, tuple[str, int]] = {}
        self.admin: AdminServer | None = None
        self.admin_backend: ProxyAdmin | None = None  # the admin's answers, also behind the status ports
        self.status_ports: StatusPorts | None = None  # --health-port, --status-port, --prometheus-port
        self._watcher: asyncio.Task[None] | None = None
        self._jwks_task: asyncio.Task[None] | None = None
        self.budget = connection_budget(settings)  # one downstream connection limit for the whole process
        self.interceptions: Interceptions | None = None  # --transparent, --tcp-listener (interception.py)

    # ---- config

    @property
    def config(self) -> ConfigState:
        return self.reloader.state

    def _follow(self, table: RouteTable) -> None:
        """A new snapshot: the outbound listener takes its routes; every listener that enforces the workload's
        security policy (inbound listeners; a gateway's own listener) takes the new policy, in one assignment."""
        for ctx in self.contexts:
            if ctx.follows_config:
                ctx.table = self._outbound_table(table)
            elif id(ctx) in self.inbound_tables:
                base, port = self.inbound_tables[id(ctx)]
                ctx.table = enforcing(base, table, port)
        authn = table.security.authn
        self.jwks.retain(authn.remotes() if authn is not None else ())
        if self.jwks_fetcher is not None:
            self.jwks_fetcher.start_new()
        if self.interceptions is not None:
            self.interceptions.follow(table)
        if self.gateway is not None:
            self.gateway.follow(table)
        for port, server in self.secure_servers.items():  # PeerAuthentication: new connections follow at once
            server.mode = self.inbound_tls_mode(port, table)

    def _outbound_table(self, table: RouteTable) -> RouteTable:
        """A sidecar's outbound listener carries the app's own calls: the destination's proxy authorizes them.
        A gateway's listener is where its clients arrive: it enforces the policies that select the gateway."""
        if "mesh" in self.settings.gateways or self.settings.listen is None:
            return table
        port = self.addresses.get("outbound", self.settings.listen)[1]  # the bound port (a port 0 is chosen)
        return table.with_policy(table.security.bind(port, remote_from_xff=False))

    def _upstream_tls_of(self, cluster: Cluster, endpoint: Endpoint) -> UpstreamTLS | None:
        """How new connections to one endpoint do TLS; asked when the data path meets a new cluster."""
        try:
            return self.upstream_tls.for_endpoint(cluster.policy.tls, cluster.name, cluster.service,
                                                  cluster.subject_alt_names, cluster.service_accounts, endpoint.labels)
        except CertError as exc:  # the files changed since the load that checked them
            log.error("upstream TLS of %s: %s", cluster.name, exc)
            return broken_tls(str(exc))

    def set_inbound_tls(self, mode: str, port: int | None = None) -> None:
        """PeerAuthentication's say (STRICT, PERMISSIVE, DISABLE) for the inbound listener of app port `port`, or
        all of them: new connections follow it at once, open ones are left as they are. Needs --cert-dir (the
        listeners without certificates are plaintext ones): ValueError otherwise, never a silent plaintext."""
        if mode not in (STRICT, PERMISSIVE, DISABLE):
            raise ValueError(f"inbound TLS mode {mode!r}: expected STRICT, PERMISSIVE or DISABLE")
        if self.certs is None and mode != DISABLE:
            raise ValueError(f"inbound TLS mode {mode} needs the workload certificates (--cert-dir)")
        for app_port, server in self.secure_servers.items():
            if port is None or app_port == port:
                server.mode = mode

    def inbound_tls_mode(self, port: int, table: RouteTable | None = None) -> str:
        """The mTLS mode of the inbound listener of app port `port`: `--inbound-tls` when given, else what the
        workload's PeerAuthentication says for the port (Istio's default: PERMISSIVE)."""
        if self.settings.inbound_tls:
            return self.settings.inbound_tls
        mode = (table or self.config.table).security.peer.mode_for_port(port)
        return PERMISSIVE if mode == UNSET else mode

    def _transparent_modes(self) -> str:
        """The transparent inbound listener's modes, for the start-up log: the workload's and each port's."""
        if self.settings.inbound_tls:
            return f"virtualInbound {self.settings.inbound_tls}"
        peer = self.config.table.security.peer
        ports = "".join(f", port {port} {mode}" for port, mode in sorted(peer.port_modes.items()))
        return f"virtualInbound {PERMISSIVE if peer.mode == UNSET else peer.mode}{ports}"

    # ---- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        settings = self.settings
        budget = self.budget
        await self._serve_status_ports()  # first: the kubelet's probe answers 503 until every listener is up
        if settings.listen is not None:
            edge = EDGE_NONE if "mesh" in settings.gateways else EDGE_GATEWAY  # a gateway's clients are outside
            ctx = ListenerContext("outbound", self._outbound_table(self.config.table), self.pool, rng=self.rng,
                                  clusters=self.clusters,
                                  telemetry=Telemetry("outbound", "outbound", self.access_log, self.telemetry),
                                  limits=listener_limits(settings, edge), budget=budget, follows_config=True,
                                  retry_reused=settings.retry_reused_connection)
            await self._listen(ctx, settings.listen)
            ctx.table = self._outbound_table(self.config.table)  # now with the port bound
        if self.gateway is not None:
            await self.gateway.start(self.config.table, self.pool, self.rng, self.clusters, self.access_log,
                                     self.telemetry, budget, self.contexts, self.servers, self.addresses)
        for spec in settings.inbound:
            base = inbound_table(spec)
            table = enforcing(base, self.config.table, spec.app[1])
            name = f"inbound:{spec.app[1]}"
            ctx = ListenerContext(name, table, self.pool, server_name=b"istio-envoy",
                                  response_mutation=INBOUND_SERVER, rng=self.rng, clusters=self.clusters,
                                  telemetry=Telemetry(name, "inbound", self.access_log, self.telemetry,
                                                      table=lambda: self.config.table, address=spec.listen),
                                  limits=listener_limits(settings, EDGE_INBOUND), budget=budget,
                                  retry_reused=settings.retry_reused_connection, secure=self.certs is not None)
            self.inbound_tables[id(ctx)] = (base, spec.app[1])
            await self._listen(ctx, spec.listen)
        self.jwks_fetcher = JwksFetcher(self.jwks, settings.jwks_refresh_interval)
        self.jwks_fetcher.start_new()
        self._jwks_task = loop.create_task(self.jwks_fetcher.watch())
        if settings.transparent or settings.tcp_listeners:
            from .interception import Interceptions

            certs = self.certs
            self.interceptions = Interceptions(settings, self.pool, self.rng, self.clusters, self.access_log,
                                               self.telemetry, self.budget, lambda: self.config.table,
                                               self.contexts,
                                               tls_context=None if certs is None else
                                               lambda: certs.server_context(alpn=INBOUND_ALPN),
                                               tls_mode=self.inbound_tls_mode)
            for name, server in await self.interceptions.start():
                sock = server.sockets[0].getsockname()
                self.addresses[name] = (sock[0], sock[1])
                self.servers.append(server)
        if settings.admin is not None:
            from .admin import serve_admin

            self.admin = await serve_admin(self._admin_backend(), settings.admin, settings.admin_allow_remote)
            # a worker's own admin (on an ephemeral port, for its supervisor) is not the sidecar's admin
            self.addresses["admin" if settings.worker_index is None else "worker-admin"] = self.admin.address
        if self.certs is not None:
            self.telemetry.own_principal = self.certs.certs.spiffe_id
            self.certs.start(settings.cert_poll_interval)
            log.info("workload identity %s (certificates from %s, valid until %s); inbound mTLS %s",
                     self.certs.certs.spiffe_id, settings.cert_dir,
                     f"{self.certs.certs.not_after:%Y-%m-%dT%H:%M:%SZ}",
                     ", ".join([f"{port} {server.mode}" for port, server in self.secure_servers.items()] +
                               ([self._transparent_modes()] if settings.transparent else [])) or "-")
        handle_signals(loop, self.request_stop, self.reloader.reload)
        if settings.watch_interval > 0 and settings.config:
            self._watcher = loop.create_task(self.reloader.watch(settings.watch_interval))
        tune_memory()
        self.ready = True
        for name, (host, port) in self.addresses.items():
            log.info("%s listening on %s:%d", name, host, port)

    def _admin_backend(self) -> ProxyAdmin:
        if self.admin_backend is None:
            from .admin import ProxyAdmin  # prometheus-client is only needed for the admin and status ports

            self.admin_backend = ProxyAdmin(self)
        return self.admin_backend

    async def _serve_status_ports(self) -> None:
        settings = self.settings
        if settings.pod_ports == (None, None, None):
            return
        from .status_ports import StatusPorts, app_scrape_from

        backend = self._admin_backend()
        app_metrics = app_scrape_from(os.environ, settings.status_port)  # ValueError: a malformed variable
        self.status_ports = StatusPorts(backend.ready, backend.metrics, app_metrics)
        bound = await self.status_ports.start(*settings.pod_ports)
        self.addresses.update(bound)

    async def _listen(self, ctx: ListenerContext, address: tuple[str, int]) -> None:
        # a protocol by its methods (its base is the exchange's Downstream), which is all the event loop asks
        factory = cast(Callable[[], asyncio.Protocol], lambda: DownstreamProtocol(ctx))
        server: asyncio.Server | SecureServer
        certs = self.certs
        if ctx.secure and certs is not None:  # accepts itself: TLS detection, the mode may change at run time
            port = self.inbound_tables[id(ctx)][1]
            server = await SecureServer.listen(address[0], address[1], factory, self.inbound_tls_mode(port),
                                               lambda: certs.server_context(alpn=INBOUND_ALPN),
                                               self.settings.concurrency > 1,
                                               self.settings.request_headers_timeout)
            self.secure_servers[port] = server
        else:  # plaintext, accepted the same way: every queued connection at once (uvloop's server takes one per
            # loop iteration, so a burst of new clients waited behind a busy loop: benchmarks/README, mtls-handshakes)
            server = await SecureServer.listen(address[0], address[1], factory, DISABLE,
                                               reuse_port=self.settings.concurrency > 1)  # sibling workers
        sock = server.sockets[0].getsockname()
        self.addresses[ctx.name] = (sock[0], sock[1])
        self.contexts.append(ctx)
        self.servers.append(server)

    def request_stop(self, reason: str = "") -> None:
        self.ready = False  # the readiness probe says 503 from this moment
        if self.stopping is not None:
            self.stopping.set()

    async def drain(self) -> None:
        """Drain as Istio's sidecar drains, then close.

        On the drained listeners (`_drain_listener`) HTTP/1.1 responses say `connection: close` from now on and
        HTTP/2 connections get GOAWAY. A sidecar (--transparent) keeps every listener open for the whole drain, as
        Envoy's graceful drain: iptables still sends the app's outbound connections to them while the app shuts
        down, and callers that have not yet seen the endpoint go still reach it; idle HTTP/1.1 connections are left
        to their clients (closing one would race a request the client is sending on it). A standalone proxy stops
        accepting at once and closes idle connections. The process exits once no downstream connection is left, but
        not before min_drain_time (Istio's EXIT_ON_ZERO_ACTIVE_CONNECTIONS after MINIMUM_DRAIN_DURATION), and at
        drain_time at the latest (Istio's terminationDrainDuration), closing what is left."""
        self.ready = False
        settings = self.settings
        if not settings.transparent:
            self._close_listeners()
        for ctx in self.contexts:
            self._drain_listener(ctx)
        if self.interceptions is not None:
            self.interceptions.drain_new = self._drain_listener  # contexts made during the drain (a new port)
        started = time.monotonic()
        deadline = started + settings.drain_time
        earliest = started + min(settings.min_drain_time, settings.drain_time)
        tcp = self._tcp_connections
        while time.monotonic() < deadline:
            if time.monotonic() >= earliest and not (any(ctx.connections for ctx in self.contexts) or tcp()):
                break
            await asyncio.sleep(0.02)
        self._close_listeners()
        left = sum(len(ctx.connections) for ctx in self.contexts) + len(tcp())
        if left:
            log.warning("drain time over: closing %d connections", left)
            for ctx in self.contexts:
                ctx.start_draining(close_idle=True)  # idle ones close cleanly; the rest are cut
                for conn in list(ctx.connections):
                    conn.reset_after_write()
            for proxied in tcp():  # TCP connections are not drained by Envoy either: reset at the end
                proxied.abort()
        self.pool.close_idle()
        if self.status_ports is not None:
            await self.status_ports.close()
        if self.certs is not None:
            self.certs.stop()
        if self.gateway is not None:
            self.gateway.stop()
        self.access_log.close()  # the lines of the last requests, before the process exits

    def _drain_listener(self, ctx: ListenerContext) -> None:
        """A standalone proxy drains every listener. A sidecar drains its inbound listeners only, as pilot-agent asks
        Envoy (`drain_listeners?inboundonly&graceful`): its callers are told to go, while the app's own calls keep
        their connections until the app closes them."""
        if not self.settings.transparent:
            ctx.start_draining()
        elif ctx.telemetry is not None and ctx.telemetry.inbound:
            ctx.start_draining(close_idle=False)

    def _close_listeners(self) -> None:
        for server in self.servers:
            server.close()

    def _tcp_connections(self) -> list[TcpProxy]:
        return self.interceptions.tcp_connections() if self.interceptions is not None else []

    async def run(self) -> None:
        await self.start()
        assert self.stopping is not None
        await self.stopping.wait()
        log.info("draining (up to %.1fs, at least %.1fs)", self.settings.drain_time,
                 min(self.settings.min_drain_time, self.settings.drain_time))
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
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim  # glibc; other C libraries keep their own defaults
    except (OSError, AttributeError):
        return
    malloc_trim(0)  # the free pages start-up left in the heap (YAML parsing, compiling) go back to the system first
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
