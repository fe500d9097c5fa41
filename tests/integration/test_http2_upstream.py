"""HTTP/2 to upstreams (hypercorn, h2c): chosen per cluster as Istio chooses it, streams multiplexed over few
connections within the DestinationRule's limits, translation from HTTP/1.1 clients and back, trailers, resets."""

from __future__ import annotations

import http.client
import json
import re
import time
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from h2peer import H2Peer, H2Server
from h2upstream import H2Upstream
from harness import BACKEND_VS, PeakRss, ProxyProcess, write_config
from waiting import wait_until

H2LOAD = shutil.which("h2load")


def service_entry(port: int, protocol: str = "HTTP2", name: str = "web") -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: {name}, protocol: {protocol}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{{name}: {port}}}}}]
"""


def destination_rule(http: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend}}
spec:
  host: backend
  trafficPolicy:
    connectionPool:
      http: {{{http}}}
"""


@pytest.fixture
def h2_upstream() -> Iterator[H2Upstream]:
    server = H2Upstream()
    yield server
    server.close()


def start_proxy(tmp_path: Path, *docs: str) -> ProxyProcess:
    return ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", *docs, BACKEND_VS))


def get(port: int, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Host": "backend", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


@pytest.mark.parametrize(("protocol", "name"), [("HTTP2", "web"), ("GRPC", "api"), ("", "grpc-api"),
                                                 ("", "http2")])
def test_http2_ports_get_http2_upstream_from_an_http1_client(tmp_path: Path, h2_upstream: H2Upstream,
                                                              protocol: str, name: str) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port, protocol, name))
    try:
        status, headers, body = get(proxy.port, "/echo", {"Connection": "keep-alive, x-hop", "X-Hop": "1",
                                                           "Keep-Alive": "timeout=5", "TE": "trailers",
                                                           "X-Kept": "yes"})
        assert status == 200 and headers["x-upstream"] == "h2-backend"
        seen = json.loads(body)
        assert seen["http_version"] == "2"
        names = [n for n, _ in seen["headers"]]
        assert ["host", "backend"] in seen["headers"]  # :authority, from the client's Host
        assert "x-hop" not in names and "keep-alive" not in names and "connection" not in names
        assert ["te", "trailers"] in seen["headers"] and ["x-kept", "yes"] in seen["headers"]
        status, _, body = get(proxy.port, "/echo", body=b"z" * 3_000_000, method="POST")  # content-length body
        assert status == 200 and json.loads(body)["body_size"] == 3_000_000
        status, headers, body = get(proxy.port, "/bytes?size=5000000")  # no length upstream: chunked to HTTP/1.1
        assert status == 200 and len(body) == 5_000_000 and headers.get("transfer-encoding") == "chunked"
        assert len(h2_upstream.clients) == 1  # one connection carried all three
    finally:
        proxy.stop()


def test_an_http_port_stays_http1_unless_the_rule_says_upgrade(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port, "HTTP", "http"))
    try:
        assert json.loads(get(proxy.port, "/echo")[2])["http_version"] == "1.1"
        write_config(tmp_path / "cfg", "c.yaml", service_entry(h2_upstream.port, "HTTP", "http"),
                     destination_rule("h2UpgradePolicy: UPGRADE"), BACKEND_VS)
        wait_until(lambda: json.loads(get(proxy.port, "/echo")[2])["http_version"] == "2",
                   what="the reload to upgrade the cluster")
    finally:
        proxy.stop()


def test_trailers_from_an_http2_upstream_reach_an_http2_client(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port))
    peer = H2Peer(proxy.port)
    try:
        got = peer.finished(peer.request("/trailers", headers=[("te", "trailers")]))
        assert got.status == 200 and bytes(got.body) == b"with trailers"
        assert got.trailers == [(b"x-result", b"done")]
        status, _, body = get(proxy.port, "/trailers")  # an HTTP/1.1 client: the body, trailers dropped (Envoy)
        assert status == 200 and body == b"with trailers"
    finally:
        peer.close()
        proxy.stop()


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) is not installed")
def test_many_streams_multiplexed_on_few_upstream_connections(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port))
    try:
        result = subprocess.run([H2LOAD, "-n", "300", "-c", "3", "-m", "40", "-H", ":authority: backend",
                                 f"http://127.0.0.1:{proxy.port}/slow?delay=0.05"],
                                capture_output=True, text=True, timeout=120)
        assert re.search(r"requests: 300 total, 300 started, 300 done, 300 succeeded, 0 failed", result.stdout), \
            result.stdout
        assert len(h2_upstream.requests) == 300
        assert len(h2_upstream.clients) <= 3  # streams share connections (one per endpoint, but for races)
    finally:
        proxy.stop()


def test_max_concurrent_streams_and_requests_per_connection(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port),
                        destination_rule("maxRequestsPerConnection: 2, maxConcurrentStreams: 2"))
    try:
        for _ in range(5):
            assert get(proxy.port, "/echo")[0] == 200
        assert len(h2_upstream.clients) == 3  # 2 + 2 + 1
        before = len(h2_upstream.clients)
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: get(proxy.port, "/slow?delay=0.5")[0], range(6)))
        assert statuses == [200] * 6
        assert len(h2_upstream.clients) - before >= 3  # at most 2 streams (and 2 requests) per connection
    finally:
        proxy.stop()


def test_http2_max_requests_is_the_circuit_breaker(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port), destination_rule("http2MaxRequests: 1"))
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(get, proxy.port, "/slow?delay=1")
            wait_until(lambda: len(h2_upstream.requests) == 1, what="the first request upstream")
            status, headers, _ = get(proxy.port, "/echo")
            assert status == 503 and headers["x-envoy-overloaded"] == "true"
            assert slow.result()[0] == 200
        flags = sorted(e["response_flags"] for e in proxy.access_entries(2))
        assert flags == ["-", "UO"]
    finally:
        proxy.stop()


def upstream_connections(proxy: ProxyProcess, port: int) -> int:
    return sum(1 for c in psutil.Process(proxy.proc.pid).net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_idle_upstream_connections_close_after_the_idle_timeout(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port), destination_rule("idleTimeout: 0.5s"))
    try:
        assert get(proxy.port, "/echo")[0] == 200
        assert upstream_connections(proxy, h2_upstream.port) == 1
        wait_until(lambda: upstream_connections(proxy, h2_upstream.port) == 0, what="the idle connection closed")
        assert get(proxy.port, "/echo")[0] == 200  # a new one
        assert len(h2_upstream.clients) == 2
    finally:
        proxy.stop()


@pytest.fixture
def h2_server() -> Iterator[H2Server]:
    server = H2Server()
    yield server
    server.close()


def test_upstream_stream_reset_after_the_response_started(tmp_path: Path, h2_server: H2Server) -> None:
    """RST_STREAM from the upstream mid-response: the client's stream is reset too (UR), its connection serves on."""
    proxy = start_proxy(tmp_path, service_entry(h2_server.port))
    peer = H2Peer(proxy.port)
    try:
        got = peer.finished(peer.request("/reset-after-start"))
        assert got.reset is not None and not got.ended  # never taken for complete
        entry = proxy.access_entries(1)[0]
        assert entry["response_code"] == 200
        assert entry["response_flags"] == "UR"
        assert entry["response_code_details"] == "upstream_reset_after_response_started{remote_reset}"
        again = peer.finished(peer.request("/echo"))
        assert again.status == 200
    finally:
        peer.close()
        proxy.stop()


def test_a_refused_stream_is_retried_by_istios_default_policy(tmp_path: Path, h2_server: H2Server) -> None:
    """REFUSED_STREAM: never processed; Istio's default retryOn has refused-stream, so the client sees the retry."""
    proxy = start_proxy(tmp_path, service_entry(h2_server.port))
    try:
        status, _, body = get(proxy.port, "/refuse")
        assert status == 200 and json.loads(body)["path"] == "/refuse"
        assert [p for p, _ in h2_server.requests] == ["/refuse", "/refuse"]
        assert proxy.access_entries(1)[0]["upstream_request_attempt_count"] == 2
    finally:
        proxy.stop()


def test_request_trailers_reach_an_http2_upstream(tmp_path: Path, h2_server: H2Server) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_server.port))
    peer = H2Peer(proxy.port)
    try:
        got = peer.finished(peer.request("/t", method="POST", body=b"q" * 70_000, trailers=[("x-sum", "42")]))
        assert got.status == 200
        assert json.loads(bytes(got.body))["trailers"] == [["x-sum", "42"]]
    finally:
        peer.close()
        proxy.stop()


BIG = 128 * 1024 * 1024
RSS_BOUND = 48 * 1024 * 1024  # two 16 MiB stream windows and buffers, far below the 128 MiB that flows


def test_a_large_download_from_http2_to_http1_keeps_memory_flat(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port))
    try:
        assert get(proxy.port, "/bytes?size=1000000")[0] == 200  # warm up: the HTTP/2 code is loaded, pools made
        rss = PeakRss(proxy.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
        conn.request("GET", f"/bytes?size={BIG}", headers={"Host": "backend"})
        response = conn.getresponse()
        got = 0
        while block := response.read(1 << 20):
            got += len(block)
        conn.close()
        growth = rss.growth()
        assert response.status == 200 and got == BIG
        assert growth < RSS_BOUND, f"proxy RSS grew by {growth / 2**20:.1f} MiB"
    finally:
        proxy.stop()


def test_use_client_protocol_follows_each_client(tmp_path: Path, h2_upstream: H2Upstream) -> None:
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port, "HTTP", "http"),
                        destination_rule("useClientProtocol: true"))
    peer = H2Peer(proxy.port)
    try:
        assert json.loads(get(proxy.port, "/echo")[2])["http_version"] == "1.1"
        got = peer.finished(peer.request("/echo"))
        assert got.status == 200 and json.loads(bytes(got.body))["http_version"] == "2"
    finally:
        peer.close()
        proxy.stop()


def test_grpc_timeout_is_honoured_by_the_proxy_and_sent_upstream_capped(tmp_path: Path,
                                                                        h2_upstream: H2Upstream) -> None:
    """An upstream that ignores grpc-timeout (hypercorn): the proxy's own deadline answers, gRPC-shaped."""
    proxy = start_proxy(tmp_path, service_entry(h2_upstream.port))
    peer = H2Peer(proxy.port)
    try:
        started = time.monotonic()
        got = peer.finished(peer.request("/slow?delay=3", method="POST", body=b"\0\0\0\0\0",
                                         headers=[("content-type", "application/grpc"), ("te", "trailers"),
                                                  ("grpc-timeout", "400m")]))
        assert time.monotonic() - started < 2.5
        headers = dict(got.headers)
        assert got.status == 200 and headers[b"grpc-status"] == b"14"
        assert headers[b"grpc-message"] == b"upstream request timeout"
        entry = proxy.access_entries(1)[0]
        assert entry["response_flags"] == "UT" and entry["response_code"] == 200
        sent = [v for k, v in h2_upstream.requests[0]["headers"] if k == "grpc-timeout"]
        assert len(sent) == 1 and sent[0].endswith("m") and int(sent[0][:-1]) <= 400
    finally:
        peer.close()
        proxy.stop()
