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
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .routing.describe import describe_table

if TYPE_CHECKING:
    from aiohttp import web

    from .app import ProxyApp


class _ProxyCollector:
    """Reads the proxy's own health figures at scrape time: nothing to update per request."""

    def __init__(self, proxy: ProxyApp) -> None:
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


def config_dump(proxy: ProxyApp) -> dict[str, Any]:
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


class AdminBackend(Protocol):
    """The answers of one admin port; the paths and methods are the router's (`endpoints`)."""

    async def ready(self) -> Reply: ...
    async def config_dump(self) -> Reply: ...
    async def routes(self) -> Reply: ...
    async def metrics(self) -> Reply: ...
    async def reload(self) -> Reply: ...
    async def quit(self) -> Reply: ...

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


@dataclass(slots=True)
class AdminServer:
    runner: web.AppRunner
    address: tuple[str, int]  # as bound: a port 0 made concrete

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_admin(backend: AdminBackend, address: tuple[str, int], allow_remote: bool) -> AdminServer:
    """Check the address, then serve the backend's endpoints there (no access log, no aiohttp signal handling).
    Unknown paths (404) and methods (405, with Allow) are aiohttp's answers, the same on every admin port."""
    from aiohttp import web  # imported here: a worker without an admin port never loads aiohttp

    check_admin_address(address[0], allow_remote)

    def _respond(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def respond(_: web.Request) -> web.Response:
            try:
                reply = await handler()
            except AdminError as exc:
                reply = exc.reply
            return web.Response(status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type})

        return respond

    app = web.Application()
    for method, path, handler in endpoints(backend):
        if method == "GET":
            app.router.add_get(path, _respond(handler))  # and HEAD
        else:
            app.router.add_route(method, path, _respond(handler))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address[0], address[1])
    await site.start()
    sock = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    return AdminServer(runner, (sock[0], sock[1]))


# --------------------------------------------------------------------------- a single proxy's answers


class ProxyAdmin:
    """One proxy's admin (a sidecar's, or a worker's that its supervisor asks)."""

    def __init__(self, proxy: ProxyApp) -> None:
        self.proxy = proxy
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProxyCollector(proxy))  # type: ignore[arg-type]
        if proxy.telemetry.metrics is not None:
            self.registry.register(proxy.telemetry.metrics)  # type: ignore[arg-type]  # Istio standard metrics

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

    def extra_endpoints(self) -> Sequence[tuple[str, str, Handler]]:
        return ()
