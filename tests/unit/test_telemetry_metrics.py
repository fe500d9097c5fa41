"""Istio standard metrics: names, the 25 labels, Envoy's buckets, both reporters, peer metadata, bounded series."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from harness import record, upstream_headers

from meshproxy.http1.head import build_request_head
from meshproxy.istio.load import load
from meshproxy.messages import block_pairs
from meshproxy.stream_info import StreamInfo, flag_bits
from meshproxy.routing.cluster import Cluster, Endpoint
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.table import RouteTable
from meshproxy.telemetry.access_log import AccessLog
from meshproxy.telemetry.core import MeshTelemetry, Telemetry, route_cluster, services_at
from meshproxy.telemetry.metrics import BUCKETS, LABELS, IstioMetrics, Series
from meshproxy.telemetry.peer import (
    MAX_PEERS,
    PEER_METADATA,
    PEER_METADATA_ID,
    UNKNOWN_WORKLOAD,
    PeerCache,
    Workload,
    decode_metadata,
    encode_metadata,
)

# shared/research/telemetry.md section 2: every HTTP series carries these 25 labels.
ISTIO_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster", "destination_workload",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster", "request_protocol",
    "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
}
PRODUCTPAGE = {"app": "productpage", "version": "v1"}
REVIEWS = {"app": "reviews", "version": "v2"}
REVIEWS_SVC = "reviews.default.svc.cluster.local"
CONFIG = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS_SVC}]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: 15006}}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: 15016}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings]
  http:
  - fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ratings}}}}]
"""


def shared(workload: str, labels: dict[str, str], **kw: Any) -> MeshTelemetry:
    return MeshTelemetry(Workload.of(workload, "default", labels, "Kubernetes"), labels, tracing=False,
                         rng=random.Random(1), **kw)


def table(tmp_path: Path) -> RouteTable:
    path = tmp_path / "mesh.yaml"
    path.write_text(CONFIG)
    result, _ = compile_table(load([path]).snapshot, Identity())
    return result


def stream(path: bytes = b"/", headers: tuple[tuple[bytes, bytes], ...] = (), host: bytes = b"reviews:9080") -> StreamInfo:
    head = build_request_head(b"GET", path, [(b"host", host), *headers], "1.1", True)
    return record(head)


def series(mesh: MeshTelemetry) -> list[dict[str, str]]:
    """The istio_requests_total samples as scraped: label dicts plus the value under 'value'."""
    registry = CollectorRegistry(auto_describe=False)
    assert mesh.metrics is not None
    registry.register(mesh.metrics)  # type: ignore[arg-type]
    out = []
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == "istio_requests":
            for sample in family.samples:
                if sample.name == "istio_requests_total":
                    out.append({**sample.labels, "value": str(int(sample.value))})
    return out


REVIEWS_V2 = Cluster("outbound|9080|v2|" + REVIEWS_SVC, REVIEWS_SVC, 9080, "v2", (Endpoint("127.0.0.1", 15006),))


def test_label_names_are_istios_25() -> None:
    assert len(LABELS) == 25 and set(LABELS) == ISTIO_LABELS


def test_buckets_are_envoys_defaults_with_le_semantics() -> None:
    assert BUCKETS == (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
                       1800000, 3600000)
    s = Series(("x",) * 25)
    for value in (0.5, 0.51, 1, 3600000, 3600001):
        s.record(value, 0, 0)
    assert s.duration[0] == 1 and s.duration[1] == 2 and s.duration[len(BUCKETS) - 1] == 1
    assert s.duration[len(BUCKETS)] == 1  # +Inf
    assert s.count == 5 and s.request_bytes[0] == 5
    b = Series(("x",) * 25)
    for size in (0, 1, 2, 5, 6, 3600000, 3600001):  # whole bytes: le=0.5 holds only 0
        b.record(1.0, size, size)
    assert b.request_bytes[:4] == [1, 1, 2, 1] and b.response_bytes[len(BUCKETS) - 1:] == [1, 1]


def test_exposition_names_types_and_buckets() -> None:
    metrics = IstioMetrics()
    metrics.bind(tuple(f"v{i}" for i in range(25))).record(3.0, 100, 2000)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert "# TYPE istio_requests_total counter" in text
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert f"# TYPE {name} histogram" in text
        assert text.count(f"{name}_bucket{{") == len(BUCKETS) + 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    duration = families["istio_request_duration_milliseconds"]
    buckets = {s.labels["le"]: s.value for s in duration.samples if s.name.endswith("_bucket")}
    assert buckets["1.0"] == 0 and buckets["5.0"] == 1 and buckets["+Inf"] == 1
    assert [float(le) for le in buckets if le != "+Inf"] == [float(b) for b in BUCKETS]
    assert 'istio_build{component="proxy"' in text


def test_source_reporter_labels_with_the_destination_from_response_metadata() -> None:
    mesh = shared("productpage-v1", PRODUCTPAGE)
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh)
    callee = encode_metadata(Workload.of("reviews-v2", "default", REVIEWS, "Kubernetes"), REVIEWS)
    s = stream(b"/reviews/0")
    sent = upstream_headers(telemetry, s)
    assert dict(sent)[PEER_METADATA] == mesh.metadata[1][1]  # this workload's metadata goes upstream
    s.cluster = REVIEWS_V2
    headers = [(b"content-type", b"text/plain"), (PEER_METADATA_ID, b"sidecar~x"), (PEER_METADATA, callee)]
    assert telemetry.reads_response
    assert telemetry.on_response(s, headers) == [(b"content-type", b"text/plain")]  # not given to the app
    s.status, s.response_bytes = 200, 1234
    telemetry.on_complete(s)
    [got] = series(mesh)
    assert got == {
        "reporter": "source", "source_workload": "productpage-v1", "source_workload_namespace": "default",
        "source_principal": "unknown", "source_app": "productpage", "source_version": "v1",
        "source_canonical_service": "productpage", "source_canonical_revision": "v1", "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v2", "destination_workload_namespace": "default",
        "destination_principal": "unknown", "destination_app": "reviews", "destination_version": "v2",
        "destination_service": REVIEWS_SVC, "destination_service_name": "reviews",
        "destination_service_namespace": "default", "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2", "destination_cluster": "Kubernetes", "request_protocol": "http",
        "response_code": "200", "grpc_response_status": "", "response_flags": "-",
        "connection_security_policy": "unknown", "value": "1",
    }


def test_destination_reporter_labels_with_the_source_from_request_metadata(tmp_path: Path) -> None:
    routes = table(tmp_path)
    mesh = shared("reviews-v2", REVIEWS)
    telemetry = Telemetry("inbound:9080", "inbound", AccessLog(), mesh, table=lambda: routes,
                          address=("127.0.0.1", 15006))
    caller = encode_metadata(Workload.of("productpage-v1", "default", PRODUCTPAGE, "Kubernetes"), PRODUCTPAGE)
    assert PEER_METADATA in telemetry.strip_request and PEER_METADATA_ID in telemetry.strip_request  # not to the app
    s = stream(b"/reviews/0", ((PEER_METADATA_ID, b"sidecar~x"), (PEER_METADATA, caller)))
    sent = upstream_headers(telemetry, s)
    assert PEER_METADATA not in dict(sent)
    assert dict(block_pairs(telemetry.response_extra))[PEER_METADATA] == mesh.metadata[1][1]  # the caller learns who answered
    assert not telemetry.reads_response
    s.status = 200
    telemetry.on_complete(s)
    [got] = series(mesh)
    assert (got["reporter"], got["source_workload"], got["source_app"], got["source_version"]) == (
        "destination", "productpage-v1", "productpage", "v1")
    assert (got["destination_workload"], got["destination_canonical_revision"], got["destination_service"],
            got["destination_service_name"], got["destination_service_namespace"]) == (
        "reviews-v2", "v2", REVIEWS_SVC, "reviews", "default")
    assert got["connection_security_policy"] == "none"


def test_inbound_service_is_found_from_the_endpoint_address(tmp_path: Path) -> None:
    routes = table(tmp_path)
    assert services_at(routes, ("127.0.0.1", 15006)) == [(REVIEWS_SVC, 9080)]
    assert services_at(routes, ("0.0.0.0", 15016)) == [("ratings.default.svc.cluster.local", 9080)]
    assert services_at(routes, ("127.0.0.1", 1)) == []


def test_inbound_without_a_service_reports_its_canonical_name_and_unknown_source(tmp_path: Path) -> None:
    routes = table(tmp_path)
    mesh = shared("details-v1", {"app": "details", "version": "v1"})
    telemetry = Telemetry("inbound:9080", "inbound", AccessLog(), mesh, table=lambda: routes,
                          address=("127.0.0.1", 9))
    s = stream()
    upstream_headers(telemetry, s)
    s.status = 200
    telemetry.on_complete(s)
    [got] = series(mesh)
    assert (got["destination_service"], got["destination_service_name"], got["destination_service_namespace"]) == (
        "details", "details", "default")
    assert got["source_workload"] == "unknown" and got["source_canonical_revision"] == "unknown"


def test_a_fault_abort_before_any_pick_reports_the_routes_service(tmp_path: Path) -> None:
    routes = table(tmp_path)
    route, _ = routes.match(build_request_head(b"GET", b"/", [(b"host", b"ratings")], "1.1", True))
    assert route is not None and route_cluster(route) is not None
    mesh = shared("productpage-v1", PRODUCTPAGE)
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh)
    s = stream(host=b"ratings")
    upstream_headers(telemetry, s)
    s.route, s.status, s.flags = route, 503, flag_bits("FI")
    telemetry.on_complete(s)
    [got] = series(mesh)
    assert (got["destination_service"], got["destination_workload"], got["response_code"], got["response_flags"]) == (
        "ratings.default.svc.cluster.local", "unknown", "503", "FI")


def test_no_route_is_unknown_service_404_NR() -> None:
    mesh = shared("productpage-v1", PRODUCTPAGE)
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh)
    s = stream(host=b"nowhere.example.com")
    upstream_headers(telemetry, s)
    s.status, s.flags = 404, flag_bits("NR")
    telemetry.on_complete(s)
    [got] = series(mesh)
    assert (got["destination_service"], got["destination_service_name"], got["response_code"],
            got["response_flags"]) == ("unknown", "unknown", "404", "NR")


def test_paths_ids_and_hosts_of_requests_never_make_series() -> None:
    mesh = shared("productpage-v1", PRODUCTPAGE)
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh)
    for i in range(2000):
        s = stream(f"/reviews/{i}?user={i}".encode(), ((b"x-request-id", f"id-{i}".encode()),),
                   host=f"reviews-{i % 7}:9080".encode())
        upstream_headers(telemetry, s)
        s.cluster, s.status = REVIEWS_V2, 200
        telemetry.on_complete(s)
    [got] = series(mesh)
    assert got["value"] == "2000"
    assert len(telemetry.series) == 1


def test_made_up_peer_metadata_cannot_grow_the_series(tmp_path: Path) -> None:
    routes = table(tmp_path)
    mesh = shared("reviews-v2", REVIEWS)
    telemetry = Telemetry("inbound:9080", "inbound", AccessLog(), mesh, table=lambda: routes,
                          address=("127.0.0.1", 15006))
    for i in range(3 * MAX_PEERS):
        fake = encode_metadata(Workload.of(f"attacker-{i}", "default", {}, "x"), {})
        for value in (fake, b"junk-%d" % i):
            s = stream(headers=((PEER_METADATA, value),))
            upstream_headers(telemetry, s)
            s.status = 200
            telemetry.on_complete(s)
    assert len(mesh.peers.peers) == MAX_PEERS
    assert len(series(mesh)) <= MAX_PEERS + 1  # the first distinct peers, then all unknown


def test_metrics_off_exchanges_no_metadata_and_counts_nothing() -> None:
    mesh = shared("productpage-v1", PRODUCTPAGE, metrics=False)
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh)
    assert mesh.metrics is None and not telemetry.reads_response
    assert PEER_METADATA not in telemetry.strip_request
    s = stream()
    sent = upstream_headers(telemetry, s)
    assert [name for name, _ in sent] == [b"x-request-id"]
    s.status = 200
    telemetry.on_complete(s)


def test_peer_metadata_round_trip_and_istio_encoding() -> None:
    labels = {"app": "reviews", "version": "v2", "pod-template-hash": "abc"}
    own = Workload.of("reviews-v2", "default", labels, "cluster-1")
    peer = decode_metadata(encode_metadata(own, labels))
    assert peer is not None
    assert (peer.workload, peer.namespace, peer.app, peer.version, peer.canonical_service, peer.canonical_revision,
            peer.cluster) == ("reviews-v2", "default", "reviews", "v2", "reviews", "v2", "cluster-1")
    # As an Envoy sidecar of Istio sends it: more fields, canonical labels from the injector.
    struct = struct_pb2.Struct()
    struct.update({"NAME": "ratings-v1-5d9c8b7f4-x2x7q", "NAMESPACE": "bookinfo", "WORKLOAD_NAME": "ratings-v1",
                   "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local", "APP_CONTAINERS": "ratings",
                   "INSTANCE_IPS": "10.0.0.7", "PLATFORM_METADATA": {}, "ISTIO_VERSION": "1.24.0",
                   "LABELS": {"app": "ratings", "version": "v1", "service.istio.io/canonical-name": "ratings-svc",
                              "service.istio.io/canonical-revision": "v1.0"}})
    peer = decode_metadata(base64.b64encode(struct.SerializeToString()))
    assert peer is not None
    assert (peer.workload, peer.namespace, peer.canonical_service, peer.canonical_revision) == (
        "ratings-v1", "bookinfo", "ratings-svc", "v1.0")


@pytest.mark.parametrize("value", [b"", b"!!!", b"aGVsbG8=", base64.b64encode(b"\xff\x00garbage"),
                                   base64.b64encode(struct_pb2.Struct().SerializeToString()), b"A" * 20000])
def test_malformed_peer_metadata_is_an_unknown_peer(value: bytes) -> None:
    assert decode_metadata(value) is None
    assert PeerCache().get(value) is UNKNOWN_WORKLOAD


def test_canonical_names_follow_istio_label_precedence() -> None:
    w = Workload.of("web-1", "ns", {"app.kubernetes.io/name": "web", "app": "ignored",
                                     "app.kubernetes.io/version": "2"}, "c")
    assert (w.canonical_service, w.canonical_revision, w.app, w.version) == ("web", "2", "ignored", "unknown")
    w = Workload.of("job-7", "ns", {}, "c")
    assert (w.canonical_service, w.canonical_revision) == ("job-7", "latest")
