"""Upstream TLS to HTTP/2 upstreams over real sockets: a grpc.aio client talks plaintext to meshproxy, which
originates TLS (SIMPLE) or Istio's mutual TLS (auto mTLS, ISTIO_MUTUAL) to grpcio servers with
`ssl_server_credentials`, HTTP/2 negotiated by ALPN; the server's identity is checked, a wrong one is Envoy's
UF with its TLS failure reason (the same as HTTP/1.1's), and a rotated workload certificate serves new connections.
What meshproxy offers by ALPN for each protocol is read by Python TLS servers that record the protocol they chose."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed")

from harness import ProxyProcess, write_config  # noqa: E402
from tls_peers import Mesh, make_mesh  # noqa: E402
from waiting import wait_until  # noqa: E402

SERVICE = "test.Echo"
BACKEND_ID = "spiffe://cluster.local/ns/default/sa/backend"
PROXY_ID = "spiffe://cluster.local/ns/default/sa/client"
SAN_FAILURE = ("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
               f"verify cert failed: SAN matcher, certificate SANs are [{BACKEND_ID}]:TLS_error_end")


class TLSEchoServer:
    """A grpcio server over TLS with a workload certificate (a client certificate required when `mutual`): /Unary
    echoes, /ServerStream sends N messages; each call records the client's URI SANs (grpc's peer identities)."""

    def __init__(self, certs: Path, roots: Path | None = None) -> None:
        self.calls = 0
        self.clients: list[list[str]] = []
        self.lock = threading.Lock()
        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream)}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)])
        credentials = grpc.ssl_server_credentials(
            [((certs / "key.pem").read_bytes(), (certs / "cert-chain.pem").read_bytes())],
            root_certificates=roots.read_bytes() if roots is not None else None,
            require_client_auth=roots is not None)
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def _seen(self, context: grpc.ServicerContext) -> None:
        identities = [i.decode() for i in context.peer_identities() or [] if i.startswith(b"spiffe://")]
        with self.lock:
            self.calls += 1
            self.clients.append(identities)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen(context)
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(context)
        for i in range(int(request)):
            yield b"%d" % i

    def close(self) -> None:
        self.server.stop(0).wait(5)


def service(name: str, port: int, *, sidecar: bool = False, sans: list[str] | None = None,
            protocol: str = "GRPC") -> str:
    spec: dict[str, object] = {
        "hosts": [f"{name}.default.svc.cluster.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 80, "name": "grpc", "protocol": protocol}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"grpc": port},
                       "labels": {"security.istio.io/tlsMode": "istio"} if sidecar else {}}],
    }
    if sans:
        spec["subjectAltNames"] = sans
    return "---\n" + json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                                 "metadata": {"name": name, "namespace": "default"}, "spec": spec}) + "\n"


def rule(name: str, policy: dict[str, object]) -> str:
    return "---\n" + json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                                 "metadata": {"name": name, "namespace": "default"},
                                 "spec": {"host": name, "trafficPolicy": policy}}) + "\n"


async def calls(port: int, authority: str, n: int = 3) -> tuple[list[bytes], list[bytes]]:
    """Unary calls and one server-streaming call through the proxy, with a grpc.aio client."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority),
                                                                        ("grpc.enable_http_proxy", 0)]) as chan:
        unary = chan.unary_unary(f"/{SERVICE}/Unary")
        answers = [await unary(b"m%d" % i, timeout=15) for i in range(n)]
        streamed = [m async for m in chan.unary_stream(f"/{SERVICE}/ServerStream")(b"4", timeout=15)]
    return answers, streamed


async def failing_call(port: int, authority: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", authority),
                                                                        ("grpc.enable_http_proxy", 0)]) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await chan.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=15)
    return caught.value


def scrape(proxy: ProxyProcess) -> list[str]:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
        return resp.read().decode().splitlines()


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return make_mesh(tmp_path)


@pytest.fixture
def backend(mesh: Mesh, tmp_path: Path) -> Path:
    return mesh.workload(tmp_path / "backend", "default", "backend")


def test_grpc_over_simple_tls_origination(mesh: Mesh, backend: Path, tmp_path: Path) -> None:
    """grpc.aio client -> meshproxy (plaintext in) -> SIMPLE TLS -> grpcio with ssl_server_credentials (it speaks
    HTTP/2 only when ALPN chose h2); a server that is not the one the rule names is refused, never called."""
    server = TLSEchoServer(backend)
    config = write_config(
        tmp_path / "config", "c.yaml",
        service("ok", server.port), rule("ok", {"tls": {"mode": "SIMPLE", "caCertificates": str(mesh.roots),
                                                        "sni": "backend.example", "subjectAltNames": [BACKEND_ID]}}),
        service("wrong", server.port), rule("wrong", {"tls": {"mode": "SIMPLE", "caCertificates": str(mesh.roots),
                                                              "subjectAltNames": [BACKEND_ID + "-not"]}}))
    proxy = ProxyProcess(config)
    try:
        answers, streamed = asyncio.run(calls(proxy.port, "ok"))
        assert answers == [b"echo:m0", b"echo:m1", b"echo:m2"] and streamed == [b"0", b"1", b"2", b"3"]
        assert server.calls == 4 and server.clients[-1] == []  # SIMPLE: no client certificate

        error = asyncio.run(failing_call(proxy.port, "wrong"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls == 4
        entries = proxy.access_entries(5, timeout=10)
        assert [e["response_flags"] for e in entries[:4]] == ["-"] * 4
        wrong = entries[4]
        assert wrong["authority"] == "wrong" and wrong["response_flags"] == "UF,URX"
        # the same words as for HTTP/1.1 (and as Envoy's): the SAN matcher's, with the server's SANs
        assert wrong["response_code_details"] == (
            "upstream_reset_before_response_started{remote_connection_failure|" + SAN_FAILURE.replace(" ", "_") + "}")
    finally:
        proxy.stop()
        server.close()


def test_grpc_over_istio_mutual_tls_checks_the_service_account(mesh: Mesh, backend: Path, tmp_path: Path) -> None:
    """Auto mTLS to an endpoint labelled as a sidecar's: the workload certificate goes out, the server's SPIFFE id
    must be one of the service's accounts (ServiceEntry subjectAltNames), and it labels the metrics."""
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEchoServer(backend, roots=mesh.roots)
    config = write_config(
        tmp_path / "config", "c.yaml",
        service("good", server.port, sidecar=True, sans=[BACKEND_ID]),
        service("bad", server.port, sidecar=True, sans=["spiffe://cluster.local/ns/default/sa/someone-else"]))
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        answers, _ = asyncio.run(calls(proxy.port, "good"))
        assert answers == [b"echo:m0", b"echo:m1", b"echo:m2"]
        assert server.clients == [[PROXY_ID]] * 4
        lines = [x for x in scrape(proxy) if x.startswith("istio_requests_total{")]
        assert any(f'destination_principal="{BACKEND_ID}"' in x and f'source_principal="{PROXY_ID}"' in x
                   and 'request_protocol="grpc"' in x for x in lines), lines

        error = asyncio.run(failing_call(proxy.port, "bad"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls == 4  # never reached
        bad = proxy.access_entries(5, timeout=10)[4]
        assert bad["response_flags"] == "UF,URX"
        assert bad["upstream_transport_failure_reason"] == SAN_FAILURE.replace(" ", "_")
    finally:
        proxy.stop()
        server.close()


def test_a_rotated_workload_certificate_serves_new_http2_connections(mesh: Mesh, backend: Path,
                                                                    tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEchoServer(backend, roots=mesh.roots)
    config = write_config(tmp_path / "config", "c.yaml", service("backend", server.port, sidecar=True),
                          rule("backend", {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}}))
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        asyncio.run(calls(proxy.port, "backend", n=1))
        assert server.clients[-1] == [PROXY_ID]
        mesh.workload(client, "default", "client-2")  # the agent writes a new certificate in place
        wait_until(lambda: "certificates rotated" in proxy.log, what="the rotation in the log")
        asyncio.run(calls(proxy.port, "backend", n=1))  # each call on a new connection (maxRequestsPerConnection)
        assert server.clients[-1] == ["spiffe://cluster.local/ns/default/sa/client-2"]
    finally:
        proxy.stop()
        server.close()


class ALPNProbe:
    """A TLS server that records the protocol it chose by ALPN among `offers` (its own preference order), then
    closes: which names meshproxy offered is read from what it could choose."""

    def __init__(self, certs: Path, offers: tuple[str, ...], roots: Path | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs / "cert-chain.pem", certs / "key.pem")
        if roots is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=str(roots))
        self.context.set_alpn_protocols(list(offers))
        self.chosen: list[str | None] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.chosen.append(tls.selected_alpn_protocol())
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(("mode", "protocol", "server_offers", "chosen"), [
    # ISTIO_MUTUAL, HTTP/2: Istio's ALPN for an in-mesh HTTP/2 cluster (istio-h2 first), h2 for a plain h2 server
    ("ISTIO_MUTUAL", "GRPC", ("istio-h2", "h2", "istio-http/1.1", "http/1.1"), "istio-h2"),
    ("ISTIO_MUTUAL", "GRPC", ("h2", "http/1.1"), "h2"),
    ("ISTIO_MUTUAL", "GRPC", ("istio-http/1.1", "http/1.1"), None),  # nothing HTTP/1.1 for HTTP/2
    # ISTIO_MUTUAL, HTTP/1.1: istio-http/1.1 first, then http/1.1
    ("ISTIO_MUTUAL", "HTTP", ("istio-http/1.1", "istio-h2", "h2", "http/1.1"), "istio-http/1.1"),
    ("ISTIO_MUTUAL", "HTTP", ("h2", "http/1.1"), "http/1.1"),
    # SIMPLE: h2 alone for HTTP/2 (Istio's ALPNH2Only), http/1.1 alone for HTTP/1.1, no istio names
    ("SIMPLE", "GRPC", ("istio-h2", "istio", "http/1.1", "h2"), "h2"),
    ("SIMPLE", "HTTP", ("istio-http/1.1", "istio", "h2", "http/1.1"), "http/1.1"),
    ("MUTUAL", "GRPC", ("istio-h2", "istio", "http/1.1", "h2"), "h2"),  # MUTUAL as SIMPLE, with its certificate
])
def test_what_each_http_connection_offers_by_alpn(mesh: Mesh, backend: Path, tmp_path: Path, mode: str,
                                                  protocol: str, server_offers: tuple[str, ...],
                                                  chosen: str | None) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    probe = ALPNProbe(backend, server_offers, roots=mesh.roots if mode != "SIMPLE" else None)
    tls: dict[str, object] = {"mode": mode}
    if mode != "ISTIO_MUTUAL":
        tls.update(caCertificates=str(mesh.roots), subjectAltNames=[BACKEND_ID])
    if mode == "MUTUAL":
        tls.update(clientCertificate=str(client / "cert-chain.pem"), privateKey=str(client / "key.pem"))
    config = write_config(tmp_path / "config", "c.yaml", service("probe", probe.port, protocol=protocol),
                          rule("probe", {"tls": tls}))
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{proxy.port}/", headers={"Host": "probe"})
        with pytest.raises(urllib.error.HTTPError):  # the probe closes after the handshake: 503
            urllib.request.urlopen(request, timeout=15)
        wait_until(lambda: probe.chosen, what="a handshake at the probe")
        assert probe.chosen[0] == chosen
    finally:
        proxy.stop()
        probe.close()


def test_a_reload_that_changes_the_accepted_identities_retires_http2_connections(mesh: Mesh, backend: Path,
                                                                                 tmp_path: Path) -> None:
    """HTTP/2 connections are long-lived: after a reload that no longer accepts the server's identity, no stream
    goes out on the connection checked under the old settings; the new connection is refused (UF)."""
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEchoServer(backend, roots=mesh.roots)
    folder = tmp_path / "config"
    write_config(folder, "c.yaml", service("backend", server.port, sidecar=True, sans=[BACKEND_ID]))
    proxy = ProxyProcess(folder, args=["--cert-dir", str(client)])
    try:
        asyncio.run(calls(proxy.port, "backend", n=1))
        assert server.calls == 2
        write_config(folder, "c.yaml", service("backend", server.port, sidecar=True,
                                               sans=["spiffe://cluster.local/ns/default/sa/someone-else"]))
        wait_until(lambda: "config version 2 loaded" in proxy.log, what="the reload")
        error = asyncio.run(failing_call(proxy.port, "backend"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls == 2
    finally:
        proxy.stop()
        server.close()


def test_grpc_between_two_meshproxy_sidecars_over_istio_mutual_tls(mesh: Mesh, tmp_path: Path) -> None:
    """grpc.aio -> sidecar A (auto mTLS, HTTP/2 by ALPN offer) -> sidecar B's STRICT inbound -> a grpcio app: each
    side checks the other's identity, and B's metrics see A's."""
    from test_grpc import EchoServer

    a = mesh.workload(tmp_path / "a", "default", "client")
    b = mesh.workload(tmp_path / "b", "default", "backend")
    app = EchoServer()
    inbound = ProxyProcess(write_config(tmp_path / "cb", "c.yaml", service("self", app.port)),
                           args=["--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}", "--cert-dir", str(b),
                                 "--inbound-tls", "STRICT"])
    port = inbound.addresses[f"inbound:{app.port}"][1]
    outbound = ProxyProcess(write_config(tmp_path / "ca", "c.yaml",
                                         service("backend", port, sidecar=True, sans=[BACKEND_ID])),
                            args=["--cert-dir", str(a)])
    try:
        answers, streamed = asyncio.run(calls(outbound.port, "backend"))
        assert answers == [b"echo:m0", b"echo:m1", b"echo:m2"] and streamed == [b"0", b"1", b"2", b"3"]
        lines = [x for x in scrape(inbound) if x.startswith("istio_requests_total{")]
        assert any(f'source_principal="{PROXY_ID}"' in x and 'connection_security_policy="mutual_tls"' in x
                   and 'request_protocol="grpc"' in x for x in lines), lines
        lines = [x for x in scrape(outbound) if x.startswith("istio_requests_total{")]
        assert any(f'destination_principal="{BACKEND_ID}"' in x for x in lines), lines
    finally:
        outbound.stop()
        inbound.stop()
        app.close()
