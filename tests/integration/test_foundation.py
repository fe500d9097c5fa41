"""The foundation over real loopback sockets: routing by host, keep-alive, pipelining, streaming, local replies."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest

from harness import BACKEND_VS, ProxyProcess, Upstream, free_port, raw_exchange, service_entry, write_config

VS = BACKEND_VS


@pytest.fixture
def proxy(tmp_path: Path, upstream: Upstream):
    config = write_config(tmp_path / "config", "backend.yaml", service_entry("backend", [(upstream.port, {})], port=80), VS)
    p = ProxyProcess(config.parent)
    yield p
    assert p.stop() == 0, p.log


def get(port: int, path: str, host: str = "backend", headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host, **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_routes_by_host_header_and_short_or_full_names(proxy: ProxyProcess, upstream: Upstream) -> None:
    for host in ("backend", "backend:80", "backend.default", "backend.default.svc.cluster.local", "BACKEND:80"):
        resp, body = get(proxy.port, "/echo?x=1", host)
        assert resp.status == 200, host
        assert json.loads(body)["path"] == "/echo?x=1"


def test_absolute_form_request_is_routed_by_its_authority(proxy: ProxyProcess, upstream: Upstream) -> None:
    reply = raw_exchange(proxy.port, b"GET http://backend/echo HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    # the upstream gets origin-form and the authority as Host
    assert upstream.requests[-1]["path"] == "/echo"
    assert upstream.header_values(-1, "host") == ["backend"]


def test_unknown_host_is_404_NR(proxy: ProxyProcess) -> None:
    resp, body = get(proxy.port, "/", "elsewhere.example.com")
    assert resp.status == 404 and body == b""
    entry = proxy.access_entries(1)[0]
    assert entry["response_flags"] == "NR" and entry["response_code"] == 404


def test_keep_alive_reuses_one_upstream_connection(proxy: ProxyProcess, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    for i in range(20):
        conn.request("GET", f"/echo?i={i}", headers={"Host": "backend"})
        assert conn.getresponse().read()
    conn.close()
    assert len(upstream.requests) == 20
    assert len(upstream.connections) == 1


def test_pipelined_responses_come_back_in_request_order(proxy: ProxyProcess) -> None:
    reqs = b"".join(
        b"GET %s HTTP/1.1\r\nHost: backend\r\n\r\n" % path for path in (b"/slow?delay=0.3", b"/echo?n=2", b"/echo?n=3")
    ) + b"GET /echo?n=4 HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(proxy.port, reqs)
    assert reply.count(b"HTTP/1.1 200") == 4
    first = reply.index(b"slow done")
    order = [reply.index(b'"/echo?n=%d"' % n) for n in (2, 3, 4)]
    assert first < order[0] < order[1] < order[2]


def test_hop_by_hop_removed_and_forwarding_headers_set(proxy: ProxyProcess, upstream: Upstream) -> None:
    resp, _ = get(proxy.port, "/echo", headers={"Connection": "keep-alive, x-private", "X-Private": "secret",
                                                 "Keep-Alive": "timeout=5", "X-Forwarded-For": "10.1.1.1"})
    assert resp.status == 200
    names = [k.decode().lower() for k, _ in upstream.requests[-1]["headers"]]
    assert "x-private" not in names and "keep-alive" not in names and "connection" not in names
    # a sidecar's listener passes x-forwarded-for on as it came (istiod: use_remote_address false) and adds none
    assert upstream.header_values(-1, "x-forwarded-for") == ["10.1.1.1"]
    assert upstream.header_values(-1, "x-forwarded-proto") == ["http"]
    assert upstream.header_values(-1, "x-envoy-attempt-count") == ["1"]
    get(proxy.port, "/echo")
    assert upstream.header_values(-1, "x-forwarded-for") == []


def test_chunked_upload_and_download(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    chunks = [b"a" * 1000, b"b" * 5000, b"c" * 7]
    conn.request("POST", "/upload", body=iter(chunks), headers={"Host": "backend"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["size"] == 6007
    conn.request("GET", "/stream?size=100000&chunk=3000", headers={"Host": "backend"})
    resp = conn.getresponse()
    assert resp.getheader("transfer-encoding") == "chunked"
    assert len(resp.read()) == 100000
    conn.close()


def test_head_request_gets_no_body_and_connection_stays_usable(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("HEAD", "/bytes?size=5000", headers={"Host": "backend"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.request("GET", "/echo", headers={"Host": "backend"})
    assert conn.getresponse().status == 200
    conn.close()


def test_malformed_request_gets_400_and_close(proxy: ProxyProcess) -> None:
    reply = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: backend\r\nBad Header\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"connection: close" in reply.lower()


def test_too_large_headers_get_431(proxy: ProxyProcess) -> None:
    big = b"x-big: " + b"a" * (61 * 1024) + b"\r\n"
    reply = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: backend\r\n" + big + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431")
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(101))
    reply = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: backend\r\n" + many + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431")


def test_connect_failure_is_503_UF_after_default_retries(tmp_path: Path) -> None:
    config = write_config(tmp_path, "c.yaml", service_entry("backend", [(free_port(), {})], port=80), VS)
    p = ProxyProcess(config)
    try:
        resp, body = get(p.port, "/")
        assert resp.status == 503
        assert body.startswith(b"upstream connect error or disconnect/reset before headers. retried and the latest "
                               b"reset reason: remote connection failure")
        entry = p.access_entries(1)[0]
        assert "UF" in entry["response_flags"] and "URX" in entry["response_flags"]
    finally:
        assert p.stop() == 0


def test_subset_without_endpoints_is_503_UH_and_missing_rule_is_503_NC(tmp_path: Path, upstream: Upstream) -> None:
    docs = [service_entry("backend", [(upstream.port, {"version": "v1"})], port=80), """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend
  subsets: [{name: v1, labels: {version: v1}}, {name: v9, labels: {version: v9}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: [backend]
  http:
  - match: [{uri: {prefix: /empty}}]
    route: [{destination: {host: backend, subset: v9}}]
  - match: [{uri: {prefix: /undefined}}]
    route: [{destination: {host: backend, subset: v7}}]
  - route: [{destination: {host: backend, subset: v1}}]
"""]
    p = ProxyProcess(write_config(tmp_path, "c.yaml", *docs))
    try:
        resp, body = get(p.port, "/empty")
        assert (resp.status, body) == (503, b"no healthy upstream")
        resp, body = get(p.port, "/undefined")
        assert resp.status == 503
        resp, _ = get(p.port, "/echo")
        assert resp.status == 200
        flags = [e["response_flags"] for e in p.access_entries(3)]
        assert flags == ["UH", "NC", "-"]
        assert "subset 'v7' is not defined" in p.log
    finally:
        assert p.stop() == 0


def _raw_upstream(reply: bytes) -> tuple[socket.socket, int]:
    """A listening socket whose connections get `reply` (maybe nothing) and are then closed."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if reply:
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.mark.parametrize(
    ("reply", "status", "flag"),
    [
        (b"", 503, "UC"),  # closed before any response byte
        (b"HTTP/1.1 2OO OK\r\n\r\n", 502, "UPE"),  # malformed status line
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 502, "UPE"),
    ],
)
def test_upstream_failures_get_envoys_answers(tmp_path: Path, reply: bytes, status: int, flag: str) -> None:
    srv, port = _raw_upstream(reply)
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(port, {})], port=80), VS))
    try:
        resp, body = get(p.port, "/")
        assert resp.status == status
        assert p.access_entries(1)[0]["response_flags"] == flag
    finally:
        srv.close()
        assert p.stop() == 0


def test_body_cut_short_resets_the_client_instead_of_looking_complete(tmp_path: Path) -> None:
    srv, port = _raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-some")
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(port, {})], port=80), VS))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        conn.request("GET", "/", headers={"Host": "backend"})
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        assert p.access_entries(1)[0]["response_flags"] == "UC"
    finally:
        srv.close()
        assert p.stop() == 0


def test_inbound_listener_forwards_to_the_local_app(tmp_path: Path, upstream: Upstream) -> None:
    listen = free_port()
    p = ProxyProcess(args=["--listen", "off", "--inbound", f"127.0.0.1:{listen}=127.0.0.1:{upstream.port}"])
    try:
        resp, body = get(listen, "/echo", "reviews:9080")
        assert resp.status == 200 and resp.getheader("server") == "istio-envoy"
        assert upstream.header_values(-1, "host") == ["reviews:9080"]
    finally:
        assert p.stop() == 0


def test_x_request_id_is_generated_when_absent_and_kept_when_present(proxy: ProxyProcess, upstream: Upstream) -> None:
    get(proxy.port, "/echo")
    generated = upstream.header_values(-1, "x-request-id")
    assert len(generated) == 1 and len(generated[0]) == 36
    get(proxy.port, "/echo", headers={"X-Request-Id": "abc-123"})
    assert upstream.header_values(-1, "x-request-id") == ["abc-123"]
    assert [e["request_id"] for e in proxy.access_entries(2)] == [generated[0], "abc-123"]


def test_peer_metadata_stays_inside_the_mesh(tmp_path: Path, upstream: Upstream) -> None:
    internal = Upstream("internal")
    docs = [service_entry("backend", [(upstream.port, {})], port=80),  # MESH_EXTERNAL, Istio's default
            service_entry("internal", [(internal.port, {})], port=80, location="MESH_INTERNAL")]
    p = ProxyProcess(write_config(tmp_path, "c.yaml", *docs))
    try:
        assert get(p.port, "/echo", "backend")[0].status == 200
        assert get(p.port, "/echo", "internal")[0].status == 200
        assert upstream.header_values(-1, "x-envoy-peer-metadata") == []
        assert len(internal.header_values(-1, "x-envoy-peer-metadata")) == 1
    finally:
        assert p.stop() == 0
        internal.close()
