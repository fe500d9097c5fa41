"""pilot-agent's and Envoy's ports, as the kubelet and Prometheus reach them in a pod: health (15021), merged stats
(15020) and the proxy's own stats (15090).

- `/healthz/ready` on the health port: 200 once the config is loaded and every listener is up, 503 before that and
  from SIGTERM on (draining), as Istio's readiness probe (which `meshproxy inject` points at 15021).
- `/stats/prometheus` on the status port: the proxy's own metrics (what the admin port's /stats/prometheus says)
  followed by the app's, scraped on loopback from the port and path `ISTIO_PROMETHEUS_ANNOTATIONS` names (the JSON
  `meshproxy inject` writes from the pod's `prometheus.io/*` annotations), as pilot-agent's metrics merge. A failed
  app scrape is logged and the proxy's metrics are still served (pilot-agent does the same). The status port also
  answers `/healthz/ready`, as pilot-agent's does.
- `/stats/prometheus` on the Prometheus port: the proxy's metrics alone, as Envoy's `http-envoy-prom` listener on
  15090 (pilot-agent's merge scrapes Envoy there; some dashboards and ServiceMonitors scrape it directly).

Both listen on every address (0.0.0.0, and [::] where the host has IPv6): the kubelet and Prometheus come from
outside the pod. Only these paths are served there (the admin's router with these routes alone: no /quitquitquit,
no /config_dump); the admin port stays on loopback. Nothing here is on the data path.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .admin import AdminServer, Handler, Reply, serve_routes

log = logging.getLogger("meshproxy.status")

READY_PATH: Final = "/healthz/ready"
STATS_PATH: Final = "/stats/prometheus"
PROMETHEUS_ANNOTATIONS_ENV: Final = "ISTIO_PROMETHEUS_ANNOTATIONS"
TEXT_FORMAT: Final = "text/plain; version=0.0.4; charset=utf-8"  # the format the merged exposition is written in
APP_ACCEPT: Final = "text/plain;version=0.0.4;q=1,*/*;q=0.1"  # asked of the app: the classic text format
APP_SCRAPE_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class AppScrape:
    """Where the app's own metrics are: a loopback port and path (`prometheus.io/port`, `prometheus.io/path`)."""

    port: int
    path: str = "/metrics"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


def app_scrape_from(environ: Mapping[str, str], status_port: int | None = None) -> AppScrape | None:
    """`ISTIO_PROMETHEUS_ANNOTATIONS` ({"scrape": "true", "port": "8080", "path": "/metrics"}, as `meshproxy inject`
    writes it from the pod's prometheus.io annotations) -> the app's metrics, read as pilot-agent reads it: a scrape
    that is not "false" is on, the path defaults to /metrics and the port to 80, and the status port itself is refused
    (a scrape of itself). None when the variable is absent. ValueError naming the variable and field when it is
    malformed: a sidecar told to merge metrics must not silently drop them."""
    raw = environ.get(PROMETHEUS_ANNOTATIONS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{PROMETHEUS_ANNOTATIONS_ENV}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{PROMETHEUS_ANNOTATIONS_ENV}: expected a JSON object, got {type(value).__name__}")
    if str(value.get("scrape") or "") == "false":
        return None
    port = str(value.get("port") or "80").strip()
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{PROMETHEUS_ANNOTATIONS_ENV}: port: {value.get('port')!r} is not a port number")
    if status_port is not None and int(port) == status_port:
        raise ValueError(f"{PROMETHEUS_ANNOTATIONS_ENV}: port: {port} is the status port itself (a scrape of its own "
                         "scrape): the pod's prometheus.io/port must name the app's port")
    path = str(value.get("path") or "/metrics")
    if not path.startswith("/"):
        raise ValueError(f"{PROMETHEUS_ANNOTATIONS_ENV}: path: {path!r} must start with '/'")
    return AppScrape(int(port), path)


def merge_exposition(own: bytes, app: bytes) -> bytes:
    """The proxy's exposition, then the app's: each ends with a newline, an OpenMetrics `# EOF` of the app's is
    dropped (the merged text is the classic format, which has none)."""
    if not app:
        return own
    if own and not own.endswith(b"\n"):
        own += b"\n"
    lines = app.rstrip(b"\n").split(b"\n")
    if lines and lines[-1].strip() == b"# EOF":
        lines.pop()
    return own + b"\n".join(lines) + b"\n" if lines else own


class AppMetrics:
    """Scrapes the app's metrics on loopback for each scrape of the status port."""

    def __init__(self, scrape: AppScrape) -> None:
        self.scrape = scrape
        self.session: object = None  # aiohttp.ClientSession, made in the loop on first use

    async def fetch(self) -> bytes:
        """The app's exposition; b"" (and a log line) when it cannot be read."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        session: aiohttp.ClientSession = self.session  # type: ignore[assignment]
        try:
            async with session.get(self.scrape.url, headers={"Accept": APP_ACCEPT},
                                   timeout=aiohttp.ClientTimeout(total=APP_SCRAPE_TIMEOUT)) as response:
                body = await response.read()
                if response.status != 200:
                    log.warning("app metrics %s: status %d", self.scrape.url, response.status)
                    return b""
                return body
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("app metrics %s: %s", self.scrape.url, exc or type(exc).__name__)
            return b""

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()  # type: ignore[attr-defined]


class StatusPorts:
    """The health and status listeners of one sidecar (a single proxy's, or the --concurrency supervisor's)."""

    def __init__(self, ready: Handler, metrics: Callable[[], Awaitable[Reply]], app: AppScrape | None) -> None:
        self.ready = ready  # the admin's readiness answer: 200 LIVE, 503 PRE_INITIALIZING / DRAINING
        self.own_metrics = metrics  # the admin's /stats/prometheus answer
        self.app = AppMetrics(app) if app is not None else None
        self.servers: list[AdminServer] = []

    async def stats(self) -> Reply:
        own = await self.own_metrics()
        if own.status != 200 or self.app is None:
            return own
        return Reply(200, merge_exposition(own.body, await self.app.fetch()), TEXT_FORMAT)

    async def start(self, health_port: int | None, status_port: int | None, prometheus_port: int | None = None
                    ) -> dict[str, tuple[str, int]]:
        """Listen; returns the bound addresses by name ("health", "status", "prometheus"), for the log."""
        ports: list[tuple[str, int, list[tuple[str, str, Handler]]]] = []
        if health_port is not None:
            ports.append(("health", health_port, [("GET", READY_PATH, self.ready)]))
        if status_port is not None:
            stats = ("GET", STATS_PATH, self.stats)
            if ports and status_port == health_port and status_port != 0:
                ports[0][2].append(stats)  # one port for both
            else:
                ports.append(("status", status_port, [("GET", READY_PATH, self.ready), stats]))
        if prometheus_port is not None:
            ports.append(("prometheus", prometheus_port, [("GET", STATS_PATH, self.own_metrics)]))
        bound = {}
        for name, port, handlers in ports:
            servers = await serve_everywhere(handlers, port)
            self.servers.extend(servers)
            bound[name] = servers[0].address
        return bound

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
        self.servers.clear()
        if self.app is not None:
            await self.app.close()


async def serve_everywhere(handlers: Sequence[tuple[str, str, Handler]], port: int) -> list[AdminServer]:
    """Serve on 0.0.0.0, then on [::] at the same port (a port 0 becomes one port for both), as pilot-agent's status
    server; IPv4 only where the host has no IPv6."""
    v4 = await serve_routes(handlers, None, ("0.0.0.0", port))
    servers = [v4]
    if socket.has_ipv6:
        try:
            servers.append(await serve_routes(handlers, None, ("::", v4.address[1])))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                await v4.close()
                raise
            log.info("port %d: IPv6 unavailable here (%s): IPv4 only", v4.address[1], exc)
    return servers
