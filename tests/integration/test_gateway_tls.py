"""The ingress gateway terminates TLS as an Istio Gateway's servers say (issue #16), over real sockets with curl and
Python's ssl as clients: Istio's secure-ingress task (SIMPLE with credentialName, two hosts by SNI, MUTUAL),
httpsRedirect, certificate rotation for new connections, and bad files as load errors naming file and field."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from harness import REPO, ProxyProcess, Upstream, service_entry, write_config
from server_certs import TestCA, write_secret
from tls_peers import make_mesh
from waiting import wait_until

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

# Istio's docs, "Secure Gateways" (tasks/traffic-management/ingress/secure-ingress): the Gateway and VirtualService
# of "Configure a TLS ingress gateway for a single host", unchanged but for the port mapping given on the command line.
SECURE_INGRESS = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential # must be the same as secret
    hosts:
    - httpbin.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "httpbin.example.com"
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        prefix: /status
    - uri:
        prefix: /delay
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
"""

# "Configure a TLS ingress gateway for multiple hosts": a second server and VirtualService for helloworld.
HELLOWORLD = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway # use istio default ingress gateway
  servers:
  - port:
      number: 443
      name: https-httpbin
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
  - port:
      number: 443
      name: https-helloworld
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: helloworld-credential
    hosts:
    - helloworld.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: helloworld
spec:
  hosts:
  - helloworld.example.com
  gateways:
  - mygateway
  http:
  - match:
    - uri:
        exact: /hello
    route:
    - destination:
        host: helloworld
        port:
          number: 5000
"""


def services(upstream: Upstream) -> str:
    return (service_entry("httpbin", [(upstream.port, {})], port=8000)
            + service_entry("helloworld", [(upstream.port, {})], port=5000))


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


def gateway(config: Path, credentials: Path, *extra: str) -> ProxyProcess:
    return ProxyProcess(config, args=["--gateway", "mygateway", "--namespace", "istio-system",
                                      "--label", "istio=ingressgateway", "--listen", "off",
                                      "--gateway-port", "443=127.0.0.1:0", "--credentials-dir", str(credentials),
                                      *extra])


def curl(port: int, host: str, path: str, cacert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "15",
                           "--cacert", str(cacert), "--resolve", f"{host}:{port}:127.0.0.1", *args,
                           f"https://{host}:{port}{path}"], capture_output=True, text=True, timeout=30)


def served_certificate(port: int, server_name: str | None, roots: bytes) -> x509.Certificate:
    """The certificate the gateway presents for an SNI (verified against `roots`, host name included)."""
    context = ssl.create_default_context(cadata=roots.decode())
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def https_get(port: int, host: str, path: str, roots: bytes, client: tuple[Path, Path] | None = None
              ) -> tuple[int, bytes]:
    context = ssl.create_default_context(cadata=roots.decode())
    if client is not None:
        context.load_cert_chain(*client)
    conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)  # connected below: SNI `host`
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=host)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


@pytest.fixture
def upstream_app() -> Iterator[Upstream]:
    server = Upstream("httpbin")
    yield server
    server.close()


@needs_curl
def test_simple_tls_serves_istio_secure_ingress(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)))
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), SECURE_INGRESS)
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        done = curl(port, "httpbin.example.com", "/status/418", tmp_path / "ca.crt",
                    "-H", "x-forwarded-proto: http", "-H", "x-forwarded-for: 203.0.113.7")
        assert done.stdout == "418", done.stderr
        assert upstream_app.requests[-1]["path"] == "/status/418"
        # Envoy at the edge: the scheme of the client's connection, whatever the client said
        assert [v for k, v in upstream_app.requests[-1]["headers"] if k.lower() == b"x-forwarded-proto"] == [b"https"]
        # and the client's address appended to x-forwarded-for (use_remote_address, as istiod sets it for gateways)
        assert [v for k, v in upstream_app.requests[-1]["headers"] if k.lower() == b"x-forwarded-for"] == \
            [b"203.0.113.7, 127.0.0.1"]
        # a host the port's servers do not name: 404 NR (no virtual host), though its certificate is refused first
        # by curl; Python's client without host check shows the route side
        status, _ = https_get(port, "httpbin.example.com", "/headers", ca.pem)
        assert status == 404  # the VirtualService routes /status and /delay only
        entries = proxy.access_entries(2)
        assert entries[0]["requested_server_name"] == "httpbin.example.com"
        assert entries[0]["response_code"] == 418
        assert entries[1]["response_flags"] == "NR"
        # plaintext on the TLS port: no HTTP answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /status/200 HTTP/1.1\r\nHost: httpbin.example.com\r\n\r\n")
            assert not sock.recv(100).startswith(b"HTTP/")
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=10) as resp:
            lines = [l for l in resp.read().decode().splitlines() if l.startswith("istio_requests_total{")]
        # as an Istio gateway reports (reporter source): the client TLS it terminated is no mesh mTLS
        assert any('response_code="418"' in l and 'destination_service_name="httpbin"' in l and 'reporter="source"' in l
                   and 'connection_security_policy="unknown"' in l for l in lines), lines
    finally:
        assert proxy.stop() == 0


def test_sni_picks_the_server_and_its_certificate(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    httpbin = ca.issue("httpbin.example.com", ("httpbin.example.com",))
    hello = ca.issue("helloworld.example.com", ("helloworld.example.com",))
    write_secret(credentials / "httpbin-credential", httpbin)
    write_secret(credentials / "helloworld-credential", hello, generic=True)  # Istio's generic secret keys
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), HELLOWORLD,
                          "---\n" + SECURE_INGRESS.split("---\n", 2)[2])
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        assert served_certificate(port, "httpbin.example.com", ca.pem).serial_number == httpbin.serial
        assert served_certificate(port, "helloworld.example.com", ca.pem).serial_number == hello.serial
        assert https_get(port, "helloworld.example.com", "/hello", ca.pem)[0] == 200
        assert https_get(port, "httpbin.example.com", "/status/200", ca.pem)[0] == 200
        # each port serves its servers' hosts only: helloworld's route is not reached through httpbin's name
        assert https_get(port, "httpbin.example.com", "/hello", ca.pem)[0] == 404
        # no server names "*": an unknown SNI, or none, finds no filter chain (Envoy closes the connection)
        for name in ("other.example.com", None):
            with pytest.raises(ssl.SSLError):
                served_certificate(port, name, ca.pem)
    finally:
        assert proxy.stop() == 0


MUTUAL = SECURE_INGRESS.replace("mode: SIMPLE", "mode: MUTUAL")


@needs_curl
def test_mutual_requires_a_client_certificate_signed_by_the_ca(tmp_path: Path, ca: TestCA,
                                                               upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)),
                 ca=ca.pem)
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    client = ca.issue("client.example.com", client=True)
    (tmp_path / "client.crt").write_bytes(client.cert)
    (tmp_path / "client.key").write_bytes(client.key)
    stranger = TestCA("another root").issue("client.example.com", client=True)
    (tmp_path / "stranger.crt").write_bytes(stranger.cert)
    (tmp_path / "stranger.key").write_bytes(stranger.key)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), MUTUAL)
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        without = curl(port, "httpbin.example.com", "/status/418", tmp_path / "ca.crt")
        assert without.stdout == "000", without  # refused: the handshake wants a certificate
        other = curl(port, "httpbin.example.com", "/status/418", tmp_path / "ca.crt",
                     "--cert", str(tmp_path / "stranger.crt"), "--key", str(tmp_path / "stranger.key"))
        assert other.stdout == "000", other  # a certificate the CA did not sign
        done = curl(port, "httpbin.example.com", "/status/418", tmp_path / "ca.crt",
                    "--cert", str(tmp_path / "client.crt"), "--key", str(tmp_path / "client.key"))
        assert done.stdout == "418", done.stderr
        assert len(upstream_app.requests) == 1
    finally:
        assert proxy.stop() == 0


REDIRECT = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - httpbin.example.com
    tls:
      httpsRedirect: true # sends 301 redirect for http requests
  - port:
      number: 443
      name: https-443
      protocol: HTTPS
    hosts:
    - httpbin.example.com
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
"""


def test_https_redirect_answers_301_with_the_https_location(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)))
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), REDIRECT,
                          "---\n" + SECURE_INGRESS.split("---\n", 2)[2])
    proxy = gateway(config, credentials, "--gateway-port", "80=127.0.0.1:0")
    try:
        port = proxy.addresses["gateway:80"][1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/status/200?x=1", headers={"host": "httpbin.example.com"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 301
        assert resp.getheader("location") == "https://httpbin.example.com/status/200?x=1"
        conn.request("GET", "/status/200", headers={"host": "other.example.com"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404  # not a host of the port's servers
        conn.close()
        assert not upstream_app.requests
        tls_port = proxy.addresses["gateway:443"][1]
        assert https_get(tls_port, "httpbin.example.com", "/status/200", ca.pem)[0] == 200
    finally:
        assert proxy.stop() == 0


def test_rotated_certificate_serves_new_connections(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    first = ca.issue("httpbin.example.com", ("httpbin.example.com",))
    write_secret(credentials / "httpbin-credential", first)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), SECURE_INGRESS)
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        context = ssl.create_default_context(cadata=ca.pem.decode())
        old = http.client.HTTPSConnection("httpbin.example.com", port, timeout=10, context=context)
        old.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                       server_hostname="httpbin.example.com")
        old.request("GET", "/status/200")
        assert old.getresponse().read() is not None
        second = ca.issue("httpbin.example.com", ("httpbin.example.com",))
        write_secret(credentials / "httpbin-credential", second)
        wait_until(lambda: served_certificate(port, "httpbin.example.com", ca.pem).serial_number == second.serial,
                   what="the rotated certificate on new connections")
        old.request("GET", "/status/201")  # the open connection keeps its session
        resp = old.getresponse()
        resp.read()
        assert resp.status == 201
        old.close()
        # a rotation to a key that does not match keeps the running certificate (and says so)
        broken = ca.issue("httpbin.example.com", ("httpbin.example.com",))
        (credentials / "httpbin-credential" / "tls.crt").write_bytes(broken.cert)
        wait_until(lambda: "rotated certificates rejected" in proxy.log, what="the rejected rotation logged")
        assert served_certificate(port, "httpbin.example.com", ca.pem).serial_number == second.serial
    finally:
        assert proxy.stop() == 0


def test_a_bad_certificate_file_is_a_load_error_naming_file_and_field(tmp_path: Path, ca: TestCA,
                                                                       upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    folder = write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)))
    (folder / "tls.key").write_text("not a key\n")
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), SECURE_INGRESS)
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "off", "--gateway", "mygateway", "--gateway-port", "443=127.0.0.1:0",
                          "--credentials-dir", str(credentials)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert f"gw.yaml:2: spec.servers[0].tls.credentialName: {folder / 'tls.key'}: not an unencrypted PEM private key" \
        in run.stderr, run.stderr

    # the same at a reload: the running config and certificates stay
    good = ca.issue("httpbin.example.com", ("httpbin.example.com",))
    write_secret(folder, good)
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        files = SECURE_INGRESS.replace("credentialName: httpbin-credential # must be the same as secret",
                                       f"serverCertificate: {tmp_path / 'missing.crt'}\n"
                                       f"      privateKey: {folder / 'tls.key'}")
        write_config(tmp_path / "config", "gw.yaml", services(upstream_app), files)
        wait_until(lambda: "config rejected" in proxy.log, what="the reload rejected")
        assert f"spec.servers[0].tls.serverCertificate: {tmp_path / 'missing.crt'}: missing" in proxy.log
        assert served_certificate(port, "httpbin.example.com", ca.pem).serial_number == good.serial
        assert https_get(port, "httpbin.example.com", "/status/200", ca.pem)[0] == 200
    finally:
        assert proxy.stop() == 0


def test_istio_bookinfo_gateway_on_its_own_port(tmp_path: Path, upstream_app: Upstream) -> None:
    """Istio's bookinfo-gateway.yaml (samples/bookinfo/networking) unchanged: its plaintext port 8080."""
    config = write_config(tmp_path / "config", "services.yaml", service_entry("productpage", [(upstream_app.port, {})]))
    proxy = ProxyProcess(config, REPO / "config" / "bookinfo" / "bookinfo-gateway.yaml",
                         args=["--gateway", "bookinfo-gateway", "--listen", "off",
                               "--gateway-port", "8080=127.0.0.1:0"])
    try:
        port = proxy.addresses["gateway:8080"][1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for path, status in (("/productpage", 200), ("/api/v1/products/0", 200), ("/admin", 404)):
            conn.request("GET", path, headers={"host": "bookinfo.example.com"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status, path
        conn.close()
        assert [r["path"] for r in upstream_app.requests] == ["/productpage", "/api/v1/products/0"]
    finally:
        assert proxy.stop() == 0


OPTIONAL = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 443, name: https-httpbin, protocol: HTTPS}
    hosts: [httpbin.example.com]
    tls: {mode: OPTIONAL_MUTUAL, credentialName: httpbin-credential}
  - port: {number: 443, name: https-default, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: OPTIONAL_MUTUAL, credentialName: default-credential}
"""


def test_optional_mutual_and_the_default_server_for_other_names(tmp_path: Path, ca: TestCA,
                                                                upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    httpbin = ca.issue("httpbin.example.com", ("httpbin.example.com",))
    fallback = ca.issue("default.example.com", ("*.example.com",))
    write_secret(credentials / "httpbin-credential", httpbin, ca=ca.pem)
    write_secret(credentials / "default-credential", fallback, ca=ca.pem)
    client = ca.issue("client.example.com", client=True)
    (tmp_path / "client.crt").write_bytes(client.cert)
    (tmp_path / "client.key").write_bytes(client.key)
    stranger = TestCA("another root").issue("client.example.com", client=True)
    (tmp_path / "stranger.crt").write_bytes(stranger.cert)
    (tmp_path / "stranger.key").write_bytes(stranger.key)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), OPTIONAL,
                          "---\n" + SECURE_INGRESS.split("---\n", 2)[2])
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        assert served_certificate(port, "httpbin.example.com", ca.pem).serial_number == httpbin.serial
        # a server with host "*" takes any other name, and no name (Envoy's filter chain without server_names)
        assert served_certificate(port, "www.example.com", ca.pem).serial_number == fallback.serial
        assert served_certificate(port, None, ca.pem).serial_number == fallback.serial
        assert https_get(port, "httpbin.example.com", "/status/200", ca.pem)[0] == 200  # no client certificate
        status, _ = https_get(port, "httpbin.example.com", "/status/200", ca.pem,
                              client=(tmp_path / "client.crt", tmp_path / "client.key"))
        assert status == 200
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):  # given, it must be signed by the CA
            https_get(port, "httpbin.example.com", "/status/200", ca.pem,
                      client=(tmp_path / "stranger.crt", tmp_path / "stranger.key"))
    finally:
        assert proxy.stop() == 0


def test_servers_of_one_port_that_need_different_handshakes_are_refused(tmp_path: Path, ca: TestCA,
                                                                         upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)),
                 ca=ca.pem)
    write_secret(credentials / "default-credential", ca.issue("default.example.com", ("*.example.com",)))
    mixed = OPTIONAL.replace("{mode: OPTIONAL_MUTUAL, credentialName: default-credential}",
                             "{mode: SIMPLE, credentialName: default-credential}")
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), mixed)
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "off", "--gateway", "mygateway", "--gateway-port", "443=127.0.0.1:0",
                          "--credentials-dir", str(credentials)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "gw.yaml:2: spec.servers[1].tls: port 443 has TLS servers that differ in client certificates" in run.stderr
    # and a TLS server the plaintext --listen listener would serve in plaintext
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "127.0.0.1:0", "--gateway", "mygateway"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "gw.yaml:2: spec.servers[0].tls: the gateway's plaintext --listen listener would serve this TLS " \
           "server's hosts" in run.stderr, run.stderr


DENY_SNI = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-teapots, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/status/418"]}}]
    when: [{key: connection.sni, values: ["httpbin.example.com"]}]
"""


def test_a_reload_adds_a_server_and_policies_see_the_sni(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    credentials = tmp_path / "credentials"
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)))
    hello = ca.issue("helloworld.example.com", ("helloworld.example.com",))
    write_secret(credentials / "helloworld-credential", hello)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), SECURE_INGRESS, DENY_SNI)
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        assert https_get(port, "httpbin.example.com", "/status/418", ca.pem) == (403, b"RBAC: access denied")
        assert https_get(port, "httpbin.example.com", "/status/200", ca.pem)[0] == 200
        with pytest.raises(ssl.SSLError):
            served_certificate(port, "helloworld.example.com", ca.pem)
        write_config(tmp_path / "config", "gw.yaml", services(upstream_app), HELLOWORLD,
                     "---\n" + SECURE_INGRESS.split("---\n", 2)[2], DENY_SNI)
        wait_until(lambda: "config version 2 loaded" in proxy.log, what="the reload")
        assert served_certificate(port, "helloworld.example.com", ca.pem).serial_number == hello.serial
        assert https_get(port, "helloworld.example.com", "/hello", ca.pem)[0] == 200
    finally:
        assert proxy.stop() == 0


def test_what_the_gateway_does_not_implement_is_refused_by_the_gateway_alone(tmp_path: Path,
                                                                             upstream_app: Upstream) -> None:
    passthrough = SECURE_INGRESS.replace("mode: SIMPLE", "mode: PASSTHROUGH").replace(
        "credentialName: httpbin-credential # must be the same as secret", "")
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), passthrough)
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "off", "--gateway", "mygateway", "--gateway-port", "443=127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "gw.yaml:2: spec.servers[0].tls.mode: tls mode PASSTHROUGH is not implemented on meshproxy's gateway" \
        in run.stderr, run.stderr
    sidecar = ProxyProcess(config)  # a sidecar never serves the Gateway: it loads, with the warning
    try:
        assert "warning: tls mode PASSTHROUGH is not implemented" in sidecar.log
    finally:
        assert sidecar.stop() == 0


ISTIO_MUTUAL = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 443, name: tls-mesh, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
"""


def test_istio_mutual_takes_mesh_workloads_with_their_identity(tmp_path: Path, upstream_app: Upstream) -> None:
    """ISTIO_MUTUAL: the gateway's workload certificate; clients need one from the mesh roots, and their SPIFFE
    identity is the principal AuthorizationPolicies see."""
    mesh = make_mesh(tmp_path)
    own = mesh.workload(tmp_path / "gateway-certs", "istio-system", "istio-ingressgateway-service-account")
    client = mesh.workload(tmp_path / "client", "default", "client")
    other = mesh.workload(tmp_path / "other", "default", "other")
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), ISTIO_MUTUAL,
                          "---\n" + SECURE_INGRESS.split("---\n", 2)[2])
    proxy = ProxyProcess(config, args=["--gateway", "mygateway", "--namespace", "istio-system",
                                       "--label", "istio=ingressgateway", "--listen", "off",
                                       "--gateway-port", "443=127.0.0.1:0", "--cert-dir", str(own)])
    try:
        port = proxy.addresses["gateway:443"][1]
        roots = mesh.roots.read_bytes()

        def get(workload: Path | None) -> int:
            context = ssl.create_default_context(cadata=roots.decode())
            context.check_hostname = False  # a SPIFFE identity is no host name
            if workload is not None:
                context.load_cert_chain(workload / "cert-chain.pem", workload / "key.pem")
            conn = http.client.HTTPSConnection("httpbin.example.com", port, timeout=10, context=context)
            conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                            server_hostname="httpbin.example.com")
            conn.request("GET", "/status/200")
            status = conn.getresponse().status
            conn.close()
            return status

        assert get(client) == 200
        assert get(other) == 403  # RBAC: the principal is not the allowed one
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            get(None)  # no client certificate
        assert len(upstream_app.requests) == 1
    finally:
        assert proxy.stop() == 0

    # without the workload certificates the gateway cannot serve ISTIO_MUTUAL: a load error, not plaintext
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "off", "--gateway", "mygateway", "--gateway-port", "443=127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "gw.yaml:2: spec.servers[0].tls.mode: tls mode ISTIO_MUTUAL needs the gateway's workload certificates" \
        in run.stderr, run.stderr


TWO_MUTUAL = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: mygateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 443, name: https-httpbin, protocol: HTTPS}
    hosts: [httpbin.example.com]
    tls: {mode: MUTUAL, credentialName: httpbin-credential}
  - port: {number: 443, name: https-helloworld, protocol: HTTPS}
    hosts: [helloworld.example.com]
    tls: {mode: MUTUAL, credentialName: helloworld-credential}
"""


def test_mutual_servers_of_one_port_share_their_client_ca(tmp_path: Path, ca: TestCA, upstream_app: Upstream) -> None:
    """Two MUTUAL servers on one port: with one client CA both serve by SNI; with different ones the gateway refuses
    the config (a session verified by one server's CA could resume under the other, the port's TLS sessions being
    shared), and a rotation that makes them differ keeps the running certificates."""
    credentials = tmp_path / "credentials"
    hello = ca.issue("helloworld.example.com", ("helloworld.example.com",))
    write_secret(credentials / "httpbin-credential", ca.issue("httpbin.example.com", ("httpbin.example.com",)),
                 ca=ca.pem)
    write_secret(credentials / "helloworld-credential", hello, ca=ca.pem)
    client = ca.issue("client.example.com", client=True)
    (tmp_path / "client.crt").write_bytes(client.cert)
    (tmp_path / "client.key").write_bytes(client.key)
    config = write_config(tmp_path / "config", "gw.yaml", services(upstream_app), TWO_MUTUAL,
                          "---\n" + SECURE_INGRESS.split("---\n", 2)[2], "---\n" + HELLOWORLD.split("---\n", 2)[2])
    proxy = gateway(config, credentials)
    try:
        port = proxy.addresses["gateway:443"][1]
        pair = (tmp_path / "client.crt", tmp_path / "client.key")
        assert https_get(port, "httpbin.example.com", "/status/200", ca.pem, client=pair)[0] == 200
        assert https_get(port, "helloworld.example.com", "/hello", ca.pem, client=pair)[0] == 200
        write_secret(credentials / "helloworld-credential", hello, ca=TestCA("helloworld clients").pem)
        wait_until(lambda: "rotated certificates rejected" in proxy.log, what="the rotation rejected")
        assert "is not the client CA of the port's other servers" in proxy.log
        assert https_get(port, "helloworld.example.com", "/hello", ca.pem, client=pair)[0] == 200
    finally:
        assert proxy.stop() == 0
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(config), "--admin", "off",
                          "--listen", "off", "--gateway", "mygateway", "--gateway-port", "443=127.0.0.1:0",
                          "--credentials-dir", str(credentials)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "gw.yaml:2: spec.servers[1].tls: port 443 has servers that verify client certificates against different " \
           "CAs" in run.stderr, run.stderr
