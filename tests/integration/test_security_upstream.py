"""Upstream TLS over real sockets: a meshproxy sidecar originating TLS to TLS servers on loopback, as a
DestinationRule's `tls` says (SIMPLE, MUTUAL, ISTIO_MUTUAL) and as Istio's auto mTLS does, with the server's
identity checked; a wrong one is Envoy's 503 UF with its TLS transport failure reason."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ProxyProcess, Upstream, write_config
from tls_peers import Mesh, TLSUpstream, make_mesh, server_context

BACKEND_ID = "spiffe://cluster.local/ns/default/sa/backend"
# Envoy 1.40's transport failure reason for a certificate whose SANs are not the expected ones (see
# test_security_envoy.py, where Envoy itself says it)
SAN_FAILURE = ("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
               f"verify cert failed: SAN matcher, certificate SANs are [{BACKEND_ID}]:TLS_error_end")
RESET = b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: " \
    b"remote connection failure"
PROXY_ID = "spiffe://cluster.local/ns/default/sa/client"


def entry(name: str, port: int, labels: dict[str, str] | None = None, sans: list[str] | None = None) -> str:
    spec: dict[str, object] = {
        "hosts": [f"{name}.default.svc.cluster.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "labels": labels or {}}],
    }
    if sans:
        spec["subjectAltNames"] = sans
    return "---\n" + json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                                 "metadata": {"name": name, "namespace": "default"}, "spec": spec}) + "\n"


def rule(name: str, tls: dict[str, object]) -> str:
    return "---\n" + json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                                 "metadata": {"name": name, "namespace": "default"},
                                 "spec": {"host": name, "trafficPolicy": {"tls": tls}}}) + "\n"


def get(port: int, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/echo", headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return make_mesh(tmp_path)


@pytest.fixture
def servers(mesh: Mesh, tmp_path: Path) -> Iterator[dict[str, Upstream]]:
    backend = mesh.workload(tmp_path / "backend", "default", "backend")
    made = {
        "simple": TLSUpstream("simple", server_context(backend)),
        "mutual": TLSUpstream("mutual", server_context(backend, client_roots=mesh.roots)),
        "istio": TLSUpstream("istio", server_context(backend, client_roots=mesh.roots,
                                                     alpn=("istio-http/1.1", "http/1.1"))),
        "plain": Upstream("plain"),
    }
    yield made
    for server in made.values():
        server.close()


def test_simple_mutual_and_istio_mutual_with_right_and_wrong_sans(mesh: Mesh, servers: dict[str, Upstream],
                                                                  tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")  # the sidecar's own identity
    other = mesh.workload(tmp_path / "other", "default", "other-client")  # MUTUAL's client certificate
    s, mu, ist = servers["simple"], servers["mutual"], servers["istio"]
    config = write_config(
        tmp_path / "config", "c.yaml",
        entry("simple-ok", s.port), rule("simple-ok", {"mode": "SIMPLE", "caCertificates": str(mesh.roots),
                                                        "sni": "backend.example", "subjectAltNames": [BACKEND_ID]}),
        entry("simple-bad", s.port), rule("simple-bad", {"mode": "SIMPLE", "caCertificates": str(mesh.roots),
                                                          "subjectAltNames": [BACKEND_ID + "-not"]}),
        entry("simple-auto", s.port), rule("simple-auto", {"mode": "SIMPLE", "caCertificates": str(mesh.roots)}),
        entry("untrusted", s.port), rule("untrusted", {"mode": "SIMPLE", "sni": "backend.example"}),
        entry("mutual-ok", mu.port), rule("mutual-ok", {
            "mode": "MUTUAL", "caCertificates": str(mesh.roots), "subjectAltNames": [BACKEND_ID],
            "clientCertificate": str(other / "cert-chain.pem"), "privateKey": str(other / "key.pem")}),
        entry("istio-ok", ist.port, sans=[BACKEND_ID]), rule("istio-ok", {"mode": "ISTIO_MUTUAL"}),
        entry("istio-bad", ist.port, sans=["spiffe://cluster.local/ns/default/sa/someone-else"]),
        rule("istio-bad", {"mode": "ISTIO_MUTUAL"}),
    )
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        assert get(proxy.port, "simple-ok")[0] == 200
        # a user's SIMPLE offers `http/1.1` only (Envoy's HTTP/1.1 pool fallback; no `istio` names)
        assert s.sni[-1] == "backend.example" and s.seen[-1]["alpn"] == "http/1.1"
        assert s.seen[-1]["client_uris"] == []

        assert get(proxy.port, "simple-bad") == (503, RESET)
        assert s.sni[-1] == "simple-bad.default.svc.cluster.local"  # Istio's auto SNI: the destination host
        # ... and auto SAN validation: the certificate (a SPIFFE id only) is not valid for that host
        assert get(proxy.port, "simple-auto") == (503, RESET)

        assert get(proxy.port, "mutual-ok")[0] == 200
        assert mu.seen[-1]["client_uris"] == ["spiffe://cluster.local/ns/default/sa/other-client"]

        assert get(proxy.port, "istio-ok")[0] == 200
        assert ist.seen[-1]["client_uris"] == [PROXY_ID]  # the workload certificate from --cert-dir
        assert ist.seen[-1]["alpn"] == "istio-http/1.1"  # what Istio's sidecars offer first
        assert ist.sni[-1] == "outbound_.80_._.istio-ok.default.svc.cluster.local"
        served = len(ist.seen)

        assert get(proxy.port, "istio-bad") == (503, RESET)
        assert len(ist.seen) == served  # the request never reached the server with the wrong identity
        assert get(proxy.port, "untrusted") == (503, RESET)  # the system roots do not know the mesh's

        entries = {e["authority"]: e for e in proxy.access_entries(7, timeout=10)}
        for name in ("istio-bad", "simple-bad", "simple-auto"):
            assert entries[name]["response_flags"] == "UF,URX"
            assert entries[name]["response_code_details"] == (
                "upstream_reset_before_response_started{remote_connection_failure|" + SAN_FAILURE.replace(" ", "_")
                + "}")
        # Istio's log format has it, spaces as underscores as Envoy writes it
        assert entries["istio-bad"]["upstream_transport_failure_reason"] == SAN_FAILURE.replace(" ", "_")
        assert entries["untrusted"]["response_code_details"] == (
            "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|268435581:SSL_routines:"
            "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify_cert_failed:_X509_verify_cert:_certificate_verification"
            "_error_at_depth_0:_unable_to_get_local_issuer_certificate:TLS_error_end}")
        assert "TLS origination is not implemented" not in proxy.log
    finally:
        proxy.stop()


def test_auto_mtls_to_sidecars_plaintext_to_the_rest(mesh: Mesh, servers: dict[str, Upstream],
                                                      tmp_path: Path) -> None:
    client = mesh.workload(tmp_path / "client", "default", "client")
    ist, plain = servers["istio"], servers["plain"]
    config = write_config(
        tmp_path / "config", "c.yaml",
        entry("sidecar", ist.port, labels={"security.istio.io/tlsMode": "istio"}),
        entry("legacy", plain.port),
        entry("opted-out", plain.port, labels={"security.istio.io/tlsMode": "istio"}),
        rule("opted-out", {"mode": "DISABLE"}),
        entry("mislabelled", plain.port, labels={"security.istio.io/tlsMode": "istio"}),
    )
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        assert get(proxy.port, "sidecar")[0] == 200
        assert ist.seen[-1]["client_uris"] == [PROXY_ID]
        assert get(proxy.port, "legacy")[0] == 200  # no tlsMode label: plaintext, as Istio
        assert get(proxy.port, "opted-out")[0] == 200  # an explicit DISABLE wins over the label
        assert len(plain.requests) == 2
        # labelled as a sidecar but plaintext: the handshake meets an HTTP answer, as Envoy words it
        assert get(proxy.port, "mislabelled")[0] == 503
        entry_of = {e["authority"]: e for e in proxy.access_entries(4, timeout=10)}["mislabelled"]
        assert entry_of["response_code_details"] == (
            "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|268435703:SSL_routines:"
            "OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end}")
    finally:
        proxy.stop()


def test_auto_mtls_needs_a_cert_dir(servers: dict[str, Upstream], tmp_path: Path) -> None:
    """Without workload certificates there is no auto mTLS: a sidecar-labelled endpoint gets plaintext."""
    plain = servers["plain"]
    config = write_config(tmp_path / "config", "c.yaml",
                          entry("sidecar", plain.port, labels={"security.istio.io/tlsMode": "istio"}))
    proxy = ProxyProcess(config)
    try:
        assert get(proxy.port, "sidecar")[0] == 200
    finally:
        proxy.stop()


def test_bad_tls_settings_are_load_errors_that_name_the_field(mesh: Mesh, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config", "c.yaml", entry("x", 1),
        rule("x", {"mode": "SIMPLE", "caCertificates": str(tmp_path / "missing.pem")}),
        entry("y", 1), rule("y", {"mode": "ISTIO_MUTUAL"}),
    )
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--listen", "127.0.0.1:0",
                           "--admin", "off"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{config}:1: spec.trafficPolicy.tls.caCertificates: {tmp_path / 'missing.pem'}: missing" in done.stderr
    assert f"{config}:3: spec.trafficPolicy.tls.mode: tls mode ISTIO_MUTUAL needs the workload certificates" \
        in done.stderr


def test_a_rules_certificate_files_rotate_for_new_connections(mesh: Mesh, servers: dict[str, Upstream],
                                                             tmp_path: Path) -> None:
    """MUTUAL's clientCertificate / privateKey are watched as the workload certificates are: rewritten files serve
    the next new connections; files that do not load leave the last good ones in use, and the log names them."""
    from waiting import wait_until

    mu = servers["mutual"]
    files = mesh.workload(tmp_path / "files", "default", "first")
    config = write_config(tmp_path / "config", "c.yaml", entry("mutual", mu.port), rule("mutual", {
        "mode": "MUTUAL", "caCertificates": str(mesh.roots), "subjectAltNames": [BACKEND_ID],
        "clientCertificate": str(files / "cert-chain.pem"), "privateKey": str(files / "key.pem")}))
    proxy = ProxyProcess(config, args=["--upstream-idle-timeout", "0.05"])  # each request on a new connection
    try:
        assert get(proxy.port, "mutual")[0] == 200
        assert mu.seen[-1]["client_uris"] == ["spiffe://cluster.local/ns/default/sa/first"]
        mesh.workload(files, "default", "second")
        wait_until(lambda: get(proxy.port, "mutual")[0] == 200
                   and mu.seen[-1]["client_uris"] == ["spiffe://cluster.local/ns/default/sa/second"],
                   what="the rotated client certificate in use", interval=0.3)  # idle connections expire
        (files / "key.pem").write_text("not a key\n")
        wait_until(lambda: get(proxy.port, "mutual")[0] == 200
                   and f"rotated TLS files rejected: {files / 'key.pem'}" in proxy.log, what="the rejection logged",
                   interval=0.3)
        assert get(proxy.port, "mutual")[0] == 200
        assert mu.seen[-1]["client_uris"] == ["spiffe://cluster.local/ns/default/sa/second"]
    finally:
        proxy.stop()
