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

SAN_FAILURE = ("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
               "verify cert failed: verify SAN list:TLS_error_end")
BACKEND_ID = "spiffe://cluster.local/ns/default/sa/backend"
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
        assert s.sni[-1] == "backend.example" and s.seen[-1]["alpn"] is None  # no ALPN for a user's SIMPLE
        assert s.seen[-1]["client_uris"] == []

        status, body = get(proxy.port, "simple-bad")
        assert status == 503
        assert body == ("upstream connect error or disconnect/reset before headers. retried and the latest reset "
                        f"reason: remote connection failure, transport failure reason: {SAN_FAILURE}").encode()
        assert s.sni[-1] == "simple-bad.default.svc.cluster.local"  # Istio's auto SNI: the destination host

        assert get(proxy.port, "mutual-ok")[0] == 200
        assert mu.seen[-1]["client_uris"] == ["spiffe://cluster.local/ns/default/sa/other-client"]

        assert get(proxy.port, "istio-ok")[0] == 200
        assert ist.seen[-1]["client_uris"] == [PROXY_ID]  # the workload certificate from --cert-dir
        assert ist.seen[-1]["alpn"] == "istio-http/1.1"  # what Istio's sidecars offer first
        assert ist.sni[-1] == "outbound_.80_._.istio-ok.default.svc.cluster.local"
        served = len(ist.seen)

        status, body = get(proxy.port, "istio-bad")
        assert status == 503 and SAN_FAILURE.encode() in body
        assert len(ist.seen) == served  # the request never reached the server with the wrong identity

        entries = {e["authority"]: e for e in proxy.access_entries(5, timeout=10)}
        bad = entries["istio-bad"]
        assert bad["response_flags"] == "UF,URX"
        assert bad["response_code_details"] == (
            "upstream_reset_before_response_started{remote_connection_failure|" + SAN_FAILURE.replace(" ", "_") + "}")
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
    )
    proxy = ProxyProcess(config, args=["--cert-dir", str(client)])
    try:
        assert get(proxy.port, "sidecar")[0] == 200
        assert ist.seen[-1]["client_uris"] == [PROXY_ID]
        assert get(proxy.port, "legacy")[0] == 200  # no tlsMode label: plaintext, as Istio
        assert get(proxy.port, "opted-out")[0] == 200  # an explicit DISABLE wins over the label
        assert len(plain.requests) == 2
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
