"""Inbound mutual TLS over real sockets: a meshproxy sidecar terminating TLS with its workload certificates,
STRICT (TLS with a client certificate only) and PERMISSIVE (TLS or plaintext, decided per connection), the
client's identity in Istio's metric labels, and certificate rotation that keeps open connections."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from harness import ProxyProcess, Upstream, raw_exchange
from tls_peers import Mesh, make_mesh
from waiting import wait_until

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return make_mesh(tmp_path)


@pytest.fixture
def app() -> Iterator[Upstream]:
    server = Upstream("app")
    yield server
    server.close()


def sidecar(mesh: Mesh, tmp_path: Path, app: Upstream, mode: str) -> tuple[ProxyProcess, int, Path]:
    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    proxy = ProxyProcess(args=["--listen", "off", "--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}",
                               "--cert-dir", str(server_dir), "--inbound-tls", mode])
    return proxy, proxy.addresses[f"inbound:{app.port}"][1], server_dir


def curl(port: int, *args: str, host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    # -k: our workload certificates name a SPIFFE id, not a host; the client certificate is what is checked.
    # --http1.1: the inbound selects h2 when curl offers it, and goes on to the app in the client's protocol (as
    # Istio's inbound cluster of a sniffed port); this app speaks HTTP/1.1 only.
    return subprocess.run([CURL, "-sS", "-k", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                           "15", *args,
                           "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/echo"],
                          capture_output=True, text=True, timeout=30)


def client_context(mesh: Mesh, client: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(mesh.roots))
    context.check_hostname = False
    context.load_cert_chain(client / "cert-chain.pem", client / "key.pem")
    return context


def plaintext_get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/echo")
    status = conn.getresponse().status
    conn.close()
    return status


def metrics(proxy: ProxyProcess) -> list[str]:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
        return [line for line in resp.read().decode().splitlines() if line.startswith("istio_requests_total{")]


@needs_curl
def test_strict_refuses_plaintext_and_clients_without_a_certificate(mesh: Mesh, tmp_path: Path,
                                                                    app: Upstream) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    proxy, port, _ = sidecar(mesh, tmp_path, app, "STRICT")
    try:
        answer = raw_exchange(port, b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
        assert not answer.startswith(b"HTTP/")  # no HTTP for a plaintext client: the handshake failed
        assert curl(port).stdout == "000"  # TLS without a client certificate: refused
        done = curl(port, "--cert", str(client / "cert-chain.pem"), "--key", str(client / "key.pem"),
                    host="reviews.example")
        assert done.stdout == "200", done.stderr
        assert len(app.requests) == 1
        (logged,) = [e for e in proxy.access_entries(1) if e["response_code"] == 200]
        assert logged["requested_server_name"] == "reviews.example"  # the SNI: AuthorizationPolicy's connection.sni
        lines = metrics(proxy)
        assert any('source_principal="spiffe://cluster.local/ns/default/sa/client"' in line
                   and 'destination_principal="spiffe://cluster.local/ns/default/sa/server"' in line
                   and 'connection_security_policy="mutual_tls"' in line and 'response_code="200"' in line
                   for line in lines), lines
    finally:
        proxy.stop()


@needs_curl
def test_permissive_takes_tls_and_plaintext_on_one_port(mesh: Mesh, tmp_path: Path, app: Upstream) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    proxy, port, _ = sidecar(mesh, tmp_path, app, "PERMISSIVE")
    try:
        assert plaintext_get(port) == 200
        done = curl(port, "--cert", str(client / "cert-chain.pem"), "--key", str(client / "key.pem"))
        assert done.stdout == "200", done.stderr
        assert plaintext_get(port) == 200
        assert len(app.requests) == 3
        lines = metrics(proxy)
        assert any('connection_security_policy="none"' in line and 'source_principal="unknown"' in line
                   and line.endswith(" 2.0") for line in lines), lines
        assert any('connection_security_policy="mutual_tls"' in line and line.endswith(" 1.0")
                   and 'source_principal="spiffe://cluster.local/ns/default/sa/client"' in line for line in lines)
        # a client that connects and sends nothing does not hold up the others
        with socket.create_connection(("127.0.0.1", port)):
            assert plaintext_get(port) == 200
    finally:
        assert proxy.stop() == 0


def status_of(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/echo")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_serves_new_connections_and_keeps_open_ones(mesh: Mesh, tmp_path: Path, app: Upstream) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    proxy, port, server_dir = sidecar(mesh, tmp_path, app, "STRICT")
    context = client_context(mesh, client)
    try:
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
        assert status_of(kept) == 200 and kept.sock is not None
        first_sock, first = kept.sock, serial(kept.sock)

        mesh.workload(server_dir, "default", "server")  # the agent writes a new certificate
        wait_until(lambda: "certificates rotated" in proxy.log, what="the rotation in the log")

        assert status_of(kept) == 200  # the open keep-alive connection still works, on its old certificate
        assert kept.sock is first_sock and serial(kept.sock) == first
        fresh = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
        assert status_of(fresh) == 200 and fresh.sock is not None
        second = serial(fresh.sock)
        assert second != first
        fresh.close()

        (server_dir / "key.pem").write_bytes(b"not a key\n")  # a broken rotation
        wait_until(lambda: f"rotated certificates rejected: {server_dir / 'key.pem'}" in proxy.log,
                   what="the rejected rotation in the log")
        again = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15)
        assert status_of(again) == 200 and again.sock is not None
        assert serial(again.sock) == second  # the last good certificate stays in use
        again.close()
        assert status_of(kept) == 200 and kept.sock is first_sock
        kept.close()
    finally:
        proxy.stop()


def test_a_missing_cert_dir_stops_the_start_with_the_file_named(tmp_path: Path) -> None:
    done = subprocess.run(["python3", "-m", "meshproxy", "run", "--listen", "127.0.0.1:0", "--admin", "off",
                           "--cert-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert f"{tmp_path / 'cert-chain.pem'}: missing" in done.stderr


def test_the_mode_changes_at_run_time_for_new_connections(mesh: Mesh, tmp_path: Path, app: Upstream) -> None:
    """What PeerAuthentication drives: `ProxyApp.set_inbound_tls` switches a running listener; an open plaintext
    connection is left alone, new ones follow the new mode."""
    import asyncio
    import signal

    from meshproxy.app import ProxyApp
    from meshproxy.settings import InboundSpec, Settings

    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    request = b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n"

    async def exchange(port: int, kept: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> bytes:
        reader, writer = kept or await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            return head.split(b"\r\n")[0]
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        finally:
            if kept is None:
                writer.close()
                try:
                    await writer.wait_closed()
                except ConnectionError:
                    pass

    async def scenario() -> None:
        proxy = ProxyApp(Settings(listen=None, admin=None, inbound=(InboundSpec.parse(
            f"127.0.0.1:0=127.0.0.1:{app.port}"),), cert_dir=str(server_dir), metrics=False, tracing=False))
        await proxy.start()
        try:
            port = proxy.addresses[f"inbound:{app.port}"][1]
            assert proxy.secure_servers[app.port].mode == "PERMISSIVE"  # Istio's default
            kept = await asyncio.open_connection("127.0.0.1", port)
            assert await exchange(port, kept) == b"HTTP/1.1 200 OK"
            proxy.set_inbound_tls("STRICT", app.port)
            assert await exchange(port) == b""  # a new plaintext connection: refused
            assert await exchange(port, kept) == b"HTTP/1.1 200 OK"  # the open one goes on
            proxy.set_inbound_tls("DISABLE")
            assert await exchange(port) == b"HTTP/1.1 200 OK"
            with pytest.raises(ValueError, match="expected STRICT, PERMISSIVE or DISABLE"):
                proxy.set_inbound_tls("MUTUAL")
            kept[1].close()
            await kept[1].wait_closed()
        finally:
            await proxy.drain()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    asyncio.run(scenario())


PEER_AUTHENTICATION = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: %s}
"""


def test_peer_authentication_sets_the_inbound_mode_and_a_reload_changes_it(mesh: Mesh, tmp_path: Path,
                                                                            app: Upstream) -> None:
    """Without --inbound-tls the namespace's PeerAuthentication decides: STRICT refuses plaintext; the same file
    made PERMISSIVE and reloaded takes it on new connections."""
    policy = tmp_path / "peer-authentication.yaml"
    policy.write_text(PEER_AUTHENTICATION % "STRICT")
    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    proxy = ProxyProcess(policy, args=["--listen", "off", "--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}",
                                       "--cert-dir", str(server_dir), "--watch-interval", "0"])
    try:
        port = proxy.addresses[f"inbound:{app.port}"][1]
        assert raw_exchange(port, b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n") == b""  # closed: STRICT
        policy.write_text(PEER_AUTHENTICATION % "PERMISSIVE")
        with urllib.request.urlopen(urllib.request.Request(proxy.admin + "/reload", method="POST"), timeout=15):
            pass
        assert plaintext_get(port) == 200
    finally:
        assert proxy.stop() == 0
