"""Spans through the OpenTelemetry SDK (in-memory exporter), the OTLP endpoint rules, and the access log line."""

from __future__ import annotations

import io
import json
import random
import re

from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from harness import record, upstream_headers

from meshproxy.http1.head import build_request_head
from meshproxy.stream_info import flag_bits
from meshproxy.routing.cluster import Cluster, Endpoint
from meshproxy.routing.match import CATCH_ALL
from meshproxy.routing.picker import WeightedPicker
from meshproxy.routing.policy import ACTION_ROUTE, Route, RouteDestination
from meshproxy.telemetry.access_log import AccessLog
from meshproxy.telemetry.core import MeshTelemetry, Telemetry
from meshproxy.telemetry.peer import Workload
from meshproxy.telemetry.tracing import (
    DEFAULT_OTLP_ENDPOINT,
    ReportingExporter,
    SpanRecorder,
    describe_endpoint,
    resolve_endpoint,
)

SVC = "reviews.default.svc.cluster.local"
CLUSTER = Cluster(f"outbound|9080||{SVC}", SVC, 9080, "", (Endpoint("127.0.0.1", 15006),))
ROUTE = Route(name="default", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_ROUTE,
              picker=WeightedPicker.compile([(RouteDestination(SVC, "", CLUSTER), 1)]), operation=f"{SVC}:9080/*")
T = "463ac35c9f6413ad48485a3953bb6124"
S = "a2fb4a1d1a96d312"


def recorded(direction: str = "outbound", headers: tuple[tuple[bytes, bytes], ...] = (), status: int = 200,
             flags: tuple[str, ...] = ()) -> tuple[InMemorySpanExporter, dict[bytes, bytes]]:
    exporter = InMemorySpanExporter()
    recorder = SpanRecorder(SimpleSpanProcessor(exporter), "reviews.default")
    mesh = MeshTelemetry(Workload.of("reviews-v2", "default", {"app": "reviews", "version": "v2"}, "Kubernetes"),
                         {"app": "reviews"}, metrics=False, sampling=0, recorder=recorder, rng=random.Random(2))
    telemetry = Telemetry("outbound", direction, AccessLog(), mesh)
    head = build_request_head(b"GET", b"/reviews/0?u=1", [(b"host", b"reviews:9080"), (b"user-agent", b"curl/8"),
                                                          *headers], "1.1", True)
    stream = record(head, b"10.0.0.9")
    sent = upstream_headers(telemetry, stream)
    stream.route, stream.cluster, stream.endpoint = ROUTE, CLUSTER, CLUSTER.endpoints[0]
    stream.status, stream.flags, stream.response_bytes = status, flag_bits(",".join(flags)), 42
    telemetry.on_complete(stream)
    mesh.close()
    return exporter, dict(sent)


def test_a_sampled_client_span_has_envoys_shape_and_istios_tags() -> None:
    exporter, sent = recorded(headers=((b"x-b3-traceid", T.encode()), (b"x-b3-spanid", S.encode()),
                                       (b"x-b3-sampled", b"1"), (b"x-request-id", b"rid-1")))
    [span] = exporter.get_finished_spans()
    assert span.name == f"{SVC}:9080/*" and span.kind == SpanKind.CLIENT
    assert f"{span.context.trace_id:032x}" == T
    assert f"{span.context.span_id:016x}" == sent[b"x-b3-spanid"].decode()  # the id sent upstream
    assert span.parent is not None and f"{span.parent.span_id:016x}" == S and span.parent.is_remote
    assert span.end_time is not None and span.start_time is not None and span.end_time >= span.start_time
    assert span.status.status_code == StatusCode.UNSET
    attrs = dict(span.attributes or {})
    assert attrs == {
        "component": "proxy", "node_id": "sidecar~127.0.0.1~reviews-v2.default~default.svc.cluster.local",
        "zone": "", "istio.canonical_service": "reviews", "istio.canonical_revision": "v2",
        "istio.namespace": "default", "istio.mesh_id": "cluster.local", "istio.cluster_id": "Kubernetes",
        "guid:x-request-id": "rid-1", "http.url": "http://reviews:9080/reviews/0?u=1", "http.method": "GET",
        "http.protocol": "HTTP/1.1", "user_agent": "curl/8", "downstream_cluster": "-", "peer.address": "10.0.0.9",
        "request_size": "0", "response_size": "42", "upstream_cluster": CLUSTER.name,
        "upstream_cluster.name": CLUSTER.name, "http.status_code": "200", "response_flags": "-",
        "upstream_address": "127.0.0.1:15006",
    }
    assert span.resource.attributes["service.name"] == "reviews.default"


def test_a_5xx_is_an_error_span_and_a_server_span_on_inbound() -> None:
    exporter, _ = recorded("inbound", headers=((b"x-b3-flags", b"1"),), status=503, flags=("UF", "URX"))
    [span] = exporter.get_finished_spans()
    assert span.kind == SpanKind.SERVER and span.parent is None  # new trace: a root span
    assert span.status.status_code == StatusCode.ERROR
    attrs = dict(span.attributes or {})
    assert attrs["error"] == "true" and attrs["http.status_code"] == "503" and attrs["response_flags"] == "UF,URX"


def test_no_span_when_the_request_says_not_sampled() -> None:
    exporter, sent = recorded(headers=((b"x-b3-sampled", b"0"),))
    assert exporter.get_finished_spans() == () and sent[b"x-b3-sampled"] == b"0"


def test_64_bit_trace_ids_export_as_the_same_trace() -> None:
    exporter, _ = recorded(headers=((b"x-b3-traceid", T[:16].encode()), (b"x-b3-spanid", S.encode()),
                                    (b"x-b3-sampled", b"1")))
    [span] = exporter.get_finished_spans()
    assert span.context.trace_id == int(T[:16], 16)


def test_otlp_endpoint_precedence() -> None:
    assert resolve_endpoint("http://c:4318/v1/traces", {}) == "http://c:4318/v1/traces"
    assert resolve_endpoint(None, {}) == DEFAULT_OTLP_ENDPOINT == "http://127.0.0.1:4318/v1/traces"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert resolve_endpoint(None, env) is None  # the exporter reads the standard variables itself
    assert describe_endpoint(None, env) == "http://collector:4318/v1/traces"
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://traces:4318/custom"
    assert describe_endpoint(None, env) == "http://traces:4318/custom"


def test_a_failing_collector_is_reported_once_and_recovery_once(caplog) -> None:  # type: ignore[no-untyped-def]
    results = [SpanExportResult.FAILURE] * 3 + [SpanExportResult.SUCCESS] * 2

    class Inner(InMemorySpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            return results.pop(0)

    exporter = ReportingExporter(Inner(), "http://127.0.0.1:1/v1/traces")
    with caplog.at_level("INFO", logger="meshproxy.telemetry"):
        for _ in range(5):
            exporter.export([object()])  # type: ignore[list-item]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed" in m for m in messages) == 1 and sum("works again" in m for m in messages) == 1
    assert exporter.dropped == 3 and exporter.exported == 2 and not exporter.down


# --------------------------------------------------------------------------- access log

ISTIO_TEXT = re.compile(
    r'^\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" '
    r'(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) (?P<termination>\S+) "(?P<transport_failure>[^"]*)" '
    r'(?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) (?P<service_time>\S+) "(?P<xff>[^"]*)" '
    r'"(?P<ua>[^"]*)" "(?P<rid>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream_host>[^"]*)" (?P<cluster>\S+) '
    r'(?P<upstream_local>\S+) (?P<downstream_local>\S+) (?P<downstream_remote>\S+) (?P<sni>\S+) (?P<route>\S+)$')


class _Transport:
    def get_extra_info(self, key: str) -> tuple[str, int]:
        return ("127.0.0.1", 15001) if key == "sockname" else ("127.0.0.1", 40000)


def _logged(fmt: str, status: int, flags: list[str], cluster: Cluster | None, details: str = "") -> str:
    out = io.StringIO()
    log = AccessLog(fmt, out)
    head = build_request_head(b"POST", b"/api/v1/x?y=1", [(b"host", b"reviews:9080"), (b"user-agent", b"curl/8"),
                                                          (b"content-length", b"3")], "1.1", True)
    stream = record(head, transport=_Transport())
    stream.request_id, stream.status, stream.flags, stream.body_size = b"rid-9", status, flag_bits(",".join(flags)), 3
    stream.route, stream.cluster, stream.details = ROUTE, cluster, details
    stream.endpoint = cluster.endpoints[0] if cluster else None
    log.log(stream, "outbound")
    return out.getvalue()


def test_text_access_log_is_istios_default_format() -> None:
    line = _logged("text", 200, [], CLUSTER)
    match = ISTIO_TEXT.match(line.rstrip("\n"))
    assert match, line
    f = match.groupdict()
    assert (f["method"], f["path"], f["protocol"], f["code"], f["flags"], f["details"]) == (
        "POST", "/api/v1/x?y=1", "HTTP/1.1", "200", "-", "via_upstream")
    assert (f["received"], f["rid"], f["authority"], f["upstream_host"], f["cluster"], f["route"]) == (
        "3", "rid-9", "reviews:9080", "127.0.0.1:15006", CLUSTER.name, "default")
    assert (f["downstream_local"], f["downstream_remote"], f["ua"]) == ("127.0.0.1:15001", "127.0.0.1:40000", "curl/8")


def test_access_log_flags_and_details_of_local_replies() -> None:
    refused = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
    f = ISTIO_TEXT.match(_logged("text", 503, ["URX", "UF"], CLUSTER, refused).rstrip("\n"))
    assert f and f["flags"] == "UF,URX" and f["details"] == refused  # Envoy's fixed flag order, whatever came first
    f = ISTIO_TEXT.match(_logged("text", 503, ["FI"], None, "fault_filter_abort").rstrip("\n"))
    assert f and f["details"] == "fault_filter_abort" and f["upstream_host"] == "-" and f["cluster"] == "-"
    entry = json.loads(_logged("json", 404, ["NR"], None, "route_not_found"))
    assert entry["response_flags"] == "NR" and entry["response_code_details"] == "route_not_found"
    istio_json_keys = {"start_time", "route_name", "method", "path", "protocol", "response_code", "response_flags",
                       "response_code_details", "connection_termination_details", "bytes_received", "bytes_sent",
                       "duration", "upstream_service_time", "x_forwarded_for", "user_agent", "request_id",
                       "authority", "upstream_host", "upstream_cluster", "upstream_local_address",
                       "downstream_local_address", "downstream_remote_address", "requested_server_name",
                       "upstream_transport_failure_reason"}
    assert istio_json_keys <= set(entry)
