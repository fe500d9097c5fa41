"""The admin listener (Envoy's :15000): readiness, config dump, routes, Prometheus metrics.

Bound to 127.0.0.1 unless explicitly opened: it exposes configuration and a drain switch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .routing.describe import describe_table

if TYPE_CHECKING:
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


async def serve(app: web.Application, address: tuple[str, int]) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve an admin app (no access log, no signal handling of aiohttp's); returns the runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address[0], address[1])
    await site.start()
    sock = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    return runner, (sock[0], sock[1])


async def start_admin(proxy: ProxyApp, address: tuple[str, int]) -> tuple[str, int]:
    check_admin_address(address[0], proxy.settings.admin_allow_remote)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProxyCollector(proxy))  # type: ignore[arg-type]
    if proxy.telemetry.metrics is not None:
        registry.register(proxy.telemetry.metrics)  # type: ignore[arg-type]  # Istio standard metrics
    proxy.registry = registry  # type: ignore[attr-defined]

    async def ready(_: web.Request) -> web.Response:
        if proxy.ready:
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="DRAINING\n" if proxy.stopping and proxy.stopping.is_set() else "PRE_INITIALIZING\n")

    async def dump(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(config_dump(proxy), indent=2, default=str), content_type="application/json")

    async def routes(_: web.Request) -> web.Response:
        return web.Response(text=describe_table(proxy.config.table))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def quit_(_: web.Request) -> web.Response:
        proxy.request_stop()
        return web.Response(text="OK\n")

    async def reload(_: web.Request) -> web.Response:
        ok = proxy.reload("admin request")
        return web.Response(status=200 if ok else 400, text="OK\n" if ok else proxy.config.last_error + "\n")

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/config_dump", dump)
    app.router.add_get("/routes", routes)
    app.router.add_get("/stats/prometheus", metrics)
    app.router.add_post("/quitquitquit", quit_)
    app.router.add_post("/reload", reload)
    proxy.admin_runner, bound = await serve(app, address)  # type: ignore[attr-defined]
    return bound
