"""Wiring of a gateway's server ports (`--gateway NAME --gateway-port NUMBER=[HOST:]PORT`): one listener per mapped
Gateway port, serving the hosts of that port's servers, terminating TLS as their `tls` says, answering httpsRedirect.

Built by app.py for a gateway proxy (`--gateway`); a sidecar never loads it. At each config load `prepare` checks the
Gateways this proxy is (also without `--gateway-port`: a TLS server the plaintext `--listen` listener would serve is
refused) and reads their certificate files (a problem is a load error naming file, document and field: the running
config stays); `follow` installs what the accepted load prepared and gives each port its table.
The routes are the gateway's own (VirtualServices bound to it), narrowed per port (routing/gateway_port.py); the TLS
is security/server_tls.py's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .istio import model as m
from .istio.build_gateway import HTTP_PROTOCOLS
from .istio.problems import ConfigError, Problem
from .proxy.downstream import EDGE_GATEWAY, ListenerContext, listener_limits
from .proxy.listener import DownstreamProtocol
from .proxy.secure_server import STRICT, SecureServer
from .routing.gateway_port import PortHosts, namespaces_checked, port_table, serves
from .routing.table import RouteTable
from .security.server_tls import GatewayTLS, PortTLS, compile_gateway_tls
from .telemetry.core import Telemetry

if TYPE_CHECKING:
    import random

    from .proxy.balancer import Clusters
    from .proxy.downstream import ConnectionBudget
    from .proxy.upstream import UpstreamPool
    from .settings import GatewayPortSpec, Settings
    from .telemetry.access_log import AccessLog
    from .telemetry.core import MeshTelemetry

log = logging.getLogger("meshproxy")


@dataclass(frozen=True, slots=True)
class Prepared:
    """What one config load compiled for the gateway ports, installed when the load is accepted."""

    hosts: dict[int, PortHosts]
    tls: dict[int, PortTLS]


def gateway_servers(snapshot: m.Snapshot, names: tuple[str, ...]) -> dict[int, list[tuple[m.Gateway, m.GatewayServer]]]:
    """The servers of the Gateways this proxy is, by port number, in declaration order."""
    out: dict[int, list[tuple[m.Gateway, m.GatewayServer]]] = {}
    for gateway in snapshot.gateways:
        if serves(gateway, names):
            for server in gateway.servers:
                out.setdefault(server.port.number, []).append((gateway, server))
    return out


def check_ports(servers: dict[int, list[tuple[m.Gateway, m.GatewayServer]]],
                specs: tuple[GatewayPortSpec, ...], listen: bool) -> list[Problem]:
    """What the mapped ports can serve: HTTP-family servers only. The plaintext `--listen` listener of a gateway
    serves every host of the gateway on any path (as before gateway ports existed): with a TLS server, that would be
    its hosts in plaintext, a load error (never silent); an httpsRedirect it would not apply, a warning."""
    problems: list[Problem] = []
    mapped = {spec.number for spec in specs}
    for number, entries in servers.items():
        for gateway, server in entries:
            origin = gateway.meta.origin
            for path, message in server.unsupported:  # warned about at load; this gateway would serve it
                problems.append(Problem(origin.file, origin.doc, path, message))
            if number in mapped and server.port.protocol not in HTTP_PROTOCOLS:
                problems.append(Problem(origin.file, origin.doc, f"{server.path}.port.protocol",
                                        f"protocol {server.port.protocol} is not implemented on meshproxy's gateway "
                                        f"ports (HTTP, HTTPS, HTTP2, GRPC are)"))
            tls = server.tls
            if listen and tls is not None and tls.mode not in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
                problems.append(Problem(origin.file, origin.doc, f"{server.path}.tls",
                                        f"the gateway's plaintext --listen listener would serve this TLS server's "
                                        f"hosts: run the gateway with --listen off and --gateway-port "
                                        f"NUMBER=[HOST:]PORT for its ports (here {number})"))
            elif listen and tls is not None and tls.https_redirect and number not in mapped:
                problems.append(Problem(origin.file, origin.doc, f"{server.path}.tls.httpsRedirect",
                                        f"applied on a --gateway-port listener only: give --gateway-port "
                                        f"{number}=[HOST:]PORT; the --listen listener serves these hosts in "
                                        f"plaintext", "warning"))
            if not listen and number not in mapped:
                problems.append(Problem(origin.file, origin.doc, f"{server.path}.port.number",
                                        f"port {number} has no listener on this gateway: give --gateway-port "
                                        f"{number}=[HOST:]PORT", "warning"))
            for j, host in enumerate(server.hosts):
                if not namespaces_checked(host):
                    problems.append(Problem(origin.file, origin.doc, f"{server.path}.hosts[{j}]",
                                            f"{host!r}: the namespace part is not checked: VirtualServices of every "
                                            f"namespace bound to this gateway serve the host", "warning"))
    for spec in specs:
        if spec.number not in servers:
            log.warning("--gateway-port %d: no server of this gateway has port %d: its listener answers 404 to "
                        "every request", spec.number, spec.number)
    return problems


class GatewayPorts:
    """The listeners of a gateway's server ports and their per-port tables and TLS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tls = GatewayTLS()
        self.hosts: dict[int, PortHosts] = {}
        self.pending: Prepared | None = None
        self.contexts: dict[int, ListenerContext] = {}  # by Gateway port number
        self.bound: dict[int, int] = {}  # Gateway port number -> the port its listener bound
        self.secure: set[int] | None = None  # the ports listening with TLS, once started
        self._watch: asyncio.Task[None] | None = None

    # ---- config

    def prepare(self, snapshot: m.Snapshot) -> list[Problem]:
        """Check and compile the gateway ports of a snapshot; ConfigError on an error (warnings are returned)."""
        servers = gateway_servers(snapshot, self.settings.gateways)
        problems = check_ports(servers, self.settings.gateway_ports, self.settings.listen is not None)
        mapped = {spec.number for spec in self.settings.gateway_ports}
        tls, tls_problems = compile_gateway_tls({n: s for n, s in servers.items() if n in mapped},
                                                self.settings.credentials_dir, self.settings.cert_dir)
        problems += tls_problems
        if self.secure is not None:  # a listener is TLS or plaintext for its life: never silently plaintext
            for number, entries in servers.items():
                if number in mapped and (number in tls) != (number in self.secure):
                    gateway, server = entries[0]
                    was = "with" if number in self.secure else "without"
                    problems.append(Problem(gateway.meta.origin.file, gateway.meta.origin.doc, f"{server.path}.tls",
                                            f"port {number} was started {was} TLS: changing it needs a restart of "
                                            f"the gateway"))
        if any(p.severity == "error" for p in problems):
            raise ConfigError(problems)
        hosts = {number: PortHosts.of(number, (server for _, server in servers.get(number, ()))) for number in mapped}
        self.pending = Prepared(hosts, tls)
        return problems

    def follow(self, table: RouteTable) -> None:
        """A load was accepted: its TLS serves new connections, its routes new requests."""
        if self.pending is not None:
            self.hosts = self.pending.hosts
            self.tls.install(self.pending.tls)
            self.pending = None
        for number, ctx in self.contexts.items():
            ctx.table = self.table_for(number, table)

    def table_for(self, number: int, table: RouteTable) -> RouteTable:
        narrowed = port_table(table, self.hosts.get(number, PortHosts(number, ())))
        port = self.bound.get(number, number)  # Istio's destination.port on a gateway: the listener's port
        return narrowed.with_policy(table.security.bind(port, remote_from_xff=False))

    # ---- listeners

    async def start(self, table: RouteTable, pool: UpstreamPool, rng: random.Random, clusters: Clusters,
                    access_log: AccessLog, mesh: MeshTelemetry, budget: ConnectionBudget,
                    contexts: list[ListenerContext], servers: list[asyncio.Server | SecureServer],
                    addresses: dict[str, tuple[str, int]]) -> None:
        """Listen on every --gateway-port; the contexts, servers and addresses join the app's own (drain, admin)."""
        settings = self.settings
        self.follow(table)
        self.secure = set(self.tls.ports)
        for spec in settings.gateway_ports:
            number = spec.number
            secure = number in self.tls.ports
            name = f"gateway:{number}"
            ctx = ListenerContext(name, self.table_for(number, table), pool, rng=rng, clusters=clusters,
                                  telemetry=Telemetry(name, "outbound", access_log, mesh),
                                  limits=listener_limits(settings, EDGE_GATEWAY), budget=budget,
                                  retry_reused=settings.retry_reused_connection, secure=secure)
            factory = cast(Callable[[], asyncio.Protocol], lambda ctx=ctx: DownstreamProtocol(ctx))
            host, port = spec.listen
            server: asyncio.Server | SecureServer
            if secure:  # one TLS handshake per connection, its server picked by SNI (security/server_tls.py)
                server = await SecureServer.listen(host, port, factory, STRICT, self.tls.context_for(number),
                                                   settings.concurrency > 1, settings.request_headers_timeout)
            else:
                server = await asyncio.get_running_loop().create_server(
                    factory, host, port, reuse_address=True, backlog=4096,
                    reuse_port=settings.concurrency > 1 or None)
            sock = server.sockets[0].getsockname()
            self.bound[number] = sock[1]
            ctx.table = self.table_for(number, table)  # with the bound port
            self.contexts[number] = ctx
            contexts.append(ctx)
            servers.append(server)
            addresses[name] = (sock[0], sock[1])
            log.info("gateway port %d on %s:%d: %s", number, sock[0], sock[1],
                     "TLS " + ", ".join(f"{'/'.join(c.names)} {c.server.tls.mode if c.server.tls else ''}"
                                        for c in self.tls.ports[number].servers) if secure else "plaintext")
        if self.tls.ports and settings.cert_poll_interval > 0:
            self._watch = asyncio.get_running_loop().create_task(self._poll(settings.cert_poll_interval))

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tls.poll()
            except Exception:  # the watch must survive anything: the current certificates stay in use
                log.exception("checking the gateway certificates failed")

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
