"""Telemetry of a small mesh: three sidecars, a real Prometheus, an OTLP/HTTP receiver.

    test (as productpage) ─► A outbound (productpage-v1) ─► B inbound ─► reviews app ─► B outbound (reviews-v2)
                                                     │                                      │
                                                     └─► (ratings, abort fault in A)        └─► C inbound ─► ratings app
                                                     └─► C inbound (ratings-v1) ─► ratings app

Metrics: Prometheus (the Debian package, on loopback, 1 s scrapes, its own storage folder) scrapes the three
admin ports; the PromQL queries are Kiali's (graph/telemetry/istio/istio.go) and must return the mesh's
edges, the fault-injected 503 among them. Spans: every proxy exports OTLP/HTTP protobuf to a receiver here,
decoded with opentelemetry-proto; a three-hop request gives one trace with Envoy's span tree.
"""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from harness import ProxyProcess, Upstream, free_port, write_config

NS = "default"
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
PROPAGATED = ("x-request-id", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
              "traceparent", "tracestate")
WAIT = 30.0  # bound of every wait for spans or Prometheus answers


def service_entry(name: str, port: int, labels: dict[str, str]) -> str:
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name, "namespace": NS},
           "spec": {"hosts": [f"{name}.{NS}.svc.cluster.local"], "location": "MESH_INTERNAL",
                    "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}], "resolution": "STATIC",
                    "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "labels": labels}]}}
    return "---\n" + json.dumps(doc) + "\n"


RATINGS_VS = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
"""


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], Span]] = []
        self.server = Upstream("otlp", handler=self._receive)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource, span))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def of_request(self, request_id: str) -> list[tuple[dict[str, str], Span]]:
        return [(r, s) for r, s in list(self.spans) if attributes(s).get("guid:x-request-id") == request_id]

    def wait_for(self, request_id: str, count: int) -> list[tuple[dict[str, str], Span]]:
        deadline = time.monotonic() + WAIT
        while len(self.of_request(request_id)) < count:
            assert time.monotonic() < deadline, f"{len(self.of_request(request_id))} of {count} spans of {request_id}"
            time.sleep(0.05)
        return self.of_request(request_id)

    def close(self) -> None:
        self.server.close()


def attributes(span: Span) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in span.attributes}


class Prometheus:
    """The real server, on a free loopback port, scraping `targets` every second into its own folder."""

    def __init__(self, folder: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": "meshproxy", "metrics_path": "/stats/prometheus",
                                "static_configs": [{"targets": targets}]}],
        }))
        self.port = free_port()
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + WAIT
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not start:\n" + (folder / "prometheus.log").read_text())
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Mesh:
    def __init__(self, folder: Path) -> None:
        self.otlp = OtlpReceiver()
        self.ratings_app = Upstream("ratings")
        self.b_outbound = 0
        self.reviews_app = Upstream("reviews", handler=self._reviews)
        self.b_inbound, self.c_inbound = free_port(), free_port()
        config = write_config(folder / "config", "mesh.yaml",
                              service_entry("reviews", self.b_inbound, {"app": "reviews", "version": "v2"}),
                              service_entry("ratings", self.c_inbound, {"app": "ratings", "version": "v1"}),
                              RATINGS_VS)
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
        self.proxies: list[ProxyProcess] = []
        self.a = self._proxy(config.parent, env, "productpage-v1", "app=productpage,version=v1",
                             "--otlp-endpoint", f"{self.otlp.base}/v1/traces")
        self.b = self._proxy(config.parent, env, "reviews-v2", "app=reviews,version=v2",
                             "--otlp-endpoint", f"{self.otlp.base}/v1/traces",
                             "--inbound", f"127.0.0.1:{self.b_inbound}=127.0.0.1:{self.reviews_app.port}")
        self.b_outbound = self.b.port
        # C finds its collector through the standard OpenTelemetry variable instead of the flag
        self.c = self._proxy(config.parent, {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp.base}, "ratings-v1",
                             "app=ratings,version=v1",
                             "--inbound", f"127.0.0.1:{self.c_inbound}=127.0.0.1:{self.ratings_app.port}")

    def _proxy(self, config: Path, env: dict[str, str], workload: str, labels: str, *args: str) -> ProxyProcess:
        proxy = ProxyProcess(config, env=env, args=["--workload", workload, "--namespace", NS, "--label", labels,
                                                    "--tracing-sampling", "0", *args])
        self.proxies.append(proxy)
        return proxy

    async def _reviews(self, request: web.Request) -> web.Response:
        """The reviews app: calls ratings through its own sidecar, propagating the trace headers (as Bookinfo)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in PROPAGATED}
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{self.b_outbound}/ratings/0", headers={**headers, "Host": "ratings:9080"}) as resp:
            ratings = await resp.json()
            status = resp.status
        return web.json_response({"ratings_status": status, "ratings_saw": ratings["headers"],
                                  "reviews_saw": [[k, v] for k, v in request.headers.items()]})

    def get(self, host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.a.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def close(self) -> list[int]:
        codes = [proxy.stop() for proxy in self.proxies]
        for server in (self.reviews_app, self.ratings_app):
            server.close()
        self.otlp.close()
        return codes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield m
    finally:
        codes = m.close()
    assert codes == [0, 0, 0], "\n".join(p.log for p in m.proxies)


def by_service(spans: list[tuple[dict[str, str], Span]], service: str, kind: int) -> Span:
    found = [s for r, s in spans if r.get("service.name") == service and s.kind == kind]
    assert len(found) == 1, [(r, s.name, s.kind) for r, s in spans]
    return found[0]


def test_a_three_hop_request_is_one_trace_of_four_linked_spans(mesh: Mesh) -> None:
    status, headers, body = mesh.get("reviews:9080", "/reviews/0", {"x-b3-sampled": "1", "x-request-id": "hop-3"})
    assert status == 200, body
    assert not any(h.startswith("x-envoy-peer-metadata") for h in headers)  # stripped before the app (caller)
    answer = json.loads(body)
    assert answer["ratings_status"] == 200
    reviews_saw = {k.lower(): v for k, v in answer["reviews_saw"]}
    ratings_saw = {k.lower(): v for k, v in answer["ratings_saw"]}
    for saw in (reviews_saw, ratings_saw):  # the peer metadata never reaches an app
        assert not any(k.startswith("x-envoy-peer-metadata") for k in saw)

    spans = mesh.otlp.wait_for("hop-3", 4)
    assert len(spans) == 4
    a_client = by_service(spans, "productpage.default", Span.SPAN_KIND_CLIENT)
    b_server = by_service(spans, "reviews.default", Span.SPAN_KIND_SERVER)
    b_client = by_service(spans, "reviews.default", Span.SPAN_KIND_CLIENT)
    c_server = by_service(spans, "ratings.default", Span.SPAN_KIND_SERVER)
    assert len({s.trace_id for _, s in spans}) == 1 and len({s.span_id for _, s in spans}) == 4
    assert a_client.parent_span_id == b""  # the request started the trace at A
    assert b_server.parent_span_id == a_client.span_id
    assert b_client.parent_span_id == b_server.span_id
    assert c_server.parent_span_id == b_client.span_id
    assert a_client.name == b_server.name == f"{REVIEWS}:9080/*"
    assert b_client.name == c_server.name == f"{RATINGS}:9080/*"
    # what the ratings app received is the context of C's server span
    assert ratings_saw["x-b3-traceid"] == a_client.trace_id.hex()
    assert ratings_saw["x-b3-spanid"] == c_server.span_id.hex()
    assert ratings_saw["x-b3-parentspanid"] == b_client.span_id.hex()
    assert ratings_saw["traceparent"] == f"00-{a_client.trace_id.hex()}-{c_server.span_id.hex()}-01"
    expected_cluster = {id(a_client): f"outbound|9080||{REVIEWS}", id(b_server): f"inbound|{mesh.reviews_app.port}||",
                        id(b_client): f"outbound|9080||{RATINGS}", id(c_server): f"inbound|{mesh.ratings_app.port}||"}
    canonical = {id(a_client): "productpage", id(b_server): "reviews", id(b_client): "reviews",
                 id(c_server): "ratings"}
    for span in (a_client, b_server, b_client, c_server):
        tags = attributes(span)
        assert tags["component"] == "proxy" and tags["guid:x-request-id"] == "hop-3"
        assert tags["http.method"] == "GET" and tags["http.status_code"] == "200" and tags["response_flags"] == "-"
        assert tags["upstream_cluster"] == expected_cluster[id(span)]
        assert tags["istio.canonical_service"] == canonical[id(span)]
        assert tags["node_id"].startswith("sidecar~") and tags["http.url"].startswith("http://")
        assert "error" not in tags and span.status.code == Status.STATUS_CODE_UNSET
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    # one host, one clock: a callee's span starts after its caller's (ends are not ordered: each proxy ends its
    # span when it has written the last byte, and the caller may finish reading before the callee gets there)
    assert a_client.start_time_unix_nano <= b_server.start_time_unix_nano <= b_client.start_time_unix_nano
    assert b_client.start_time_unix_nano <= c_server.start_time_unix_nano


def test_a_fault_abort_is_an_error_span_and_unsampled_requests_send_none(mesh: Mesh) -> None:
    for i in range(20):  # sampling is 0 %: no decision in the request, no span
        assert mesh.get("reviews:9080", "/reviews/0", {"x-request-id": f"quiet-{i}"})[0] == 200
    status, _, _ = mesh.get("ratings:9080", "/ratings/0", {"x-b3-flags": "1", "x-fault": "abort",
                                                          "x-request-id": "abort-1"})
    assert status == 503
    [(resource, span)] = mesh.otlp.wait_for("abort-1", 1)
    tags = attributes(span)
    assert resource["service.name"] == "productpage.default" and span.kind == Span.SPAN_KIND_CLIENT
    assert span.name == f"{RATINGS}:9080/*"
    assert span.status.code == Status.STATUS_CODE_ERROR and tags["error"] == "true"
    assert (tags["http.status_code"], tags["response_flags"]) == ("503", "FI")
    # spans leave each proxy in order, batch after batch: once a sampled request sent after the quiet ones has all
    # its spans here (from every proxy the quiet requests went through), the quiet requests' spans would be too
    assert mesh.get("reviews:9080", "/reviews/0", {"x-b3-sampled": "1", "x-request-id": "barrier-1"})[0] == 200
    mesh.otlp.wait_for("barrier-1", 4)
    assert not [s for _, s in mesh.otlp.spans if attributes(s).get("guid:x-request-id", "").startswith("quiet-")]


KIALI_GROUP_BY = ("source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
                  "source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,"
                  "destination_service_name,destination_workload_namespace,destination_workload,"
                  "destination_canonical_service,destination_canonical_revision,request_protocol,response_code,"
                  "grpc_response_status,response_flags")
# Kiali's "missing expected TS labels" check (populateTrafficMap): a series without any of these is dropped.
KIALI_REQUIRED = ("source_workload_namespace", "source_workload", "source_canonical_service",
                  "source_canonical_revision", "destination_service_namespace", "destination_service",
                  "destination_service_name", "destination_workload_namespace", "destination_workload",
                  "destination_canonical_service", "destination_canonical_revision", "response_flags",
                  "request_protocol", "response_code")


def kiali_edges(prometheus: Prometheus, query: str) -> set[tuple[str, str, str, str, str]]:
    edges = set()
    for item in prometheus.query(query):
        metric = item["metric"]
        missing = [label for label in KIALI_REQUIRED if not metric.get(label)]
        assert not missing, (missing, metric)
        assert float(item["value"][1]) > 0
        edges.add((metric["source_workload"], metric["destination_workload"], metric["destination_service_name"],
                   metric["response_code"], metric["response_flags"]))
    return edges


def test_prometheus_scrapes_the_edges_kiali_draws(mesh: Mesh, tmp_path: Path) -> None:
    prometheus = Prometheus(tmp_path / "prometheus", [p.admin.removeprefix("http://") for p in mesh.proxies])
    window = "30s"
    # Kiali's namespace graph queries (buildNamespaceTrafficMap): 2) destination-reported, 3) source-reported
    destination_query = (f'sum(rate(istio_requests_total{{reporter="destination",destination_workload_namespace='
                         f'"{NS}"}}[{window}])) by ({KIALI_GROUP_BY}) > 0')
    source_query = (f'sum(rate(istio_requests_total{{reporter="source",source_workload_namespace="{NS}"}}'
                    f'[{window}])) by ({KIALI_GROUP_BY}) > 0')
    expected_destination = {
        ("productpage-v1", "reviews-v2", "reviews", "200", "-"),
        ("reviews-v2", "ratings-v1", "ratings", "200", "-"),
        ("productpage-v1", "ratings-v1", "ratings", "200", "-"),
    }
    expected_source = expected_destination | {("productpage-v1", "unknown", "ratings", "503", "FI")}  # red edge
    got_destination: set[tuple[str, ...]] = set()
    got_source: set[tuple[str, ...]] = set()
    try:
        deadline = time.monotonic() + WAIT
        while True:  # traffic keeps flowing so that rates stay above zero between scrapes
            assert mesh.get("reviews:9080", "/reviews/0")[0] == 200
            assert mesh.get("ratings:9080", "/ratings/0")[0] == 200
            assert mesh.get("ratings:9080", "/ratings/0", {"x-fault": "abort"})[0] == 503
            got_destination = kiali_edges(prometheus, destination_query)
            got_source = kiali_edges(prometheus, source_query)
            if got_destination == expected_destination and got_source == expected_source:
                break
            assert time.monotonic() < deadline, (got_destination, got_source)
            time.sleep(0.5)
        # the scrape found all three proxies, and their own health figures
        assert {item["metric"]["instance"] for item in prometheus.query('up{job="meshproxy"} == 1')} == {
            p.admin.removeprefix("http://") for p in mesh.proxies}
        assert prometheus.query('sum(meshproxy_config_reloads_total{result="accepted"}) >= 0')
        assert len(prometheus.query("meshproxy_downstream_connections")) == 5  # 3 outbound + 2 inbound listeners
        # Kiali's response-time appender: a quantile per edge from the duration histogram
        quantiles = prometheus.query(
            f'histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{{reporter="destination",'
            f'destination_workload_namespace="{NS}"}}[{window}])) by (le,source_workload,destination_workload))')
        assert {(q["metric"]["source_workload"], q["metric"]["destination_workload"]) for q in quantiles} == {
            ("productpage-v1", "reviews-v2"), ("reviews-v2", "ratings-v1"), ("productpage-v1", "ratings-v1")}
        assert all(0 < float(q["value"][1]) <= 1000 for q in quantiles)
        # Kiali's throughput appender reads the byte histograms' sums
        assert prometheus.query(f'sum(rate(istio_response_bytes_sum{{reporter="destination"}}[{window}])) > 0')
        # the edge colour: the share of 5xx on productpage -> ratings, as seen by the caller
        [errors] = prometheus.query(
            f'sum(rate(istio_requests_total{{reporter="source",source_workload="productpage-v1",'
            f'destination_service_name="ratings",response_code=~"5.."}}[{window}])) / '
            f'sum(rate(istio_requests_total{{reporter="source",source_workload="productpage-v1",'
            f'destination_service_name="ratings"}}[{window}]))')
        assert 0.2 < float(errors["value"][1]) < 0.8
    finally:
        prometheus.stop()


def test_series_stay_bounded_whatever_the_paths(mesh: Mesh) -> None:
    def count() -> int:
        with urllib.request.urlopen(mesh.a.admin + "/stats/prometheus", timeout=5) as resp:
            return sum(line.startswith("istio_requests_total{") for line in resp.read().decode().splitlines())

    for i in range(3):  # every edge and code already seen once
        mesh.get("reviews:9080", f"/reviews/{i}")
    before = count()
    for i in range(50):
        assert mesh.get("reviews:9080", f"/reviews/{i}?user=u{i}", {"x-request-id": f"r{i}"})[0] == 200
    assert count() == before

