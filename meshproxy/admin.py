"""The admin listener (Envoy's :15000): readiness, config dump, routes, Prometheus metrics, reload, quit.

One router serves every admin port: a single proxy's (`ProxyAdmin`, also each worker's, which its supervisor
asks) and the --concurrency supervisor's (`workers.SupervisorAdmin`, which merges and fans out). A backend only
answers; the router checks the address, maps the paths and writes every reply and error, so both ports answer
the same paths, methods and mistakes alike.

Bound to 127.0.0.1 unless explicitly opened: it exposes configuration and a drain switch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .http1.errors import ProtocolError
from .http1.head import UNDERSCORE_ALLOW, HeadPolicy
from .http1.server import CallbackHandler, ServerCodec
from .http1.wire import CRLF, DATE, header_lines, status_line
from .messages import RequestHead
from .proxy.local_reply import protocol_error_body
from .routing.describe import describe_table

if TYPE_CHECKING:
    from .console.api import Console  # the console is loaded by its first request (0.8 MiB an idle proxy never needs)
    from .lifecycle import ConfigReloader, ConfigState
    from .proxy.downstream import ListenerContext
    from .proxy.upstream import UpstreamPool
    from .settings import Settings
    from .telemetry.core import MeshTelemetry


class RunningProxy(Protocol):
    """What a single proxy's admin reads of it and may ask it (`app.ProxyApp` is one): the admin is served by the
    wiring, never imports it."""

    settings: Settings
    contexts: list[ListenerContext]
    pool: UpstreamPool
    telemetry: MeshTelemetry
    reloader: ConfigReloader
    ready: bool
    stopping: asyncio.Event | None

    @property
    def config(self) -> ConfigState: ...

    def request_stop(self, reason: str = "") -> None: ...


class _ProxyCollector:
    """Reads the proxy's own health figures at scrape time: nothing to update per request."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy

    def collect(self) -> Any:
        proxy = self.proxy
        tasks = GaugeMetricFamily("meshproxy_event_loop_tasks", "asyncio tasks alive (exchanges, timers, admin)")
        tasks.add_metric([], len(asyncio.all_tasks()))
        yield tasks
        reloads = CounterMetricFamily("meshproxy_config_reloads", "Config reloads by result", labels=["result"])
        reloads.add_metric(["accepted"], proxy.config.reloads_accepted)
        reloads.add_metric(["rejected"], proxy.config.reloads_rejected)
        yield reloads
        version = GaugeMetricFamily("meshproxy_config_version", "Version of the running config (1 = as started)")
        version.add_metric([], proxy.config.version)
        yield version
        conns = GaugeMetricFamily("meshproxy_downstream_connections", "Open downstream connections", labels=["listener"])
        for ctx in proxy.contexts:
            conns.add_metric([ctx.name], len(ctx.connections))
        yield conns
        pool = GaugeMetricFamily("meshproxy_upstream_connections", "Upstream connections by state", labels=["state"])
        pool.add_metric(["active"], proxy.pool.active)
        pool.add_metric(["idle"], proxy.pool.idle_count)
        yield pool
        opened = CounterMetricFamily("meshproxy_upstream_connections_opened", "Upstream connections opened")
        opened.add_metric([], proxy.pool.opened)
        yield opened


def config_dump(proxy: RunningProxy) -> dict[str, Any]:
    snap = proxy.config.snapshot

    def resources(items: Any) -> list[dict[str, Any]]:
        return [{"name": r.meta.name, "namespace": r.meta.namespace, "origin": str(r.meta.origin), "spec": r.meta.spec}
                for r in items]

    return {
        "version": proxy.config.version,
        "loaded_at": proxy.config.loaded_at,
        "files": list(snap.files),
        "workload": {"name": proxy.settings.workload, "namespace": proxy.settings.namespace,
                     "labels": dict(proxy.settings.labels), "gateways": list(proxy.settings.gateways)},
        "virtual_services": resources(snap.virtual_services),
        "destination_rules": resources(snap.destination_rules),
        "service_entries": resources(snap.service_entries),
        "gateways": resources(snap.gateways),
        "warnings": [str(p) for p in proxy.config.warnings],
        "last_rejected": proxy.config.last_error,
        "reloads": {"accepted": proxy.config.reloads_accepted, "rejected": proxy.config.reloads_rejected},
    }


def check_admin_address(host: str, allow_remote: bool) -> None:
    """The admin port can stop and reconfigure the proxy: loopback only, unless asked otherwise."""
    if not allow_remote and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"admin address {host} is not loopback: pass --admin-allow-remote to open it")


# --------------------------------------------------------------------------- the router

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    """What an admin handler answers; the router alone turns it into HTTP."""

    status: int
    body: bytes
    content_type: str = TEXT

    @classmethod
    def text(cls, text: str, status: int = 200) -> Reply:
        return cls(status, text.encode())

    @classmethod
    def json(cls, value: Any, indent: int | None = None) -> Reply:
        return cls(200, json.dumps(value, indent=indent, default=str).encode(), JSON)


class AdminError(Exception):
    """A handler that cannot answer (a worker not reachable...): the router replies with this, no traceback."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.reply = Reply.text(text, status)


Handler = Callable[[], Awaitable[Reply]]
RequestHandler = Callable[[RequestHead], Awaitable[Reply]]  # reads the path and query itself (the console)
CONSOLE_PREFIX: Final = b"/console"


class AdminBackend(Protocol):
    """The answers of one admin port; the paths and methods are the router's (`endpoints`)."""

    async def ready(self) -> Reply: ...
    async def config_dump(self) -> Reply: ...
    async def routes(self) -> Reply: ...
    async def metrics(self) -> Reply: ...
    async def reload(self) -> Reply: ...
    async def quit(self) -> Reply: ...

    async def console(self, head: RequestHead) -> Reply:
        """Every path under /console (meshproxy/console/api.py)."""
        ...

    def extra_endpoints(self) -> Sequence[tuple[str, str, Handler]]:
        """Paths only this kind of admin has (the supervisor's /workers); elsewhere they are 404."""
        ...


def endpoints(backend: AdminBackend) -> list[tuple[str, str, Handler]]:
    return [
        ("GET", "/ready", backend.ready),
        ("GET", "/config_dump", backend.config_dump),
        ("GET", "/routes", backend.routes),
        ("GET", "/stats/prometheus", backend.metrics),
        ("POST", "/quitquitquit", backend.quit),
        ("POST", "/reload", backend.reload),
        *backend.extra_endpoints(),
    ]


ADMIN_HEAD_POLICY: Final = HeadPolicy(underscores=UNDERSCORE_ALLOW, accept_http10=True)  # any HTTP client


@dataclass(slots=True)
class AdminServer:
    server: asyncio.Server
    address: tuple[str, int]  # as bound: a port 0 made concrete

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class _AdminConnection:
    """One admin client connection on the proxy's own HTTP/1.1 codec (no web framework in the proxy's memory):
    requests are answered one at a time, in order; a malformed one gets 400 and the connection closes."""

    __slots__ = ("routes", "console", "codec", "transport", "queue", "busy", "closed")

    def __init__(self, routes: dict[bytes, dict[bytes, Handler]], console: RequestHandler | None) -> None:
        self.routes = routes
        self.console = console
        self.codec = ServerCodec(CallbackHandler(self.on_request_head, self.on_request_body, self.on_request_end),
                                 ADMIN_HEAD_POLICY)
        self.transport: asyncio.Transport | None = None
        self.queue: list[RequestHead] = []  # complete requests not yet answered
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.codec.feed(data)
        except ProtocolError as error:
            self._write(error.status, protocol_error_body(error), TEXT, close=True, head_only=False)
            self._close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def on_request_head(self, head: RequestHead) -> None:
        self.queue.append(head)

    def on_request_body(self, data: bytes) -> None:
        pass  # the admin's POSTs take no body

    def on_request_end(self) -> None:
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        while self.queue and not self.closed:
            head = self.queue.pop(0)
            status, body, content_type, extra = await self._reply(head)
            close = not head.keep_alive
            self._write(status, body, content_type, close=close, head_only=head.method == b"HEAD", extra=extra)
            if close:
                self._close()
        self.busy = False

    async def _reply(self, head: RequestHead) -> tuple[int, bytes, str, tuple[tuple[bytes, bytes], ...]]:
        methods = self.routes.get(head.path)
        if methods is None:
            path = head.path
            if self.console is not None and (path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + b"/")):
                if head.method not in (b"GET", b"HEAD"):
                    return 405, b"405: Method Not Allowed", TEXT, ((b"allow", b"GET,HEAD"),)
                reply = await self.console(head)
                return reply.status, reply.body, reply.content_type, ()
            return 404, b"404: Not Found", TEXT, ()
        handler = methods.get(b"GET" if head.method == b"HEAD" and b"GET" in methods else head.method)
        if handler is None:
            return 405, b"405: Method Not Allowed", TEXT, ((b"allow", b",".join(methods)),)
        try:
            reply = await handler()
        except AdminError as exc:
            reply = exc.reply
        return reply.status, reply.body, reply.content_type, ()

    def _write(self, status: int, body: bytes, content_type: str, *, close: bool, head_only: bool,
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if self.transport is None or self.closed:
            return
        head = [status_line(status), b"content-type: ", content_type.encode(), CRLF,
                b"content-length: %d\r\n" % len(body), header_lines(extra), DATE.line()]
        if close:
            head.append(b"connection: close\r\n")
        head.append(CRLF)
        if not head_only:
            head.append(body)
        self.transport.write(b"".join(head))

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def serve_admin(backend: AdminBackend, address: tuple[str, int], allow_remote: bool) -> AdminServer:
    """Check the address, then serve the backend's endpoints there. A GET path answers HEAD too; an unknown path
    is 404 and a wrong method 405 with `Allow`, the same on every admin port."""
    check_admin_address(address[0], allow_remote)
    return await serve_routes(endpoints(backend), backend.console, address)


async def serve_routes(handlers: Sequence[tuple[str, str, Handler]], console: RequestHandler | None,
                       address: tuple[str, int]) -> AdminServer:
    """Serve these paths (and /console/... by `console`) on the admin's router; the address is the caller's."""
    routes: dict[bytes, dict[bytes, Handler]] = {}
    for method, path, handler in handlers:
        allowed = routes.setdefault(path.encode(), {})
        allowed[method.encode()] = handler
        if method == "GET":
            allowed[b"HEAD"] = handler
    loop = asyncio.get_running_loop()
    factory = cast(Callable[[], asyncio.Protocol], lambda: _AdminConnection(routes, console))
    server = await loop.create_server(factory, address[0], address[1])
    sock = server.sockets[0].getsockname()
    return AdminServer(server, (sock[0], sock[1]))


# --------------------------------------------------------------------------- a single proxy's answers


class ProxyAdmin:
    """One proxy's admin (a sidecar's, or a worker's that its supervisor asks)."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProxyCollector(proxy))  # type: ignore[arg-type]
        if proxy.telemetry.metrics is not None:
            self.registry.register(proxy.telemetry.metrics)  # type: ignore[arg-type]  # Istio standard metrics
        self.console_app: Console | None = None  # made when first asked

    async def ready(self) -> Reply:
        proxy = self.proxy
        if proxy.ready:
            return Reply.text("LIVE\n")
        return Reply.text("DRAINING\n" if proxy.stopping and proxy.stopping.is_set() else "PRE_INITIALIZING\n", 503)

    async def config_dump(self) -> Reply:
        return Reply.json(config_dump(self.proxy), indent=2)

    async def routes(self) -> Reply:
        return Reply.text(describe_table(self.proxy.config.table))

    async def metrics(self) -> Reply:
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    async def reload(self) -> Reply:
        if self.proxy.reloader.reload("admin request"):
            return Reply.text("OK\n")
        return Reply.text(self.proxy.config.last_error + "\n", 400)

    async def quit(self) -> Reply:
        self.proxy.request_stop("admin /quitquitquit")
        return Reply.text("OK\n")

    async def console(self, head: RequestHead) -> Reply:
        if self.console_app is None:
            from .console.api import Console
            from .console.local import LocalSource

            proxy = self.proxy
            self.console_app = Console(LocalSource(proxy.settings.workload, proxy.telemetry, lambda: proxy.config,
                                                   lambda: generate_latest(self.registry)))
        return await console_reply(self.console_app, head)

    def extra_endpoints(self) -> Sequence[tuple[str, str, Handler]]:
        return ()


async def console_reply(console: Console, head: RequestHead) -> Reply:
    answer = await console.answer(head.path.decode("latin-1"), head.query.decode("latin-1"))
    return Reply(answer.status, answer.body, answer.content_type)
