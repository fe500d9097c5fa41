"""HTTP/2 over mutual TLS on an `--inbound` listener (proxy/secure_server.py): the server selects ALPN `h2` when the
client offers it (Istio's inbound ALPNDownstream: h2, http/1.1) and the connection goes to the HTTP/2 codec, then to
the app in the client's protocol. Real peers: curl --http2 with a client certificate, and grpcio with
ssl_channel_credentials carrying one. The transparent inbound listener is checked the same way in
test_inbound_security_netns.py."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

grpc = pytest.importorskip("grpc", reason="grpcio is not installed")

from h2upstream import H2Upstream  # noqa: E402
from harness import ProxyProcess  # noqa: E402
from tcp_servers import metric  # noqa: E402
from test_grpc import SERVICE, EchoServer  # noqa: E402
from tls_peers import Mesh, make_mesh  # noqa: E402

CURL = shutil.which("curl")
SERVER_NAME = "server.test"  # grpcio checks the server's name: the test certificate carries it beside the SPIFFE id


def server_certs(mesh: Mesh, folder: Path) -> Path:
    """A workload certificate folder for default/server whose certificate also names SERVER_NAME (a DNS SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(mesh.ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/server"),
                x509.DNSName(SERVER_NAME)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(mesh.ca.key, hashes.SHA256()))
    folder.mkdir(parents=True)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (folder / "cert-chain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "root-cert.pem").write_bytes(mesh.ca.root_pem)
    return folder


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return make_mesh(tmp_path)


def inbound(mesh: Mesh, tmp_path: Path, app_port: int) -> tuple[ProxyProcess, int]:
    certs = server_certs(mesh, tmp_path / "server")
    proxy = ProxyProcess(args=["--listen", "off", "--inbound", f"127.0.0.1:0=127.0.0.1:{app_port}",
                               "--cert-dir", str(certs), "--inbound-tls", "STRICT", "--workload", "server"])
    return proxy, proxy.addresses[f"inbound:{app_port}"][1]


@pytest.fixture
def h2app() -> Iterator[H2Upstream]:
    app = H2Upstream("app")
    yield app
    app.close()


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_http2_with_a_client_certificate(mesh: Mesh, tmp_path: Path, h2app: H2Upstream) -> None:
    client = mesh.workload(tmp_path / "sleep", "default", "sleep")
    proxy, port = inbound(mesh, tmp_path, h2app.port)
    try:
        def curl(*args: str) -> tuple[str, str]:
            assert CURL is not None
            done = subprocess.run([CURL, "-sS", "--max-time", "15", "--cacert", str(mesh.roots),
                                   "--cert", str(client / "cert-chain.pem"), "--key", str(client / "key.pem"),
                                   "--resolve", f"{SERVER_NAME}:{port}:127.0.0.1", "-o", "/dev/null",
                                   "-w", "%{http_code} %{http_version}", *args, f"https://{SERVER_NAME}:{port}/echo"],
                                  capture_output=True, text=True, timeout=30)
            return done.stdout, done.stderr
        assert curl("--http2") == ("200 2", "")
        assert h2app.requests[-1]["http_version"] == "2"  # on to the app in the client's protocol
        assert curl("--http1.1") == ("200 1.1", "")
        assert h2app.requests[-1]["http_version"] == "1.1"
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
            text = resp.read().decode()
        assert metric(text, "istio_requests_total", connection_security_policy="mutual_tls",
                      source_principal="spiffe://cluster.local/ns/default/sa/sleep", response_code="200") == 2
    finally:
        assert proxy.stop() == 0


def test_grpcio_over_mutual_tls(mesh: Mesh, tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "sleep", "default", "sleep")
    server = EchoServer()
    proxy, port = inbound(mesh, tmp_path, server.port)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=mesh.roots.read_bytes(),
                                                   private_key=(client / "key.pem").read_bytes(),
                                                   certificate_chain=(client / "cert-chain.pem").read_bytes())
        options = [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.enable_http_proxy", 0)]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as chan:
            unary = chan.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"over mtls", timeout=10) == b"echo:over mtls"
            bidi = chan.stream_stream(f"/{SERVICE}/Bidi")
            assert list(bidi(iter([b"a", b"b", b"c"]), timeout=10)) == [b"A", b"B", b"C"]  # Bidi upper-cases
        # without a client certificate the handshake fails (STRICT)
        anonymous = grpc.ssl_channel_credentials(root_certificates=mesh.roots.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", anonymous, options=options) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                chan.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
            text = resp.read().decode()
        assert metric(text, "istio_requests_total", request_protocol="grpc", connection_security_policy="mutual_tls",
                      source_principal="spiffe://cluster.local/ns/default/sa/sleep") == 2
    finally:
        assert proxy.stop() == 0
        server.close()
