"""Upstream TLS for plain TCP over real sockets, through `--tcp-listener` (no iptables needed): a DestinationRule's
SIMPLE origination and Istio's auto mTLS to TCP services, served by Python TLS servers on loopback that record
what each connection showed (SNI, ALPN chosen, the client's URI SANs, the bytes). The server's identity is checked
before a client byte goes out; a failed handshake closes the client connection with `UF`, the transport failure
reason in the access log; a mutual TLS peer's principal labels the TCP metrics; a rotated workload certificate
serves new connections."""

from __future__ import annotations

import hashlib
import random
import socket
import ssl
import struct
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from google.protobuf import any_pb2, struct_pb2

from harness import ProxyProcess, write_config
from tcp_servers import exchange, metric
from tls_peers import Mesh, make_mesh
from waiting import wait_until

VIP = "10.77.0.9"
BACKEND_ID = "spiffe://cluster.local/ns/default/sa/backend"
PROXY_ID = "spiffe://cluster.local/ns/default/sa/client"
SAN_FAILURE = ("TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify_cert_failed:_SAN_"
               f"matcher,_certificate_SANs_are_[{BACKEND_ID}]:TLS_error_end")


def read_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed in a metadata exchange header")
        data += chunk
    return data


def mx_header(node_id: str) -> bytes:
    """An Istio sidecar's TCP metadata exchange header (istio/proxy metadata_exchange.cc: magic, size, Any(Struct)),
    made here with protobuf alone."""
    data = struct_pb2.Struct()
    data.fields["x-envoy-peer-metadata-id"].string_value = node_id
    data.fields["x-envoy-peer-metadata"].struct_value.update({"NAME": "backend-0", "NAMESPACE": "default"})
    blob = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Struct", value=data.SerializeToString())
    payload = blob.SerializeToString()
    return struct.pack(">II", 0x3D230467, len(payload)) + payload


class TLSEcho:
    """A TLS server answering each read with `<client URI SANs>|<bytes>`, recording each connection's SNI, chosen
    ALPN, client URI SANs and the bytes it received. `offers`: its ALPN names (its preference order). When ALPN chose
    `istio-peer-exchange` it speaks Istio's TCP metadata exchange first, as an Istio sidecar's inbound: reads the
    client's header (recording its node id and NAME) and writes its own, before any application byte."""

    def __init__(self, certs: Path, roots: Path | None = None, offers: tuple[str, ...] = ()) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs / "cert-chain.pem", certs / "key.pem")
        if roots is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=str(roots))
        if offers:
            self.context.set_alpn_protocols(list(offers))
        self.sni: list[str | None] = []
        self.context.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)  # type: ignore[func-returns-value]
        self.seen: list[dict[str, Any]] = []  # connections whose handshake completed
        self.ended = 0  # connections over, whatever their handshake did
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                cert = tls.getpeercert()
                seen: dict[str, Any] = {
                    "alpn": tls.selected_alpn_protocol(), "data": b"",
                    "client_uris": [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]}
                self.seen.append(seen)
                if seen["alpn"] == "istio-peer-exchange":
                    magic, size = struct.unpack(">II", read_exactly(tls, 8))
                    assert magic == 0x3D230467
                    envelope, data = any_pb2.Any(), struct_pb2.Struct()
                    envelope.ParseFromString(read_exactly(tls, size))
                    data.ParseFromString(envelope.value)
                    seen["peer_id"] = data.fields["x-envoy-peer-metadata-id"].string_value
                    seen["peer_name"] = data.fields["x-envoy-peer-metadata"].struct_value.fields["NAME"].string_value
                    tls.sendall(mx_header("sidecar~127.0.0.1~backend-0.default~default.svc.cluster.local"))
                prefix = ",".join(seen["client_uris"]).encode() + b"|"
                while data := tls.recv(65536):
                    seen["data"] += data
                    tls.sendall(prefix + data)
                if seen["data"].endswith(b"EOF"):  # a client that half-closed: answered after its end
                    tls.sendall(b"|bye")
                elif seen["data"].startswith(b"DIGEST"):
                    tls.sendall(b"|" + hashlib.sha256(seen["data"]).hexdigest().encode())
        except (OSError, ssl.SSLError):
            conn.close()
        finally:
            self.ended += 1

    def close(self) -> None:
        self.sock.close()


def tcp_service(name: str, port: int, endpoint: int, *, sidecar: bool = False, sans: list[str] | None = None) -> str:
    labels = "{security.istio.io/tlsMode: istio}" if sidecar else "{}"
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  ports: [{{number: {port}, name: main, protocol: TCP}}]
  resolution: STATIC
  subjectAltNames: {sans or []}
  endpoints: [{{address: 127.0.0.1, ports: {{main: {endpoint}}}, labels: {labels}}}]
"""


def simple_rule(name: str, roots: Path, **extra: object) -> str:
    more = "".join(f"\n      {k}: {v}" for k, v in extra.items())
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {name}.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {roots}{more}
"""


def start(tmp_path: Path, port: int, *docs: str, cert_dir: Path | None = None) -> tuple[ProxyProcess, int]:
    config = write_config(tmp_path / "config", "tcp.yaml", *docs)
    args = ["--listen", "off", "--tcp-listener", f"127.0.0.1:0={VIP}:{port}"]
    if cert_dir is not None:
        args += ["--cert-dir", str(cert_dir)]
    proxy = ProxyProcess(config, args=args)
    return proxy, proxy.addresses[f"tcp:{VIP}:{port}"][1]


def talk(port: int, data: bytes) -> bytes:
    """Send `data`, read the server's answer to it (b"" when the proxy closed the connection instead)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        try:
            conn.sendall(data)
            answer = b""
            while not answer.endswith(data):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer
        except (ConnectionResetError, BrokenPipeError):
            return b""


def scrape(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return make_mesh(tmp_path)


@pytest.fixture
def backend(mesh: Mesh, tmp_path: Path) -> Path:
    return mesh.workload(tmp_path / "backend", "default", "backend")


def test_simple_tls_origination_for_tcp(mesh: Mesh, backend: Path, tmp_path: Path) -> None:
    """SIMPLE to a TCP service: no ALPN (no HTTP pool sets one), `sni` and `subjectAltNames` as the rule says;
    without them no SNI and no name check (Envoy's auto SNI and auto SAN validation are HTTP options), the chain
    still verified."""
    server = TLSEcho(backend, offers=("istio", "http/1.1", "h2"))
    proxy, port = start(tmp_path, 7100, tcp_service("db", 7100, server.port),
                        simple_rule("db", mesh.roots, sni="db.example", subjectAltNames=f"[{BACKEND_ID}]"))
    try:
        assert talk(port, b"select 1;") == b"|select 1;"  # no client certificate
        assert server.seen[-1]["alpn"] is None and server.sni[-1] == "db.example"
    finally:
        proxy.stop()

    proxy, port = start(tmp_path, 7100, tcp_service("db", 7100, server.port), simple_rule("db", mesh.roots))
    try:
        assert talk(port, b"ping") == b"|ping"
        assert server.sni[-1] is None
    finally:
        proxy.stop()

    proxy, port = start(tmp_path, 7100, tcp_service("db", 7100, server.port),
                        simple_rule("db", mesh.roots, subjectAltNames=f"[{BACKEND_ID}-not]"))
    try:
        ended = server.ended
        assert talk(port, b"secret") == b""
        wait_until(lambda: server.ended > ended, what="the refused connection over at the server")
        assert all(b"secret" not in seen["data"] for seen in server.seen)  # refused before a client byte went out
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_flags"] == "UF" and entry["bytes_sent"] == 0
        assert entry["upstream_transport_failure_reason"] == SAN_FAILURE
    finally:
        proxy.stop()
        server.close()


def test_auto_mtls_to_a_tcp_sidecar_checks_its_identity_and_labels_the_metrics(mesh: Mesh, backend: Path,
                                                                              tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEcho(backend, roots=mesh.roots, offers=("istio", "http/1.1"))
    proxy, port = start(tmp_path, 7200, tcp_service("db", 7200, server.port, sidecar=True, sans=[BACKEND_ID]),
                        cert_dir=client)
    try:
        assert talk(port, b"hello") == PROXY_ID.encode() + b"|hello"  # our workload certificate
        assert server.seen[-1]["alpn"] == "istio"  # Istio's in-mesh ALPN
        # half-close through TLS, as Envoy's: the client's EOF is close_notify to the server, whose answer still
        # comes back (the server answers after it saw the end)
        assert exchange(port, b"then EOF") == PROXY_ID.encode() + b"|then EOF" + b"|bye"
        assert server.sni[-1] == "outbound_.7200_._.db.default.svc.cluster.local"
        labels = {"reporter": "source", "destination_service_name": "db", "response_flags": "-",
                  "source_principal": PROXY_ID, "destination_principal": BACKEND_ID}
        text = wait_until(lambda: (t := scrape(proxy)) and metric(t, "istio_tcp_connections_closed_total", **labels)
                          == 2 and t, what="the connections counted closed")
        assert metric(text, "istio_tcp_connections_opened_total", **labels) == 2
        assert metric(text, "istio_tcp_received_bytes_total", **labels) == 5 + 8
    finally:
        proxy.stop()

    # a certificate for another service account than the service's: closed, UF, nothing sent
    proxy, port = start(tmp_path, 7200, tcp_service("db", 7200, server.port, sidecar=True,
                                                    sans=["spiffe://cluster.local/ns/default/sa/someone-else"]),
                        cert_dir=client)
    try:
        ended = server.ended
        assert talk(port, b"secret") == b""
        wait_until(lambda: server.ended > ended, what="the refused connection over at the server")
        assert all(b"secret" not in seen["data"] for seen in server.seen)  # refused before a client byte went out
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_flags"] == "UF"
        assert entry["upstream_transport_failure_reason"] == SAN_FAILURE
        text = scrape(proxy)
        assert metric(text, "istio_tcp_connections_opened_total", response_flags="UF",
                      destination_service_name="db", destination_principal="unknown") == 1
    finally:
        proxy.stop()
        server.close()


def test_a_rotated_workload_certificate_serves_new_tcp_connections(mesh: Mesh, backend: Path,
                                                                  tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEcho(backend, roots=mesh.roots)
    proxy, port = start(tmp_path, 7300, tcp_service("db", 7300, server.port, sidecar=True), cert_dir=client)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as kept:  # an open connection...
            kept.sendall(b"a")
            assert kept.recv(100) == PROXY_ID.encode() + b"|a"
            mesh.workload(client, "default", "client-2")
            wait_until(lambda: "certificates rotated" in proxy.log, what="the rotation in the log")
            assert talk(port, b"b") == b"spiffe://cluster.local/ns/default/sa/client-2|b"  # new: the new one
            kept.sendall(b"c")
            assert kept.recv(100) == PROXY_ID.encode() + b"|c"  # ... keeps its own
    finally:
        proxy.stop()
        server.close()


def test_istios_tcp_metadata_exchange_when_the_peer_chooses_it(mesh: Mesh, backend: Path, tmp_path: Path) -> None:
    """An Istio sidecar's inbound chooses `istio-peer-exchange` (offered first, as Istio's ALPNInMeshWithMxc): then
    each side writes its metadata header before any application byte, and only the bytes after the server's reach
    the client."""
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEcho(backend, roots=mesh.roots, offers=("istio-peer-exchange", "istio"))
    proxy, port = start(tmp_path, 7400, tcp_service("db", 7400, server.port, sidecar=True, sans=[BACKEND_ID]),
                        cert_dir=client)
    try:
        assert talk(port, b"hello") == PROXY_ID.encode() + b"|hello"  # nothing of the server's header
        seen = server.seen[-1]
        assert seen["alpn"] == "istio-peer-exchange" and seen["data"] == b"hello"  # our header came off first
        assert seen["peer_id"].startswith("sidecar~") and seen["peer_name"]
        # the server's metadata labels the TCP metrics, as Istio's do after the exchange
        labels = {"reporter": "source", "destination_workload": "backend-0", "destination_workload_namespace":
                  "default", "destination_principal": BACKEND_ID, "response_flags": "-"}
        text = wait_until(lambda: (t := scrape(proxy)) and metric(t, "istio_tcp_connections_closed_total", **labels)
                          and t, what="the connection counted closed")
        assert metric(text, "istio_tcp_connections_opened_total", **labels) == 1
        assert metric(text, "istio_tcp_received_bytes_total", **labels) == 5
        assert metric(text, "istio_tcp_sent_bytes_total", **labels) == len(PROXY_ID) + 6  # not the header
    finally:
        proxy.stop()
        server.close()


def test_a_large_transfer_both_ways_over_tls_with_backpressure(mesh: Mesh, backend: Path, tmp_path: Path) -> None:
    """8 MiB through TLS both ways, the client half-closing: every byte arrives in order (the server echoes each
    read, then sends the digest of all it received once it has seen the end)."""
    client = mesh.workload(tmp_path / "client", "default", "client")
    server = TLSEcho(backend, roots=mesh.roots)
    proxy, port = start(tmp_path, 7500, tcp_service("db", 7500, server.port, sidecar=True), cert_dir=client)
    try:
        payload = b"DIGEST" + random.Random(17).randbytes(8 << 20)
        answer = bytearray()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            def send() -> None:
                for i in range(0, len(payload), 1 << 16):
                    conn.sendall(payload[i:i + (1 << 16)])
                conn.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=send)
            writer.start()
            while chunk := conn.recv(1 << 16):
                answer += chunk
            writer.join(60)
        prefix = PROXY_ID.encode() + b"|"
        digest = b"|" + hashlib.sha256(payload).hexdigest().encode()
        assert answer.endswith(digest)
        assert bytes(answer[:-len(digest)]).replace(prefix, b"") == payload  # each echoed read carries the prefix
    finally:
        proxy.stop()
        server.close()
