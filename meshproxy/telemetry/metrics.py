"""Istio's standard HTTP metrics, exposed through prometheus-client at the admin port's /stats/prometheus.

`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
`istio_response_bytes`, with the 25 labels Istio's stats filter sets and Envoy's default histogram
buckets (Istio sets none of its own). See shared/research/telemetry.md sections 1-2.

Hot path: one `Series` per distinct label set, bound once (the data path caches it under a small key:
service, peer, response code, flags) and then updated with plain integer and float additions; no
`.labels()` lookup and no lock per request. The event loop is the only writer and the scrape runs on the
same loop, so nothing is torn. At scrape time `IstioMetrics.collect` turns the series into metric
families for prometheus-client's exposition. Label values come from configuration and workload identity
only (never from paths or other free request text), so the number of series stays bounded.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .peer import Workload

# Envoy's HistogramSettingsImpl::defaultBuckets, used by Istio for durations and sizes alike.
BUCKETS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000,
           3600000)
_LE: Final = tuple(floatToGoString(b) for b in BUCKETS) + ("+Inf",)
# What `record` bisects: floats for durations, integers for byte counts (same buckets: a whole number of bytes
# is <= 0.5 exactly when it is <= 0), so every comparison stays within one type.
_DURATION_BOUNDS: Final = tuple(float(b) for b in BUCKETS)
_BYTES_BOUNDS: Final = tuple(int(b) for b in BUCKETS)

LABELS: Final = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
    "source_principal", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_canonical_service",
    "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
    "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)

# Istio's TCP metrics carry the same labels but response_code and grpc_response_status.
TCP_LABELS: Final = tuple(name for name in LABELS if name not in ("response_code", "grpc_response_status"))
TCP_PROTOCOL: Final = "tcp"

SOURCE: Final = "source"
DESTINATION: Final = "destination"


class Service:
    """The destination service labels of a request: FQDN, short name, namespace; interned like Workload."""

    __slots__ = ("host", "name", "namespace", "port")

    def __init__(self, host: str, name: str, namespace: str, port: int = 0) -> None:
        self.host = host
        self.name = name
        self.namespace = namespace
        self.port = port

    @classmethod
    def of(cls, host: str, port: int = 0) -> Service:
        """`reviews.default.svc.cluster.local` -> name `reviews`, namespace `default`; other hosts keep their
        full name and an unknown namespace (Istio's `services[0]` of a ServiceEntry outside Kubernetes)."""
        if not host:
            return UNKNOWN_SERVICE
        parts = host.split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            return cls(host, parts[0], parts[1], port)
        return cls(host, host, "unknown", port)

    @property
    def operation(self) -> str:
        """Istio's span name (decorator) for a whole service: `reviews.default.svc.cluster.local:9080/*`."""
        return f"{self.host}:{self.port}/*"

    def __repr__(self) -> str:
        return f"Service({self.host!r}, {self.name!r}, {self.namespace!r}, {self.port})"


UNKNOWN_SERVICE: Final = Service("unknown", "unknown", "unknown")


MUTUAL_TLS: Final = "mutual_tls"  # connection_security_policy of an inbound mTLS connection
NO_TLS: Final = "none"


def label_values(reporter: str, source: Workload, destination: Workload, service: Service, code: int, flags: str,
                 security: str, protocol: str = "http", grpc_status: str = "", source_principal: str = "",
                 destination_principal: str = "") -> tuple[str, ...]:
    """One series' label values, in LABELS order. Principals (`spiffe://...`, from certificates) replace the
    workloads' own (unknown: peer metadata carries none)."""
    return (
        reporter,
        source.workload, source.canonical_service, source.canonical_revision, source.namespace,
        source_principal or source.principal, source.app, source.version, source.cluster,
        destination.workload, destination.namespace, destination_principal or destination.principal, destination.app,
        destination.version, service.host, destination.canonical_service,
        destination.canonical_revision, service.name, service.namespace,
        destination.cluster,
        protocol, str(code), grpc_status, flags, security,
    )


def tcp_label_values(reporter: str, source: Workload, destination: Workload, service: Service, flags: str,
                     security: str, source_principal: str = "", destination_principal: str = "") -> tuple[str, ...]:
    """One TCP series' label values, in TCP_LABELS order."""
    values = label_values(reporter, source, destination, service, 0, flags, security, TCP_PROTOCOL,
                          source_principal=source_principal, destination_principal=destination_principal)
    return values[:21] + values[23:]


class TcpSeries:
    """Istio's four TCP counters of one label set, updated as bytes move (a scrape sees them at once)."""

    __slots__ = ("labels", "opened", "closed", "sent", "received")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.sent = 0
        self.received = 0


class Series:
    """Counters of one label set: requests, and the three histograms (bucket counts not cumulative)."""

    __slots__ = ("labels", "count", "duration", "duration_sum", "request_bytes", "request_bytes_sum",
                 "response_bytes", "response_bytes_sum", "request_messages", "response_messages", "grpc")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.count = 0
        self.duration = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.request_bytes = [0] * (len(BUCKETS) + 1)
        self.request_bytes_sum = 0
        self.response_bytes = [0] * (len(BUCKETS) + 1)
        self.response_bytes_sum = 0
        self.grpc = labels[LABELS.index("request_protocol")] == "grpc" if len(labels) == len(LABELS) else False
        self.request_messages = 0  # gRPC messages (istio_request_messages_total), gRPC series only
        self.response_messages = 0

    def record(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        """One finished request. Bucket i counts values <= BUCKETS[i] (Prometheus `le`), the last one +Inf."""
        self.count += 1
        self.duration[bisect_left(_DURATION_BOUNDS, duration_ms)] += 1
        self.duration_sum += duration_ms
        self.request_bytes[bisect_left(_BYTES_BOUNDS, request_bytes)] += 1
        self.request_bytes_sum += request_bytes
        self.response_bytes[bisect_left(_BYTES_BOUNDS, response_bytes)] += 1
        self.response_bytes_sum += response_bytes


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for le, n in zip(_LE, counts):
        running += n
        out.append((le, running))
    return out


def _meshproxy_version() -> str:
    """Read at the first scrape: importlib.metadata costs 2 MiB resident that an unscraped proxy never needs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshproxy")
    except PackageNotFoundError:
        return "unknown"


class IstioMetrics:
    """The registry of Istio series; a prometheus-client collector (register it once in the admin registry)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], Series] = {}
        self.tcp: dict[tuple[str, ...], TcpSeries] = {}
        self.build = ""  # meshproxy's version, at the first collect
        self.reused_connection_retries = 0  # the free retries after a reused connection was reset (README)

    def bind(self, labels: tuple[str, ...]) -> Series:
        """The series of a label set, created on first use (two listeners reporting the same set share it)."""
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = Series(labels)
        return series

    def bind_tcp(self, labels: tuple[str, ...]) -> TcpSeries:
        series = self.tcp.get(labels)
        if series is None:
            series = self.tcp[labels] = TcpSeries(labels)
        return series

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("istio_requests", "Counter of requests (Istio standard metric)",
                                       labels=LABELS)
        duration = HistogramMetricFamily("istio_request_duration_milliseconds",
                                         "Duration of requests in milliseconds", labels=LABELS)
        request_bytes = HistogramMetricFamily("istio_request_bytes", "Request body sizes in bytes", labels=LABELS)
        response_bytes = HistogramMetricFamily("istio_response_bytes", "Response body sizes in bytes",
                                               labels=LABELS)
        request_messages = CounterMetricFamily("istio_request_messages", "Counter of gRPC messages from clients",
                                               labels=LABELS)
        response_messages = CounterMetricFamily("istio_response_messages", "Counter of gRPC messages to clients",
                                                labels=LABELS)
        for series in list(self.series.values()):
            labels = list(series.labels)
            requests.add_metric(labels, series.count)
            duration.add_metric(labels, _cumulative(series.duration), series.duration_sum)
            request_bytes.add_metric(labels, _cumulative(series.request_bytes), series.request_bytes_sum)
            response_bytes.add_metric(labels, _cumulative(series.response_bytes), series.response_bytes_sum)
            if series.grpc:
                request_messages.add_metric(labels, series.request_messages)
                response_messages.add_metric(labels, series.response_messages)
        yield requests
        yield duration
        yield request_bytes
        yield response_bytes
        yield request_messages
        yield response_messages
        if self.tcp:
            yield from self._collect_tcp()
        reused = CounterMetricFamily(
            "meshproxy_upstream_reused_connection_retries",
            "Idempotent requests sent once more because their reused keep-alive connection was reset "
            "(not done by Envoy; off with --no-retry-reused-connection)")
        reused.add_metric([], self.reused_connection_retries)
        yield reused
        build = GaugeMetricFamily("istio_build", "Istio component build info", labels=["component", "tag"])
        if not self.build:
            self.build = _meshproxy_version()
        build.add_metric(["proxy", f"meshproxy-{self.build}"], 1)
        yield build

    def _collect_tcp(self) -> Iterator[Metric]:
        opened = CounterMetricFamily("istio_tcp_connections_opened",
                                     "Counter of TCP connections opened (Istio standard metric)", labels=TCP_LABELS)
        closed = CounterMetricFamily("istio_tcp_connections_closed",
                                     "Counter of TCP connections closed (Istio standard metric)", labels=TCP_LABELS)
        sent = CounterMetricFamily("istio_tcp_sent_bytes",
                                   "Bytes sent to the downstream on TCP connections (Istio standard metric)",
                                   labels=TCP_LABELS)
        received = CounterMetricFamily("istio_tcp_received_bytes",
                                       "Bytes received from the downstream on TCP connections (Istio standard metric)",
                                       labels=TCP_LABELS)
        for series in list(self.tcp.values()):
            labels = list(series.labels)
            opened.add_metric(labels, series.opened)
            closed.add_metric(labels, series.closed)
            sent.add_metric(labels, series.sent)
            received.add_metric(labels, series.received)
        yield opened
        yield closed
        yield sent
        yield received

    def describe(self) -> list[Metric]:
        return []
