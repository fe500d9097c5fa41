"""The one object the data path calls for telemetry; telemetry never calls back into the data path.

Hooks, in request order, each given the exchange's record (`StreamInfo`; telemetry never imports the data path):
- `on_request(info) -> headers`: the request head is known. One pass over the headers picks out x-request-id,
  the trace headers and (inbound) the peer metadata into the record; it returns the headers the upstream
  request gets: the request id when it had none and this hop's trace headers. Constant per listener:
  `request_peer_headers`, this workload's peer metadata for an outbound request (withheld from services
  outside the mesh), and `response_extra`, the inbound response's. Incoming headers that are rewritten are
  never forwarded (`strip_request`, read at connection setup).
- `on_response(info, headers)` (outbound, only when `reads_response`): the upstream response head that
  goes downstream; the callee's peer metadata is read and removed before the app sees the response.
- `on_complete(info)`: the exchange is over (response written, or failed): access log, metrics, span.

Costs: with everything off, one pass over the headers for x-request-id. Unsampled requests create no
span objects (the trace headers are rewritten from bytes). Metrics use a series bound once per
(service, peer, response code, flags, peer principal) and cached here (see metrics.py). An inbound request on
a mutual TLS connection reports `connection_security_policy="mutual_tls"` with the client's certificate
identity as `source_principal` and ours as `destination_principal`; plaintext reports `none`.

`MeshTelemetry` is what every listener's `Telemetry` shares, one per process: workload identity, the
Istio metrics registry, the span recorder, the peer metadata encoded once, ids and sampling.
"""

from __future__ import annotations

import atexit
import logging
from collections import deque
import os
import random
import time
from binascii import hexlify
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from ..messages import HeaderBlock, HeaderTemplate, constant_block, template_of
from ..stream_info import NOT_GRPC, StreamInfo, flags_text
from .access_log import AccessLog
from .metrics import (
    DESTINATION,
    MUTUAL_TLS,
    NO_TLS,
    SOURCE,
    UNKNOWN_SERVICE,
    IstioMetrics,
    Series,
    Service,
    label_values,
)
from .peer import (
    DEFAULT_CLUSTER_ID,
    MESH_ID,
    PEER_HEADERS,
    PEER_METADATA,
    PEER_METADATA_ID,
    UNKNOWN_WORKLOAD,
    PeerCache,
    Workload,
    encode_metadata,
    node_id,
)
from .propagation import (
    REQUEST_ID,
    SAMPLED,
    TRACE_HEADERS,
    RequestIds,
    extract,
    inject,
    new_span_id,
    new_trace_id,
    request_id_dice,
    uuid_text,
)

if TYPE_CHECKING:
    from ..routing.cluster import Cluster
    from ..routing.policy import Route
    from ..routing.table import RouteTable
    from ..settings import Settings
    from .tracing import SpanRecorder

log = logging.getLogger("meshproxy.telemetry")

SPIFFE: Final = "spiffe://"  # a principal (`td/ns/x/sa/y`) as Istio's metric labels write it
DEFAULT_SAMPLING: Final = 1.0  # percent: Istio's PILOT_TRACE_SAMPLING default
MAX_SERIES_KEYS: Final = 10000  # per listener; beyond, series are still found (by labels) but not cached here
MAX_URL_TAG: Final = 256  # Envoy's max_path_tag_length default
_IDS: Final = random.Random(int.from_bytes(os.urandom(16), "big"))  # ids when no MeshTelemetry is given
_REQUEST_IDS: Final = RequestIds(_IDS.getrandbits)
# One 320-bit draw for a new request: a UUID4 (top 128 bits: version nibble 4, RFC 4122 variant), a 128-bit
# trace id and a 64-bit span id; the lowest bit of each id is set so that neither can be all zeros.
NEW_TRACE_KEEP: Final = ((1 << 320) - 1) ^ (0xF000 << 256) ^ (0xC000 << 240)
NEW_TRACE_SET: Final = (0x4000 << 256) | (0x8000 << 240) | (1 << 64) | 1
B3_TRACE_ID: Final = b"x-b3-traceid"
B3_SPAN_ID: Final = b"x-b3-spanid"
TRACEPARENT: Final = b"traceparent"
# What the first proxy of a request adds upstream, as one block (messages.HeaderTemplate): with tracing off, and on.
NEW_REQUEST_ID: Final = HeaderTemplate((REQUEST_ID,))
NEW_TRACE: Final = HeaderTemplate((REQUEST_ID, B3_TRACE_ID, B3_SPAN_ID, SAMPLED, TRACEPARENT))
# The console's record of a finished request (meshproxy/console/records.py reads it): one tuple appended to a
# bounded deque, its fields in this order, as the record holds them (times are time.monotonic()); everything
# else (texts, wall-clock times, the route's policy) is worked out when someone looks.
RECENT_FIELDS: Final = ("telemetry", "end", "start", "head", "route", "cluster", "endpoint", "attempts", "status",
                        "flags", "details", "request_id", "trace", "retry_reasons", "body_size", "response_bytes")


class MeshTelemetry:
    """Shared by the listeners of one process. `metrics=False` also turns the peer metadata exchange off;
    `tracing=False` forwards trace headers unchanged and records nothing; `recorder=None` propagates and
    decides sampling but keeps no spans."""

    def __init__(self, own: Workload, labels: Mapping[str, str] | None = None, *, metrics: bool = True,
                 tracing: bool = True, sampling: float = DEFAULT_SAMPLING, recorder: SpanRecorder | None = None,
                 node: str = "", rng: random.Random | None = None, recent: int = 0) -> None:
        """`recent`: how many finished requests the console keeps (0: none, and nothing is done per request)."""
        if not 0.0 <= sampling <= 100.0:
            raise ValueError(f"tracing sampling must be a percentage from 0 to 100, not {sampling}")
        self.own = own
        self.metrics = IstioMetrics() if metrics else None
        self.tracing = tracing
        self.sampling = sampling
        self.threshold = round(sampling * 100)  # out of 10000, as Envoy's random_sampling
        self.recorder = recorder if tracing else None
        self.node_id = node or node_id(own.workload, own.namespace)
        self.randbits = (rng or random.Random(int.from_bytes(os.urandom(16), "big"))).getrandbits
        self.request_ids = RequestIds(self.randbits)
        self.peers = PeerCache()
        self.recent: deque[tuple[Any, ...]] | None = deque(maxlen=recent) if recent > 0 else None
        self.metadata: tuple[tuple[bytes, bytes], ...] = ()
        if metrics:
            self.metadata = ((PEER_METADATA_ID, self.node_id.encode()),
                             (PEER_METADATA, encode_metadata(own, labels or {})))
        self.services: dict[object, Service] = {}
        self.own_principal = ""  # our SPIFFE id (spiffe://...) when the proxy has workload certificates
        self.span_tags = {
            "component": "proxy",
            "node_id": self.node_id,
            "zone": "",
            "istio.canonical_service": own.canonical_service,
            "istio.canonical_revision": own.canonical_revision,
            "istio.namespace": own.namespace,
            "istio.mesh_id": MESH_ID,
            "istio.cluster_id": own.cluster,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> MeshTelemetry:
        labels = dict(settings.labels)
        own = Workload.of(settings.workload, settings.namespace, labels, settings.cluster_id or DEFAULT_CLUSTER_ID)
        gateway = "mesh" not in settings.gateways
        ip = settings.inbound[0].listen[0] if settings.inbound else "127.0.0.1"
        node = node_id(own.workload, own.namespace, ip, gateway)
        recorder = None
        if settings.tracing:
            from .tracing import SpanRecorder, otlp_exporter

            exporter = otlp_exporter(settings.otlp_endpoint)
            service_name = f"{labels.get('app') or own.workload}.{own.namespace}"  # Istio's service cluster
            recorder = SpanRecorder.batched(exporter, service_name, settings.console_spans)
            log.info("tracing: %s%% of new traces sampled (incoming B3/W3C decisions honoured); "
                     "spans by OTLP/HTTP to %s", f"{settings.tracing_sampling:g}", exporter.endpoint)
        else:
            log.info("tracing: off (trace headers are forwarded unchanged)")
        mesh = cls(own, labels, metrics=settings.metrics, tracing=settings.tracing,
                   sampling=settings.tracing_sampling, recorder=recorder, node=node,
                   recent=settings.console_requests)
        if mesh.metrics is not None:
            log.info("metrics: Istio standard metrics at /stats/prometheus as %s.%s (cluster %s)",
                     own.workload, own.namespace, own.cluster)
        else:
            log.info("metrics: off")
        if recorder is not None:
            atexit.register(mesh.close)
        return mesh

    def service(self, host: str, port: int) -> Service:
        """One Service object per (host, port), so series keys compare by identity."""
        key = (host, port)
        service = self.services.get(key)
        if service is None:
            service = self.services[key] = Service.of(host, port)
        return service

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


class Telemetry:
    """One listener's telemetry: the hooks the data path calls (see the module docstring)."""

    __slots__ = ("listener", "direction", "access_log", "strip_request", "mesh", "inbound", "watched", "tracing",
                 "metrics", "request_peer_headers", "response_extra", "reads_response", "randbits", "request_ids",
                 "series", "clusters", "peers", "peer_cache", "table", "address", "seen_table", "service", "operation",
                 "recent")

    def __init__(self, listener: str, direction: str, access_log: AccessLog, mesh: MeshTelemetry | None = None, *,
                 table: Callable[[], RouteTable] | None = None, address: tuple[str, int] | None = None) -> None:
        """`direction` "outbound" reports as source (client side), "inbound" as destination (server side).
        An inbound listener finds its service in `table()` (the mesh's routes): the one whose endpoint is
        `address`, its listen address."""
        self.listener = listener
        self.direction = direction
        self.access_log = access_log
        self.mesh = mesh
        self.inbound = inbound = direction == "inbound"
        self.tracing = mesh is not None and mesh.tracing
        self.metrics = mesh.metrics if mesh is not None else None
        exchange = self.metrics is not None  # the peer metadata exchange exists for the metrics' labels
        strip: set[bytes] = set()
        watched = {REQUEST_ID}
        if self.tracing:
            strip |= TRACE_HEADERS
            watched |= TRACE_HEADERS
        if exchange:
            strip |= PEER_HEADERS  # replaced by this workload's own (outbound), never given to the app (inbound)
            if inbound:
                watched.add(PEER_METADATA)
        self.strip_request: frozenset[bytes] = frozenset(strip)  # incoming headers replaced by upstream_extra/_peer
        self.watched = frozenset(watched)
        metadata = mesh.metadata if mesh is not None and exchange else ()
        self.request_peer_headers: tuple[HeaderBlock, ...] = () if inbound else constant_block(metadata)
        self.response_extra: tuple[HeaderBlock, ...] = constant_block(metadata) if inbound else ()
        self.reads_response = exchange and not inbound
        self.randbits = mesh.randbits if mesh is not None else _IDS.getrandbits
        self.request_ids = mesh.request_ids if mesh is not None else _REQUEST_IDS
        self.series: dict[tuple[Service, Workload, int, int, str, int], Series] = {}
        self.clusters: dict[str, Service] = {}
        self.peer_cache = mesh.peers if mesh is not None else PeerCache()
        self.peers = self.peer_cache.peers  # decoded peers by header value: the hit is a dict lookup here
        self.table = table
        self.address = address
        self.seen_table: object = self  # never a table: the first use resolves
        self.service = UNKNOWN_SERVICE
        self.operation = ""
        self.recent = mesh.recent if mesh is not None else None  # the console's last requests (RECENT_FIELDS)

    # ---- hooks

    def on_request(self, info: StreamInfo) -> list[HeaderBlock]:
        """The request id and trace context into the record; returns the headers to add upstream."""
        found: dict[bytes, bytes] = {}
        watched = self.watched
        for name, value in info.head.headers:
            if name in watched and name not in found:
                found[name] = value
        request_id = found.get(REQUEST_ID)
        if self.response_extra:
            info.peer = found.get(PEER_METADATA)
        if not self.tracing:
            if request_id is None:  # Envoy's UUID request-id extension: generated by the first proxy
                info.request_id = request_id = self.request_ids.next()
                return [(NEW_REQUEST_ID, (request_id,))]
            info.request_id = request_id
            return []
        if request_id is None and len(found) == (PEER_METADATA in found):
            return self._new_trace(info)  # the first proxy of a request: the common edge case
        return self._propagate(info, found, request_id)

    def _new_trace(self, info: StreamInfo) -> list[HeaderBlock]:
        """No request id and no trace headers: request id, trace id and span id from one random draw, and
        the sampling dice from the request id (the first 8 hex digits, as `request_id_dice` reads them)."""
        h = hexlify((self.randbits(320) & NEW_TRACE_KEEP | NEW_TRACE_SET).to_bytes(40, "big"))
        info.request_id = request_id = uuid_text(h)
        trace_id, span_id = h[32:64], h[64:80]
        mesh = self.mesh
        assert mesh is not None
        sampled = int(h[:8], 16) % 10000 < mesh.threshold
        if sampled and mesh.recorder is not None:
            info.trace = (trace_id, span_id, None)
        return [(NEW_TRACE, (request_id, trace_id, span_id, b"1" if sampled else b"0",
                             b"".join((b"00-", trace_id, b"-", span_id, b"-01" if sampled else b"-00"))))]

    def _propagate(self, info: StreamInfo, found: dict[bytes, bytes],
                   request_id: bytes | None) -> list[HeaderBlock]:
        """Continue (or start) the trace the request brought."""
        mesh = self.mesh
        assert mesh is not None
        randbits = self.randbits
        extra: list[tuple[bytes, bytes]] = []
        if request_id is None:
            request_id = self.request_ids.next()
            extra.append((REQUEST_ID, request_id))
        info.request_id = request_id
        trace_id = parent_id = tracestate = None
        sampled = None
        debug = b3_single = False
        if len(found) > (REQUEST_ID in found) + (PEER_METADATA in found):
            incoming = extract(found)
            trace_id, parent_id, sampled = incoming.trace_id, incoming.parent_id, incoming.sampled
            debug, tracestate, b3_single = incoming.debug, incoming.tracestate, incoming.b3_single
        if trace_id is None:
            trace_id = new_trace_id(randbits)
        if sampled is None:  # Envoy's random sampling: the request id's dice, so every hop agrees
            dice = request_id_dice(request_id)
            if dice is None:  # an incoming id that does not start with 8 hex digits
                dice = randbits(32) % 10000
            sampled = dice < mesh.threshold
        span_id = new_span_id(randbits)
        inject(extra, trace_id, span_id, parent_id, sampled, debug, tracestate, b3_single)
        if sampled and mesh.recorder is not None:
            info.trace = (trace_id, span_id, parent_id)
        return [(template_of(tuple([name for name, _ in extra])), tuple([value for _, value in extra]))]

    def on_response(self, info: StreamInfo, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Outbound: the callee's peer metadata, read and removed from the response before the app."""
        found = False
        for name, value in headers:
            if name in PEER_HEADERS:
                found = True
                if name == PEER_METADATA:
                    info.peer = value
        return [(n, v) for n, v in headers if n not in PEER_HEADERS] if found else headers

    def on_complete(self, info: StreamInfo) -> None:
        recent = self.recent
        if recent is not None:  # retry_reasons exists only on a retried request, and flags or attempts say so
            retried = getattr(info, "retry_reasons", None) if info.flags or info.attempts > 1 else None
            recent.append((self, time.monotonic(), info.start, info.head, info.route, info.cluster, info.endpoint,
                           info.attempts, info.status, info.flags, info.details, info.request_id, info.trace, retried,
                           info.body_size, info.response_bytes))
        if self.access_log.enabled:
            self.access_log.log(info, self.listener)
        metrics = self.metrics
        if metrics is None and info.trace is None:
            return
        try:
            if self.inbound:
                table = self.table() if self.table is not None else None
                if table is not self.seen_table:
                    self._resolve(table)
                service = self.service
            else:
                cluster = info.cluster
                known = self.clusters.get(cluster.name) if cluster is not None else None
                service = known if known is not None else self._outbound_service(info)
            if metrics is not None:
                raw = info.peer
                peer = UNKNOWN_WORKLOAD if raw is None else self.peers.get(raw) or self.peer_cache.get(raw)
                principal = info.connection.peer_principal if self.inbound else info.upstream_principal
                key = (service, peer, info.status, info.flags, principal, info.grpc_status)
                series = self.series.get(key) or self._bind(key)
                series.record((time.monotonic() - info.start) * 1000.0, info.body_size, info.response_bytes)
                if info.grpc_status != NOT_GRPC:
                    series.request_messages += info.request_messages
                    series.response_messages += info.response_messages
                if info.reused_retries:
                    metrics.reused_connection_retries += info.reused_retries
            if info.trace is not None:
                self._span(info, service)
        except Exception:  # telemetry must never break the connection it observes
            log.exception("telemetry failed for a request (%s)", self.listener)

    # ---- metrics

    def _outbound_service(self, info: StreamInfo) -> Service:
        cluster = info.cluster
        if cluster is None:  # replied before an upstream was picked (fault, no cluster): the route's first
            cluster = route_cluster(info.route)
            if cluster is None:
                return UNKNOWN_SERVICE
        service = self.clusters.get(cluster.name)
        if service is None:
            assert self.mesh is not None
            service = self.clusters[cluster.name] = self.mesh.service(cluster.service, cluster.port)
        return service

    def _resolve(self, table: RouteTable | None) -> None:
        """Inbound: which service this listener serves, from the mesh's config (Istio's service instances)."""
        mesh = self.mesh
        assert mesh is not None
        self.seen_table = table
        found = services_at(table, self.address) if table is not None and self.address is not None else []
        if found:
            self.service = mesh.service(*found[0])
            self.operation = self.service.operation
        else:  # Istio: the workload's canonical service and namespace
            own = mesh.own
            self.service = mesh.services.setdefault(("", own.canonical_service),
                                                    Service(own.canonical_service, own.canonical_service,
                                                            own.namespace))
            self.operation = ""

    def _bind(self, key: tuple[Service, Workload, int, int, str, int]) -> Series:
        service, peer, status, bits, principal, grpc = key
        flags = flags_text(bits)
        protocol, grpc_status = ("http", "") if grpc == NOT_GRPC else ("grpc", "" if grpc < 0 else str(grpc))
        mesh = self.mesh
        assert mesh is not None and self.metrics is not None
        if self.inbound:  # the callee's sidecar: the source is the peer
            if principal:  # mutual TLS: the client's identity from its certificate, ours from --cert-dir
                labels = label_values(DESTINATION, peer, mesh.own, service, status, flags, MUTUAL_TLS, protocol,
                                      grpc_status, source_principal=SPIFFE + principal,
                                      destination_principal=mesh.own_principal)
            else:
                labels = label_values(DESTINATION, peer, mesh.own, service, status, flags, NO_TLS, protocol,
                                      grpc_status)
        elif principal:  # the upstream's identity from its certificate (Istio's client side reports "unknown")
            labels = label_values(SOURCE, mesh.own, peer, service, status, flags, "unknown", protocol, grpc_status,
                                  source_principal=mesh.own_principal, destination_principal=SPIFFE + principal)
        else:
            labels = label_values(SOURCE, mesh.own, peer, service, status, flags, "unknown", protocol, grpc_status)
        series = self.metrics.bind(labels)
        if len(self.series) < MAX_SERIES_KEYS:
            self.series[key] = series
        return series

    # ---- spans (sampled requests only)

    def _span(self, info: StreamInfo, service: Service) -> None:
        mesh = self.mesh
        assert mesh is not None and mesh.recorder is not None
        assert info.trace is not None
        trace_id, span_id, parent_id = info.trace
        head = info.head
        route = info.route
        if self.inbound:
            name = self.operation or (route.operation if route is not None and route.operation else "ingress")
        elif route is not None and route.operation:
            name = route.operation
        else:
            name = "egress " + head.authority.decode("latin-1")[:MAX_URL_TAG]
        status = info.status
        cluster = info.cluster
        cluster_name = cluster.name if cluster is not None else "-"
        user_agent = head.header(b"user-agent")
        tags = dict(mesh.span_tags)
        tags.update({
            "guid:x-request-id": (info.request_id or b"").decode("latin-1"),
            "http.url": ("http://" + head.authority.decode("latin-1") +
                         head.path_and_query.decode("latin-1"))[:MAX_URL_TAG],
            "http.method": head.method.decode("latin-1"),
            "http.protocol": "HTTP/" + head.version.decode("latin-1"),
            "user_agent": user_agent.decode("latin-1") if user_agent is not None else "-",
            "downstream_cluster": "-",
            "peer.address": info.connection.peer_ip.decode("latin-1"),
            "request_size": str(info.body_size),
            "response_size": str(info.response_bytes),
            "upstream_cluster": cluster_name,
            "upstream_cluster.name": cluster_name,
            "http.status_code": str(status),
            "response_flags": flags_text(info.flags),
        })
        if info.endpoint is not None:
            tags["upstream_address"] = str(info.endpoint)
        if info.grpc_status != NOT_GRPC:  # Envoy's gRPC span tags (Tracing::HttpTracerUtility)
            content_type = head.header(b"content-type")
            tags["grpc.path"] = head.path.decode("latin-1")
            tags["grpc.authority"] = head.authority.decode("latin-1")
            tags["grpc.content_type"] = content_type.decode("latin-1") if content_type is not None else "-"
            if info.grpc_status >= 0:
                tags["grpc.status_code"] = str(info.grpc_status)
        error = status == 0 or status >= 500
        if error:
            tags["error"] = "true"
        end = time.time_ns()
        start = end - int((time.monotonic() - info.start) * 1e9)
        mesh.recorder.record(name, self.inbound, int(trace_id, 16), int(span_id, 16),
                             int(parent_id, 16) if parent_id is not None else None, start, end, tags, error)


def route_cluster(route: Route | None) -> Cluster | None:
    """The cluster a route sends to first (its first weighted destination): the service of a request
    answered before any pick (fault abort), as Envoy knows it from the route entry."""
    if route is None or route.picker is None or not route.picker.choices:
        return None
    return route.picker.choices[0].cluster


def services_at(table: RouteTable, address: tuple[str, int]) -> list[tuple[str, int]]:
    """(service host, service port) of every cluster with an endpoint at `address`, sorted."""
    host, port = address
    any_host = host in ("0.0.0.0", "::", "")
    found: set[tuple[str, int]] = set()
    for vhost in table.virtual_hosts:
        for route in vhost.routes:
            if route.picker is None:
                continue
            for dest in route.picker.choices:
                for cluster in (dest.cluster, *dest.by_port.values()):
                    if cluster is None or not cluster.service:
                        continue
                    for endpoint in cluster.endpoints:
                        if endpoint.port == port and (any_host or endpoint.address == host):
                            found.add((cluster.service, cluster.port))
    return sorted(found)
