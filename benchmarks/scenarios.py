"""Benchmark scenarios: the performance issue's eight, plus the telemetry pair on a single route.

A scenario's `build` writes the Istio YAML of the run (or names Istio's sample files, which are loaded
unchanged) and returns a `Setup`: those files, the request wrk sends, the telemetry the proxies run with, and
probes that check a routing proxy answers from the right backend before any load. meshproxy loads the files;
Envoy's configuration is translated from the same files (envoy_config.py). `direct` and `aiohttp-naive` do
no routing: they send everything to the backend's main port.

The backend (peers.py) answers "ok\\n" on its main port, and "v1\\n", "v2\\n", "v3\\n" on three more ports: the
Bookinfo scenarios map each `reviews` subset (label `version`) to one of them, so a probe can tell which
subset a proxy picked, and every answer has the same size.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from children import Address
from peers import BODY_FILE_BYTES, BODY_PATH, GRPC_PATH, Backend

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
# Istio's Bookinfo samples, copied unchanged into the repository (where tests/harness.py's SAMPLES finds them too).
SAMPLES_DIRS = (REPO_ROOT / "config" / "bookinfo",)
ROUTES_1000 = 1000
IDLE_CONNECTIONS = 10_000
H2_CONNECTIONS = 8  # the HTTP/2 scenarios' load: 8 connections x 8 streams, as many requests in flight as 64
H2_STREAMS = 8  # HTTP/1.1 connections
ALL_TARGETS = ("direct", "meshproxy", "envoy", "aiohttp-naive")
ROUTING_TARGETS = ("direct", "meshproxy", "envoy")  # aiohttp-naive has no route table: not in routing scenarios


class Kind(enum.Enum):
    THROUGHPUT = "throughput"  # wrk closed loop: req/s, latency percentiles, CPU per request
    LATENCY = "latency"  # wrk with one connection: latency added over going direct
    BODIES = "bodies"  # wrk with 1 MiB each way: MB/s
    IDLE = "idle"  # many idle keep-alive connections: resident memory
    MTLS = "mtls"  # THROUGHPUT through two sidecars speaking mutual TLS, plus handshakes/s between them (mtls.py)


class Protocol(enum.Enum):
    HTTP1 = "HTTP/1.1"  # wrk, HTTP/1.1 both sides
    H2C = "h2c"  # h2load, HTTP/2 with prior knowledge both sides (downstream and to the backend)


class Pinning(enum.Enum):
    SPLIT = "split"  # proxy alone on the first CPU; wrk (or the idle client) and the backend on the second
    ONE_CORE = "one-core"  # proxy, wrk and backend all on the first CPU
    SHARED = "shared"  # nothing pinned: a two-worker proxy needs both CPUs, and so do wrk and the backend
    SIDECARS = "sidecars"  # SPLIT for a target of two sidecars (mtls.py): both on the first CPU


@dataclass(frozen=True, slots=True)
class Telemetry:
    metrics: bool  # meshproxy: Istio's standard metrics and the peer metadata exchange
    tracing: bool  # B3/W3C headers rewritten per hop, new traces sampled and exported to the harness's sink
    sampling_percent: float = 1.0

    def describe(self) -> str:
        if not (self.metrics or self.tracing):
            return "telemetry off"
        return f"Istio metrics {'on' if self.metrics else 'off'}, tracing " + (
            f"{self.sampling_percent:g} % exported" if self.tracing else "off")


TELEMETRY_OFF = Telemetry(metrics=False, tracing=False)
ISTIO_TELEMETRY = Telemetry(metrics=True, tracing=True, sampling_percent=1.0)


@dataclass(frozen=True, slots=True)
class Request:
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str = "/"
    method: str = "GET"
    body_bytes: int = 0  # a request body of this many bytes ("x" repeated)
    body: bytes = b""  # or this body (h2load only: a gRPC message)
    alternate_headers: Mapping[str, str] = field(default_factory=dict)  # added to every second request


@dataclass(frozen=True, slots=True)
class Probe:
    """A request sent through a routing proxy before the load; its answer must be `expect`."""

    path: str
    headers: Mapping[str, str]
    expect: bytes


@dataclass(frozen=True, slots=True)
class Setup:
    configs: tuple[Path, ...]  # Istio YAML: meshproxy's --config files, Envoy's config is translated from them
    request: Request
    telemetry: Telemetry
    probes: tuple[Probe, ...] = ()
    proxy_options: Mapping[str, str] = field(default_factory=dict)  # extra MESHPROXY_* settings
    direct: Address | None = None  # the `direct` target's address, when not the backend's HTTP/1.1 one


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str
    goal: str  # the performance issue's target for it
    build: Callable[[Path, Backend], Setup]
    kind: Kind = Kind.THROUGHPUT
    pinning: Pinning = Pinning.SPLIT
    targets: tuple[str, ...] = ALL_TARGETS
    workers: int = 1  # the proxies' --concurrency
    connections: int | None = None  # fixed by the scenario, whatever --connections says
    threads: int | None = None  # wrk threads, fixed by the scenario
    max_duration_s: int | None = None  # a cap on --duration
    max_rounds: int | None = None  # a cap on --rounds
    protocol: Protocol = Protocol.HTTP1
    streams: int = 1  # h2load: concurrent streams per connection (-m)
    default: bool = True  # run when no --scenario is given
    launchers: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # target -> its own launcher (mtls.py)


class BackendUnsuitable(Exception):
    """The backend cannot serve this scenario (the built-in Python backend speaks no HTTP/2): it is skipped."""


# ----------------------------------------------------------------------------------------- configurations

SINGLE_ROUTE_YAML = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {backend.host}, ports: {{http: {backend.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http: [{{route: [{{destination: {{host: backend}}}}]}}]
"""

# What Kubernetes would give the productpage sidecar: the reviews Service with one pod per version. Each
# version's endpoint is one of the backend's subset ports (labels as Bookinfo's pods: app, version).
REVIEWS_SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}"""
REVIEWS_ENDPOINT = "  - {{address: {address.host}, ports: {{http: {address.port}}}, labels: {{app: reviews, version: {name}}}}}\n"
REVIEWS_HOST = "reviews:9080"  # as productpage calls it
BOOKINFO_PROXY_OPTIONS = {"MESHPROXY_WORKLOAD": "productpage-v1", "MESHPROXY_LABELS": "app=productpage,version=v1"}


# The HTTP/2 scenarios: the same single route, to nginx's h2c listener, the port's protocol saying HTTP/2 (Istio
# then speaks HTTP/2 upstream: Envoy's cluster gets http2_protocol_options, meshproxy its HTTP/2 pool).
H2_ROUTE_YAML = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: {port_name}, protocol: {protocol}}}]
  resolution: STATIC
  endpoints: [{{address: {address.host}, ports: {{{port_name}: {address.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http: [{{route: [{{destination: {{host: backend}}}}]}}]
"""
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
GRPC_REQUEST = b"\x00\x00\x00\x00\x03\x08\x01\x10"  # a gRPC message: the 5-byte prefix and 3 bytes of protobuf


def samples_dir() -> Path:
    for directory in SAMPLES_DIRS:
        if (directory / "virtual-service-reviews-test-v2.yaml").is_file():
            return directory
    raise FileNotFoundError("Istio's Bookinfo samples: none of " + ", ".join(map(str, SAMPLES_DIRS)))


def single_route_files(workdir: Path, backend: Backend) -> tuple[Path, ...]:
    config = workdir / "single-route.yaml"
    config.write_text(SINGLE_ROUTE_YAML.format(backend=backend.address))
    return (config,)


def reviews_service_entry(workdir: Path, backend: Backend) -> Path:
    path = workdir / "reviews-service-entry.yaml"
    endpoints = "".join(REVIEWS_ENDPOINT.format(address=address, name=name)
                        for name, address in backend.subsets.items())
    path.write_text(REVIEWS_SERVICE_ENTRY.format(endpoints=endpoints))
    return path


def bookinfo_files(workdir: Path, backend: Backend) -> tuple[Path, ...]:
    samples = samples_dir()
    return (reviews_service_entry(workdir, backend), samples / "virtual-service-reviews-test-v2.yaml",
            samples / "destination-rule-all.yaml")


def routes_1000_yaml(count: int) -> str:
    """One VirtualService for reviews with `count` routes, exact and prefix URI matches alternating; only the
    last one matches the request path (`last_route_path`). Every route but the last goes to v1, the last to v2."""
    lines = ["apiVersion: networking.istio.io/v1", "kind: VirtualService", "metadata: {name: reviews}",
             "spec:", "  hosts: [reviews]", "  http:"]
    for index in range(count):
        match = f"exact: /r{index}" if index % 2 == 0 else f"prefix: /r{index}/"
        subset = "v2" if index == count - 1 else "v1"
        lines.append(f"  - match: [{{uri: {{{match}}}}}]")
        lines.append(f"    route: [{{destination: {{host: reviews, subset: {subset}}}}}]")
    return "\n".join(lines) + "\n"


def last_route_path(count: int) -> str:
    last = count - 1
    return f"/r{last}" if last % 2 == 0 else f"/r{last}/item/7"


# ----------------------------------------------------------------------------------------- scenarios

def single_route(workdir: Path, backend: Backend, telemetry: Telemetry = TELEMETRY_OFF) -> Setup:
    return Setup(single_route_files(workdir, backend), Request(host="backend"), telemetry,
                 probes=(Probe("/", {}, b"ok\n"),))


def telemetry_on(workdir: Path, backend: Backend) -> Setup:
    return single_route(workdir, backend, ISTIO_TELEMETRY)


def bookinfo(workdir: Path, backend: Backend, telemetry: Telemetry = TELEMETRY_OFF) -> Setup:
    jason = {"end-user": "jason"}
    return Setup(bookinfo_files(workdir, backend), Request(host=REVIEWS_HOST, alternate_headers=jason), telemetry,
                 probes=(Probe("/", {}, b"v1\n"), Probe("/", jason, b"v2\n")),
                 proxy_options=BOOKINFO_PROXY_OPTIONS)


def bookinfo_telemetry(workdir: Path, backend: Backend) -> Setup:
    return bookinfo(workdir, backend, ISTIO_TELEMETRY)


def routes_1000(workdir: Path, backend: Backend) -> Setup:
    routes = workdir / "virtual-service-reviews-1000-routes.yaml"
    routes.write_text(routes_1000_yaml(ROUTES_1000))
    files = (reviews_service_entry(workdir, backend), routes, samples_dir() / "destination-rule-all.yaml")
    path = last_route_path(ROUTES_1000)
    return Setup(files, Request(host=REVIEWS_HOST, path=path), TELEMETRY_OFF,
                 probes=(Probe(path, {}, b"v2\n"), Probe("/r0", {}, b"v1\n"), Probe("/r1/x", {}, b"v1\n")),
                 proxy_options=BOOKINFO_PROXY_OPTIONS)


def bodies(workdir: Path, backend: Backend) -> Setup:
    request = Request(host="backend", path=BODY_PATH, method="POST", body_bytes=BODY_FILE_BYTES)
    return Setup(single_route_files(workdir, backend), request, TELEMETRY_OFF)


def h2_route_files(workdir: Path, backend: Backend, protocol: str) -> tuple[tuple[Path, ...], Address]:
    if backend.h2c is None:
        raise BackendUnsuitable(f"{backend.description} has no h2c listener (the HTTP/2 scenarios need nginx)")
    config = workdir / f"{protocol.lower()}-route.yaml"
    config.write_text(H2_ROUTE_YAML.format(port_name=protocol.lower(), protocol=protocol, address=backend.h2c))
    return (config,), backend.h2c


def h2c(workdir: Path, backend: Backend) -> Setup:
    files, direct = h2_route_files(workdir, backend, "HTTP2")
    return Setup(files, Request(host="backend"), TELEMETRY_OFF, probes=(Probe("/", {}, b"ok\n"),), direct=direct)


def grpc_unary(workdir: Path, backend: Backend) -> Setup:
    files, direct = h2_route_files(workdir, backend, "GRPC")
    request = Request(host="backend", headers=GRPC_HEADERS, path=GRPC_PATH, method="POST", body=GRPC_REQUEST)
    return Setup(files, request, TELEMETRY_OFF, probes=(Probe("/", {}, b"ok\n"),), direct=direct)


def idle(workdir: Path, backend: Backend) -> Setup:
    # meshproxy's default connection limit is half the open-file limit (a client connection may need an upstream
    # one): with the usual 20,000 that is exactly 10,000. Here each client sends one request, at most a few
    # hundred at a time, so upstream connections stay few; Envoy has no limit by default.
    options = {"MESHPROXY_MAX_CONNECTIONS": str(IDLE_CONNECTIONS + 1000)}
    return Setup(single_route_files(workdir, backend), Request(host="backend"), TELEMETRY_OFF,
                 proxy_options=options)


def idle_bookinfo(workdir: Path, backend: Backend) -> Setup:
    """A sidecar as it runs in a pod: Bookinfo's routing, Istio's telemetry on."""
    return replace(bookinfo(workdir, backend, ISTIO_TELEMETRY), probes=())


SCENARIO_LIST = (
    Scenario("single-route", "(1) one route, pass-through: one VirtualService, one catch-all route, telemetry off",
             "-", single_route),
    Scenario("bookinfo-routing",
             "(2) Bookinfo: virtual-service-reviews-test-v2.yaml + destination-rule-all.yaml, Host reviews:9080, "
             "every second request with end-user: jason (-> v2, others -> v1), telemetry off",
             "meshproxy >= 1.5x envoy req/s, p99 <= envoy's", bookinfo, targets=ROUTING_TARGETS),
    Scenario("bookinfo-telemetry",
             "(3) bookinfo-routing with Istio's telemetry: metrics, x-request-id, B3/W3C, 1 % of traces exported",
             "meshproxy >= 1.5x envoy req/s, p99 <= envoy's", bookinfo_telemetry, targets=ROUTING_TARGETS),
    Scenario("routes-1000",
             "(4) one VirtualService for reviews with 1,000 routes (exact and prefix URIs), the last one matches",
             "meshproxy req/s within 10 % of bookinfo-routing", routes_1000, targets=ROUTING_TARGETS),
    Scenario("one-connection",
             "(5) single-route over one connection, proxy + wrk + backend all on one CPU: added latency",
             "meshproxy added p50/p99 <= envoy's", single_route, kind=Kind.LATENCY, pinning=Pinning.ONE_CORE,
             connections=1),
    Scenario("concurrency-2",
             "(6) bookinfo-routing with meshproxy --concurrency 2 against envoy --concurrency 2, nothing pinned",
             "-", bookinfo, pinning=Pinning.SHARED, targets=ROUTING_TARGETS, workers=2, threads=2),
    Scenario("bodies-1mib", "(7) single-route, POST of 1 MiB answered with 1 MiB, 8 connections: MB/s both ways",
             "meshproxy MB/s >= envoy's", bodies, kind=Kind.BODIES, connections=8, max_duration_s=5),
    Scenario("idle-10k",
             f"(8) {IDLE_CONNECTIONS:,} keep-alive connections, one request each, then idle: resident memory",
             "meshproxy RSS < 100 MiB", idle, kind=Kind.IDLE, targets=("meshproxy", "envoy", "aiohttp-naive"),
             max_rounds=1),
    Scenario("idle-bookinfo",
             "the seams issue's idle memory: a proxy with Bookinfo's routing and Istio's telemetry, before and with "
             "1,000 idle keep-alive connections",
             "meshproxy RSS before the connections <= 45 MiB", idle_bookinfo, kind=Kind.IDLE,
             targets=("meshproxy", "envoy"), connections=1000, max_rounds=1),
    Scenario("telemetry-on",
             "single-route with Istio's telemetry (metrics, x-request-id, B3/W3C, 1 % of traces exported)",
             "-", telemetry_on, targets=ROUTING_TARGETS),
    Scenario("h2c",
             "single-route over HTTP/2 both ways: h2load (h2c, prior knowledge) -> proxy -> nginx h2c, "
             f"{H2_CONNECTIONS} connections x {H2_STREAMS} concurrent streams, GET, telemetry off",
             "meshproxy >= 1.5x envoy req/s per core, p99 <= envoy's", h2c, targets=ROUTING_TARGETS,
             protocol=Protocol.H2C, connections=H2_CONNECTIONS, streams=H2_STREAMS),
    Scenario("grpc-unary",
             "h2c with unary gRPC calls: POST /bench.Echo/Unary, content-type application/grpc, te: trailers, an "
             "8-byte gRPC message each way, grpc-status 0 in the trailers; the port's protocol GRPC",
             "meshproxy >= 1.5x envoy req/s per core, p99 <= envoy's", grpc_unary, targets=ROUTING_TARGETS,
             protocol=Protocol.H2C, connections=H2_CONNECTIONS, streams=H2_STREAMS),
    Scenario("telemetry-off", "single-route under its old name (telemetry off); not in the default run", "-",
             single_route, targets=ROUTING_TARGETS, default=False),
)
SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in SCENARIO_LIST}
QUICK_SCENARIOS = ("single-route", "bookinfo-routing", "h2c", "grpc-unary")
