"""Telemetry of one real proxy process: start-up report, a collector that is down, everything off."""

from __future__ import annotations

import http.client
import time
import urllib.request
from pathlib import Path

from harness import ProxyProcess, Upstream, free_port, service_entry, write_config

T = "463ac35c9f6413ad48485a3953bb6124"
S = "a2fb4a1d1a96d312"


def get(port: int, headers: dict[str, str] | None = None, path: str = "/echo") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "backend", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def scrape(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


def config(tmp_path: Path, upstream: Upstream) -> Path:
    return write_config(tmp_path / "config", "backend.yaml", service_entry("backend", [(upstream.port, {})], port=80,
                                                                          location="MESH_INTERNAL"))


def test_defaults_are_printed_at_start_up_and_metrics_count(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyProcess(config(tmp_path, upstream).parent, args=["--workload", "web-v1", "--label", "app=web"])
    try:
        assert "tracing: 1% of new traces sampled" in proxy.log
        assert "spans by OTLP/HTTP to http://127.0.0.1:4318/v1/traces" in proxy.log
        assert "metrics: Istio standard metrics at /stats/prometheus as web-v1.default (cluster Kubernetes)" in proxy.log
        for _ in range(3):
            assert get(proxy.port) == 200
        assert get(proxy.port, path="/status/503") == 503
        text = scrape(proxy)
        assert 'response_code="200"' in text and 'source_workload="web-v1"' in text
        ok = [line for line in text.splitlines() if line.startswith("istio_requests_total{")
              and 'response_code="200"' in line]
        assert len(ok) == 1 and ok[0].endswith(" 3.0")
        assert any('response_code="503"' in line for line in text.splitlines()
                   if line.startswith("istio_requests_total{"))
    finally:
        assert proxy.stop() == 0, proxy.log


def test_a_collector_that_is_down_loses_spans_never_requests(tmp_path: Path, upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    # OTEL_EXPORTER_OTLP_TIMEOUT (honoured as the SDK does) bounds the exporter's retries: the failure shows sooner
    proxy = ProxyProcess(config(tmp_path, upstream).parent,
                         env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"},
                         args=["--tracing-sampling", "100", "--otlp-endpoint", dead])
    try:
        start = time.monotonic()
        for _ in range(100):
            assert get(proxy.port) == 200
        assert time.monotonic() - start < 10
        deadline = time.monotonic() + 20
        while "span export to" not in proxy.log:
            assert time.monotonic() < deadline, proxy.log
            time.sleep(0.05)
        for _ in range(20):
            assert get(proxy.port) == 200
        assert proxy.log.count("span export to") == 1, proxy.log  # said once, not per batch
        assert "Traceback" not in proxy.log
    finally:
        stopped = time.monotonic()
        assert proxy.stop() == 0, proxy.log
        assert time.monotonic() - stopped < 8  # queued spans do not hold the exit


def test_everything_off_forwards_trace_headers_and_adds_nothing(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyProcess(config(tmp_path, upstream).parent, args=["--no-tracing", "--no-metrics"])
    try:
        assert "tracing: off" in proxy.log and "metrics: off" in proxy.log
        sent = {"x-b3-traceid": T, "x-b3-spanid": S, "x-b3-sampled": "1", "traceparent": f"00-{T}-{S}-01",
                "x-envoy-peer-metadata": "from-the-app"}
        assert get(proxy.port, sent) == 200
        for name, value in sent.items():
            assert upstream.header_values(-1, name) == [value]
        assert len(upstream.header_values(-1, "x-request-id")) == 1
        assert "x-b3-parentspanid" not in {k.decode().lower() for k, _ in upstream.requests[-1]["headers"]}
        assert "istio_requests_total" not in scrape(proxy)
        assert "meshproxy_downstream_connections" in scrape(proxy)  # the proxy's own health figures stay
    finally:
        assert proxy.stop() == 0, proxy.log


def test_the_outbound_replaces_what_the_app_sent_as_trace_and_peer_headers(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyProcess(config(tmp_path, upstream).parent, args=["--workload", "web-v1"])
    try:
        assert get(proxy.port, {"x-b3-traceid": T, "x-b3-spanid": S, "x-b3-sampled": "0",
                                "x-envoy-peer-metadata": "spoofed", "x-envoy-peer-metadata-id": "spoofed"}) == 200
        assert upstream.header_values(-1, "x-b3-traceid") == [T]
        assert upstream.header_values(-1, "x-b3-parentspanid") == [S]
        [span] = upstream.header_values(-1, "x-b3-spanid")
        assert span != S
        assert upstream.header_values(-1, "x-b3-sampled") == ["0"]
        [metadata] = upstream.header_values(-1, "x-envoy-peer-metadata")
        assert metadata != "spoofed"
        assert upstream.header_values(-1, "x-envoy-peer-metadata-id") == [
            "sidecar~127.0.0.1~web-v1.default~default.svc.cluster.local"]
    finally:
        assert proxy.stop() == 0, proxy.log
