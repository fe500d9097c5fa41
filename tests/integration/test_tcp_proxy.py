"""The TCP proxy over real loopback sockets, through `--tcp-listener LISTEN=ADDRESS:PORT` (a transparent listener
whose original destination is fixed, so no iptables and no root): byte for byte, half-close both ways, bounded
buffering, connect failures, tcp: and tls: routes, protocol sniffing, and Istio's TCP metrics, exact."""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness import ProxyProcess, free_port, raw_exchange, write_config
from tcp_servers import (
    TcpServer,
    digest_after_eof,
    echo,
    exchange,
    greet_then_half_close,
    metric,
    named,
    read_all,
    self_signed,
    server_first,
    tls,
    tls_client_name,
)
from waiting import wait_until

VIP = "10.77.0.1"


def tcp_service(name: str, port: int, endpoints: list[tuple[int, dict[str, str]]], *, protocol: str = "TCP",
                address: str = VIP, port_name: str | None = None) -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{main: {p}}}, labels: {labels or {}}}}"
                    for p, labels in endpoints)
    proto = f", protocol: {protocol}" if protocol else ""
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  addresses: [{address}]
  location: MESH_INTERNAL
  ports: [{{number: {port}, name: {port_name or 'main'}{proto}}}]
  resolution: STATIC
  endpoints:
{eps}
"""


def start(tmp_path: Path, docs: list[str], listeners: list[str], *args: str) -> ProxyProcess:
    config = write_config(tmp_path / "config", "tcp.yaml", *docs)
    cmd = ["--listen", "off", *args]
    for spec in listeners:
        cmd += ["--tcp-listener", spec]
    return ProxyProcess(config.parent, args=cmd)


def port_of(proxy: ProxyProcess, destination: str) -> int:
    return proxy.addresses[f"tcp:{destination}"][1]


def scrape(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=10) as resp:
        return resp.read().decode()


def closed(proxy: ProxyProcess, **labels: str) -> str | None:
    """The scrape once a connection with these labels is counted closed, else None (for wait_until)."""
    text = scrape(proxy)
    return text if metric(text, "istio_tcp_connections_closed_total", **labels) else None


@pytest.fixture
def servers():
    made: list[TcpServer] = []

    def make(handler, **kw) -> TcpServer:
        server = TcpServer(handler, **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_large_transfer_byte_for_byte_with_exact_metrics(tmp_path: Path, servers) -> None:
    backend = servers(echo)
    proxy = start(tmp_path, [tcp_service("echo", 7000, [(backend.port, {})])], [f"127.0.0.1:0={VIP}:7000"])
    try:
        payload = random.Random(15).randbytes(8 << 20)
        port = port_of(proxy, f"{VIP}:7000")
        back = bytearray()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            def send() -> None:
                for i in range(0, len(payload), 1 << 16):
                    conn.sendall(payload[i:i + (1 << 16)])
                conn.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=send)
            writer.start()
            back += read_all(conn)
            writer.join(30)
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        labels = {"reporter": "source", "destination_service": "echo.default.svc.cluster.local",
                  "destination_service_name": "echo", "request_protocol": "tcp", "response_flags": "-"}
        text = wait_until(lambda: closed(proxy, **labels), what="the connection counted closed")
        assert metric(text, "istio_tcp_connections_opened_total", **labels) == 1
        assert metric(text, "istio_tcp_connections_closed_total", **labels) == 1
        assert metric(text, "istio_tcp_received_bytes_total", **labels) == len(payload)
        assert metric(text, "istio_tcp_sent_bytes_total", **labels) == len(payload)
        assert "response_code" not in text.split("istio_tcp_sent_bytes_total{")[1].split("}")[0]
        entry = proxy.access_entries(1)[0]
        assert entry["method"] == "-" and entry["response_code"] == 0 and entry["response_flags"] == "-"
        assert entry["bytes_received"] == entry["bytes_sent"] == len(payload)
        assert entry["upstream_cluster"] == "outbound|7000||echo.default.svc.cluster.local"
        assert entry["upstream_host"] == f"127.0.0.1:{backend.port}"
        assert entry["downstream_local_address"] == f"{VIP}:7000"  # the original destination, as Envoy logs it
    finally:
        assert proxy.stop() == 0, proxy.log


def test_half_close_both_ways(tmp_path: Path, servers) -> None:
    digest = servers(digest_after_eof)
    greeter = servers(greet_then_half_close)
    proxy = start(tmp_path, [tcp_service("digest", 7001, [(digest.port, {})]),
                             tcp_service("greeter", 7002, [(greeter.port, {})], address="10.77.0.2")],
                  [f"127.0.0.1:0={VIP}:7001", "127.0.0.1:0=10.77.0.2:7002"])
    try:
        # the client half-closes; the server answers after that EOF, through the proxy
        data = b"count me " * 5000
        answer = exchange(port_of(proxy, f"{VIP}:7001"), data)
        assert answer == hashlib.sha256(data).hexdigest().encode()
        # the server half-closes first; the client still sends afterwards and the server gets it all
        with socket.create_connection(("127.0.0.1", port_of(proxy, "10.77.0.2:7002")), timeout=10) as conn:
            assert read_all(conn) == b"hello, then goodbye"  # EOF passed on while our side stays open
            conn.sendall(b"still talking " * 1000)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(10) == b""
        wait_until(lambda: greeter.received, what="the server to read to the client's EOF")
        assert greeter.received[0] == b"still talking " * 1000
    finally:
        assert proxy.stop() == 0, proxy.log


def test_backpressure_bounds_what_the_proxy_buffers(tmp_path: Path, servers) -> None:
    """A server that does not read: the client can only push what the kernel and the proxy's high-water marks
    hold, then everything arrives once the server reads."""
    gate = threading.Event()
    got: list[int] = []

    def slow(conn: socket.socket, server: TcpServer) -> None:
        gate.wait(30)
        got.append(len(read_all(conn)))
        conn.sendall(b"done")

    backend = servers(slow)
    proxy = start(tmp_path, [tcp_service("slow", 7003, [(backend.port, {})])], [f"127.0.0.1:0={VIP}:7003"])
    try:
        with socket.create_connection(("127.0.0.1", port_of(proxy, f"{VIP}:7003")), timeout=30) as conn:
            conn.setblocking(False)
            chunk = b"x" * (1 << 16)
            pushed = 0
            stalled_since = None
            while pushed < (256 << 20):
                try:
                    pushed += conn.send(chunk)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 1.0:
                        break  # nothing moves any more: the pushback reached the client
                    time.sleep(0.01)
            assert pushed < (64 << 20), f"{pushed} bytes accepted by a proxy whose upstream does not read"
            gate.set()
            conn.setblocking(True)
            conn.shutdown(socket.SHUT_WR)
            assert read_all(conn) == b"done"
        assert got == [pushed]
    finally:
        gate.set()
        assert proxy.stop() == 0, proxy.log


def test_connect_failure_closes_with_UF(tmp_path: Path) -> None:
    proxy = start(tmp_path, [tcp_service("gone", 7004, [(free_port(), {})])], [f"127.0.0.1:0={VIP}:7004"])
    try:
        assert exchange(port_of(proxy, f"{VIP}:7004"), b"anyone?") == b""
        entry = proxy.access_entries(1)[0]
        assert entry["response_flags"] == "UF" and entry["bytes_sent"] == 0
        text = scrape(proxy)
        assert metric(text, "istio_tcp_connections_closed_total", response_flags="UF",
                      destination_service_name="gone") == 1
    finally:
        assert proxy.stop() == 0, proxy.log


def test_tcp_routes_by_weight_and_destination_subnet(tmp_path: Path, servers) -> None:
    v1, v2 = servers(named(b"v1")), servers(named(b"v2"))
    docs = [tcp_service("db", 5432, [(v1.port, {"version": "v1"}), (v2.port, {"version": "v2"})]),
            """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.77.0.0/30]}]
    route: [{destination: {host: db, subset: v2}}]
  - route:
    - {destination: {host: db, subset: v1}, weight: 0}
    - {destination: {host: db, subset: v2}, weight: 100}
"""]
    # the same service reached by its VIP (in 10.77.0.0/30) and by an address outside it (a second VIP)
    docs[0] = docs[0].replace(f"addresses: [{VIP}]", f"addresses: [{VIP}, 10.78.0.9]")
    proxy = start(tmp_path, docs, [f"127.0.0.1:0={VIP}:5432", "127.0.0.1:0=10.78.0.9:5432"])
    try:
        for destination in (f"{VIP}:5432", "10.78.0.9:5432"):
            for _ in range(5):
                assert exchange(port_of(proxy, destination), b"") == b"v2"
        routes = [e["route_name"] for e in proxy.access_entries(10)]
        assert routes.count("default/db:tcp[0]") == 5 and routes.count("default/db:tcp[1]") == 5
        assert not v1.peers
    finally:
        assert proxy.stop() == 0, proxy.log


def test_tls_passthrough_by_sni(tmp_path: Path, servers) -> None:
    a_cert, a_key = self_signed("a.example.com", tmp_path)
    b_cert, b_key = self_signed("b.example.com", tmp_path)
    a, b = servers(tls(b"A", a_cert, a_key)), servers(tls(b"B", b_cert, b_key))
    docs = [tcp_service("tls-a", 443, [(a.port, {})], protocol="TLS", address="10.79.0.1").replace(
                "tls-a.default.svc.cluster.local", "a.example.com"),
            tcp_service("tls-b", 443, [(b.port, {})], protocol="TLS", address="10.79.0.2").replace(
                "tls-b.default.svc.cluster.local", "b.example.com"),
            """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-sni}
spec:
  hosts: [a.example.com]
  tls:
  - match: [{sniHosts: [a.example.com], port: 443}]
    route: [{destination: {host: a.example.com}}]
"""]
    proxy = start(tmp_path, docs, ["127.0.0.1:0=10.79.0.1:443"])
    try:
        port = port_of(proxy, "10.79.0.1:443")
        assert tls_client_name(port, "a.example.com") == b"A"  # the tls: rule
        assert tls_client_name(port, "b.example.com") == b"B"  # the TLS service named by the SNI
        entries = proxy.access_entries(2)
        assert [e["requested_server_name"] for e in entries] == ["a.example.com", "b.example.com"]
        assert entries[0]["route_name"] == "default/by-sni:tls[0]"
        assert a.received == [b"bye"] and b.received == [b"bye"]  # never decrypted on the way
    finally:
        assert proxy.stop() == 0, proxy.log


def test_sniffed_port_http_tcp_and_server_first(tmp_path: Path, servers) -> None:
    """A port without a protocol: HTTP/1.1 is routed as HTTP, other client-first bytes go as TCP, and a
    server-first protocol gets its banner once protocolDetectionTimeout has passed."""
    backend = servers(echo)
    banner = servers(server_first)
    from harness import Upstream

    web = Upstream()
    docs = [tcp_service("mixed", 7100, [(backend.port, {})], protocol="", port_name="main"),
            tcp_service("banner", 7101, [(banner.port, {})], protocol="", port_name="main", address="10.77.0.3"),
            tcp_service("web", 7102, [(web.port, {})], protocol="", port_name="main", address="10.77.0.4")]
    proxy = start(tmp_path, docs, [f"127.0.0.1:0={VIP}:7100", "127.0.0.1:0=10.77.0.3:7101",
                                   "127.0.0.1:0=10.77.0.4:7102"], "--protocol-detection-timeout", "0.3")
    try:
        assert exchange(port_of(proxy, f"{VIP}:7100"), b"*1\r\n$4\r\nPING\r\n") == b"*1\r\n$4\r\nPING\r\n"
        reply = raw_exchange(port_of(proxy, "10.77.0.4:7102"),
                             b"GET /echo HTTP/1.1\r\nHost: web:7102\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and b'"/echo"' in reply
        h2c = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                              "-w", "%{http_version} %{http_code}", "-H", "Host: web:7102",
                              f"http://127.0.0.1:{port_of(proxy, '10.77.0.4:7102')}/echo"],
                             capture_output=True, text=True, timeout=30)
        assert h2c.stdout == "2 200", h2c  # the HTTP/2 preface: routed as HTTP too, by the HTTP/2 codec
        with socket.create_connection(("127.0.0.1", port_of(proxy, "10.77.0.3:7101")), timeout=10) as conn:
            assert conn.recv(100) == b"220 banner\r\n"
            conn.sendall(b"QUIT\r\n")
            conn.shutdown(socket.SHUT_WR)
            assert read_all(conn) == b"QUIT\r\n"
        entries = proxy.access_entries(4)
        http = [e for e in entries if e["method"] == "GET"]
        assert [(e["protocol"], e["upstream_cluster"]) for e in http] == [
            ("HTTP/1.1", "outbound|7102||web.default.svc.cluster.local"),
            ("HTTP/2", "outbound|7102||web.default.svc.cluster.local")]
        assert http[0]["listener"] == "virtualOutbound" and http[0]["downstream_local_address"] == "10.77.0.4:7102"
        assert sorted(e["upstream_cluster"] for e in entries if e["method"] == "-") == [
            "outbound|7100||mixed.default.svc.cluster.local", "outbound|7101||banner.default.svc.cluster.local"]
    finally:
        web.close()
        assert proxy.stop() == 0, proxy.log


def test_unknown_destination_allow_any_and_registry_only(tmp_path: Path, servers) -> None:
    backend, registered = servers(echo), servers(echo)
    docs = [tcp_service("other", 7200, [(registered.port, {})])]
    destination = f"127.0.0.1:{backend.port}"  # not in the registry
    allow = start(tmp_path / "allow", docs, [f"127.0.0.1:0={destination}"])
    try:
        assert exchange(port_of(allow, destination), b"through") == b"through"
        entry = allow.access_entries(1)[0]
        assert entry["upstream_cluster"] == "PassthroughCluster" and entry["upstream_host"] == destination
        assert metric(scrape(allow), "istio_tcp_connections_opened_total",
                      destination_service_name="PassthroughCluster") == 1
    finally:
        assert allow.stop() == 0, allow.log
    strict = start(tmp_path / "strict", docs, [f"127.0.0.1:0={destination}"],
                   "--outbound-traffic-policy", "REGISTRY_ONLY")
    try:
        assert exchange(port_of(strict, destination), b"blocked?") == b""
        entry = strict.access_entries(1)[0]
        assert entry["upstream_cluster"] == "BlackHoleCluster" and entry["response_flags"] == "UH"
        assert metric(scrape(strict), "istio_tcp_connections_closed_total",
                      destination_service_name="BlackHoleCluster", response_flags="UH") == 1
        assert len(backend.peers) == 1  # only the ALLOW_ANY connection reached it
    finally:
        assert strict.stop() == 0, strict.log


def test_idle_connections_are_closed_after_the_idle_timeout(tmp_path: Path, servers) -> None:
    backend = servers(echo)
    proxy = start(tmp_path, [tcp_service("idle", 7300, [(backend.port, {})])], [f"127.0.0.1:0={VIP}:7300"],
                  "--tcp-idle-timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", port_of(proxy, f"{VIP}:7300")), timeout=10) as conn:
            started = time.monotonic()
            for _ in range(4):  # traffic every 0.3 s keeps it open past the 0.5 s timeout
                conn.sendall(b"tick")
                assert conn.recv(10) == b"tick"
                last = time.monotonic()
                time.sleep(0.3)
            assert read_all(conn) == b""  # then silence: closed by the proxy
            closed_at = time.monotonic()
            assert closed_at - started > 0.9 and closed_at - last >= 0.45
        entry = proxy.access_entries(1)[0]
        assert entry["bytes_received"] == entry["bytes_sent"] == 16
        wait_until(lambda: backend.received, what="the upstream side closed too")
    finally:
        assert proxy.stop() == 0, proxy.log


def test_max_connections_overflow_closes_with_UO(tmp_path: Path, servers) -> None:
    backend = servers(echo)
    rule = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: capped}
spec:
  host: capped
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
"""
    proxy = start(tmp_path, [tcp_service("capped", 7400, [(backend.port, {})]), rule], [f"127.0.0.1:0={VIP}:7400"])
    try:
        port = port_of(proxy, f"{VIP}:7400")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            first.sendall(b"one")
            assert first.recv(10) == b"one"  # connected upstream: the one connection the cluster allows
            assert exchange(port, b"two") == b""  # over the limit: closed at once
            entry = proxy.access_entries(1)[0]
            assert entry["response_flags"] == "UO" and entry["upstream_host"] == "-"
        assert proxy.access_entries(1)[0]["bytes_received"] == 3  # the first connection is over...
        assert exchange(port, b"three") == b"three"  # ... and its slot free again
    finally:
        assert proxy.stop() == 0, proxy.log


def test_a_declared_tls_port_stays_tcp_whatever_it_carries(tmp_path: Path, servers) -> None:
    """Only the ClientHello's SNI is awaited on a TLS port: plain HTTP bytes there are not handed to the HTTP
    listener, they go to the service byte for byte."""
    backend = servers(echo)
    proxy = start(tmp_path, [tcp_service("opaque", 8443, [(backend.port, {})], protocol="TLS")],
                  [f"127.0.0.1:0={VIP}:8443"])
    try:
        request = b"GET / HTTP/1.1\r\nHost: opaque\r\n\r\n"
        assert exchange(port_of(proxy, f"{VIP}:8443"), request) == request
        entry = proxy.access_entries(1)[0]
        assert entry["method"] == "-" and entry["upstream_cluster"] == "outbound|8443||opaque.default.svc.cluster.local"
    finally:
        assert proxy.stop() == 0, proxy.log


def test_max_connections_counts_tcp_connections(tmp_path: Path, servers) -> None:
    backend = servers(echo)
    proxy = start(tmp_path, [tcp_service("budget", 7500, [(backend.port, {})])], [f"127.0.0.1:0={VIP}:7500"],
                  "--max-connections", "1")
    try:
        port = port_of(proxy, f"{VIP}:7500")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            first.sendall(b"one")
            assert first.recv(10) == b"one"
            assert exchange(port, b"two") == b""  # the process's one connection is taken
        assert proxy.access_entries(1)[0]["bytes_received"] == 3
        assert exchange(port, b"three") == b"three"
    finally:
        assert proxy.stop() == 0, proxy.log


def test_mesh_config_file_sets_the_outbound_policy_and_a_flag_wins(tmp_path: Path, servers) -> None:
    backend = servers(echo)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n"
                    "data:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n")
    destination = f"127.0.0.1:{backend.port}"
    strict = start(tmp_path / "a", [tcp_service("x", 7600, [(free_port(), {})])], [f"127.0.0.1:0={destination}"],
                   "--mesh-config", str(mesh))
    try:
        assert exchange(port_of(strict, destination), b"hello") == b""
        assert strict.access_entries(1)[0]["upstream_cluster"] == "BlackHoleCluster"
    finally:
        assert strict.stop() == 0, strict.log
    overridden = start(tmp_path / "b", [tcp_service("x", 7600, [(free_port(), {})])], [f"127.0.0.1:0={destination}"],
                       "--mesh-config", str(mesh), "--outbound-traffic-policy", "ALLOW_ANY")
    try:
        assert exchange(port_of(overridden, destination), b"hello") == b"hello"
    finally:
        assert overridden.stop() == 0, overridden.log


def test_a_gateways_tcp_listener_enforces_the_gateways_authorization_policy(tmp_path: Path, servers) -> None:
    """A gateway's --tcp-listener carries its clients' traffic: the policies that select the gateway decide each
    connection (destination.port: the listener's port), with HTTP-only fields dropped from a DENY as istiod does.
    A sidecar's --tcp-listener carries its app's own calls: not authorized there."""
    server = servers(echo)
    deny = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-loopback, namespace: default}
spec:
  selector: {matchLabels: {app: edge}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [127.0.0.0/8]}}], to: [{operation: {methods: [CONNECT]}}]}]
"""
    destination = f"127.0.0.1:{server.port}"
    gateway = start(tmp_path, [deny], [f"127.0.0.1:0={destination}"], "--gateway", "edge", "--label", "app=edge")
    try:
        assert exchange(port_of(gateway, destination), b"from loopback") == b""
        assert server.received == []
        line = gateway.access_entries(1, timeout=15)[0]  # the only connection: its line at close
        assert line["connection_termination_details"] == \
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-loopback]-rule[0]]"
        assert metric(scrape(gateway), "istio_tcp_connections_closed_total", response_flags="-") == 1
    finally:
        assert gateway.stop() == 0
    sidecar = start(tmp_path, [deny], [f"127.0.0.1:0={destination}"], "--label", "app=edge")
    try:
        assert exchange(port_of(sidecar, destination), b"the app's own call") == b"the app's own call"
    finally:
        assert sidecar.stop() == 0
