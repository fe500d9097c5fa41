"""AuthorizationPolicy and RequestAuthentication through a real proxy: a `meshproxy run` process with an inbound
listener in front of a real upstream, real HTTP clients, tokens signed with keys made here, a JWKS served by a
loopback server; policies changed by hot reload."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import ProxyProcess, Upstream, free_port, service_entry, virtual_service, write_config
from jwt_keys import ISSUER, SigningKey, jwks
from waiting import wait_until

NAMESPACE = "foo"


def doc(kind: str, name: str, spec: str, namespace: str = NAMESPACE) -> str:
    return (f"---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n{spec}\n")


DENY_ADMIN = doc("AuthorizationPolicy", "deny-admin",
                 "  action: DENY\n  rules: [{to: [{operation: {paths: ['/admin', '/admin/*']}}]}]")
ALLOW_ALICE = doc("AuthorizationPolicy", "allow-alice",
                  "  selector: {matchLabels: {app: httpbin}}\n"
                  "  rules: [{when: [{key: 'request.headers[x-user]', values: [alice]}]}]")


class Sidecar:
    """A proxy with an inbound listener for the local app (the upstream), workload foo/httpbin."""

    def __init__(self, folder: Path, upstream: Upstream, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.proxy = ProxyProcess(folder, args=["--listen", "off", "--namespace", NAMESPACE, "--label", "app=httpbin",
                                                "--workload", "httpbin", "--inbound",
                                                f"127.0.0.1:{self.port}=127.0.0.1:{upstream.port}", *extra])

    def request(self, path: str = "/", headers: dict[str, str] | None = None,
                method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers={"host": "httpbin.foo:8000", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.proxy.admin + "/stats/prometheus", timeout=5) as resp:
            return resp.read().decode()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "config"


def started(folder: Path, upstream: Upstream, *docs: str, extra: tuple[str, ...] = ()) -> Sidecar:
    write_config(folder, "security.yaml", *docs)
    return Sidecar(folder, upstream, extra)


def test_deny_by_path_answers_403_rbac_access_denied_with_envoys_details(folder: Path, upstream: Upstream) -> None:
    sidecar = started(folder, upstream, DENY_ADMIN)
    try:
        status, headers, body = sidecar.request("/admin/users?x=1")
        assert (status, body) == (403, b"RBAC: access denied")
        assert headers["content-type"] == "text/plain" and headers["server"] == "istio-envoy"
        assert sidecar.request("/echo")[0] == 200
        assert [r["path"] for r in upstream.requests] == ["/echo"]  # the denied request never reached the app
        denied, allowed = sidecar.proxy.access_entries(2)
        assert (denied["response_code"], denied["response_flags"], denied["response_code_details"]) == \
            (403, "-", "rbac_access_denied_matched_policy[ns[foo]-policy[deny-admin]-rule[0]]")
        assert allowed["response_code"] == 200
        line = wait_until(lambda: [ln for ln in sidecar.metrics().splitlines()
                                   if ln.startswith("istio_requests_total") and 'response_code="403"' in ln],
                          what="the denied request counted")
        assert 'response_flags="-"' in line[0] and 'reporter="destination"' in line[0]
    finally:
        assert sidecar.proxy.stop() == 0


def test_allow_list_by_header(folder: Path, upstream: Upstream) -> None:
    sidecar = started(folder, upstream, ALLOW_ALICE)
    try:
        assert sidecar.request("/echo", {"x-user": "alice"})[0] == 200
        assert sidecar.request("/echo", {"x-user": "bob"})[:3:2] == (403, b"RBAC: access denied")
        assert sidecar.request("/echo")[0] == 403
        entries = sidecar.proxy.access_entries(3)
        assert [e["response_code_details"] for e in entries[1:]] == ["rbac_access_denied_matched_policy[none]"] * 2
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_policy_for_another_workload_or_namespace_changes_nothing(folder: Path, upstream: Upstream) -> None:
    other = doc("AuthorizationPolicy", "deny-all", "  selector: {matchLabels: {app: other}}\n  action: DENY\n"
                                                   "  rules: [{}]")
    elsewhere = doc("AuthorizationPolicy", "deny-all", "  action: DENY\n  rules: [{}]", namespace="bar")
    sidecar = started(folder, upstream, other, elsewhere)
    try:
        assert sidecar.request("/echo")[0] == 200
    finally:
        assert sidecar.proxy.stop() == 0


def test_the_outbound_listener_is_not_authorized_by_the_callers_own_policies(folder: Path, upstream: Upstream) -> None:
    """A sidecar's DENY-all guards what the workload receives; its own calls go out (the callee's proxy decides)."""
    deny_all = doc("AuthorizationPolicy", "deny-all", "  action: DENY\n  rules: [{}]")
    write_config(folder, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                 virtual_service("backend"), deny_all)
    inbound = free_port()
    proxy = ProxyProcess(folder, args=["--namespace", NAMESPACE, "--inbound", f"127.0.0.1:{inbound}=127.0.0.1:{upstream.port}"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/echo", headers={"host": "backend.default"})
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", inbound, timeout=10)
        conn.request("GET", "/echo", headers={"host": "backend"})
        assert conn.getresponse().status == 403
        conn.close()
    finally:
        assert proxy.stop() == 0


def test_remote_ip_blocks_read_the_last_x_forwarded_for_address_on_inbound(folder: Path, upstream: Upstream) -> None:
    policy = doc("AuthorizationPolicy", "block", "  action: DENY\n  rules: [{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}]")
    sidecar = started(folder, upstream, policy)
    try:
        assert sidecar.request("/echo", {"x-forwarded-for": "203.0.113.7"})[0] == 403
        assert sidecar.request("/echo", {"x-forwarded-for": "203.0.113.7, 198.51.100.1"})[0] == 200
        assert sidecar.request("/echo")[0] == 200
    finally:
        assert sidecar.proxy.stop() == 0


# ------------------------------------------------------------------------------------------------ reload


def test_a_reloaded_policy_changes_decisions_and_a_bad_one_is_refused_naming_the_field(folder: Path,
                                                                                       upstream: Upstream) -> None:
    sidecar = started(folder, upstream, DENY_ADMIN)
    try:
        assert sidecar.request("/admin")[0] == 403
        assert sidecar.request("/echo", {"x-user": "bob"})[0] == 200
        write_config(folder, "security.yaml", DENY_ADMIN, ALLOW_ALICE)  # now an allow-list as well
        wait_until(lambda: sidecar.request("/echo", {"x-user": "bob"})[0] == 403, what="the ALLOW policy in force")
        assert sidecar.request("/echo", {"x-user": "alice"})[0] == 200
        bad = doc("AuthorizationPolicy", "deny-admin", "  action: DENY\n  rules: [{to: [{operation: {pathz: [/echo]}}]}]")
        write_config(folder, "security.yaml", bad, ALLOW_ALICE)
        message = "security.yaml:0: spec.rules[0].to[0].operation.pathz: unknown field 'pathz'"
        wait_until(lambda: message in sidecar.proxy.log, what="the rejection logged with its field")
        assert 'meshproxy_config_reloads_total{result="rejected"} 1.0' in sidecar.metrics()
        assert sidecar.request("/admin", {"x-user": "alice"})[0] == 403  # the old policies stay
        assert sidecar.request("/echo", {"x-user": "alice"})[0] == 200
        custom = doc("AuthorizationPolicy", "ext", "  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]")
        write_config(folder, "security.yaml", custom)
        wait_until(lambda: "spec.action: CUSTOM authorization" in sidecar.proxy.log, what="CUSTOM refused")
        assert sidecar.request("/echo", {"x-user": "bob"})[0] == 403  # still the previous snapshot
        write_config(folder, "security.yaml", "")  # every policy removed: allowed again
        wait_until(lambda: sidecar.request("/echo", {"x-user": "bob"})[0] == 200, what="no policy")
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_proxy_does_not_start_on_a_custom_policy(folder: Path, upstream: Upstream) -> None:
    write_config(folder, "p.yaml", doc("AuthorizationPolicy", "ext", "  action: CUSTOM\n  provider: {name: x}\n"
                                                                     "  rules: [{}]"))
    done = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(folder), "--listen", "off",
                           "--admin", "127.0.0.1:0", "--inbound", f"127.0.0.1:{free_port()}=127.0.0.1:{upstream.port}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "p.yaml:0: spec.action: CUSTOM authorization (an external authorizer, ext_authz) is not implemented" \
        in done.stderr


# ------------------------------------------------------------------------------------------------ JWT

KEY = SigningKey("key-1")


def jwt_docs(jwks_spec: str, require: bool = True) -> list[str]:
    docs = [doc("RequestAuthentication", "jwt", f"  jwtRules:\n  - issuer: {ISSUER}\n    {jwks_spec}\n"
                                                "    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]")]
    if require:
        docs.append(doc("AuthorizationPolicy", "require-jwt",
                        "  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"))
    return docs


def test_jwt_with_a_real_signed_token(folder: Path, upstream: Upstream) -> None:
    claims_policy = doc("AuthorizationPolicy", "admins-only", "  action: DENY\n  rules: [{to: [{operation: {paths: "
                                                              "['/admin']}}], when: [{key: 'request.auth.claims[groups]',"
                                                              " notValues: [admin]}]}]")
    sidecar = started(folder, upstream, *jwt_docs(f"jwks: '{jwks(KEY)}'"), claims_policy)
    try:
        token = KEY.token(groups=["dev"])
        status, _, _ = sidecar.request("/echo", {"authorization": f"Bearer {token}", "x-jwt-sub": "forged"})
        assert status == 200
        sent = upstream.requests[-1]
        assert upstream.header_values(-1, "authorization") == []  # removed upstream, as Istio
        assert upstream.header_values(-1, "x-jwt-sub") == ["alice"]
        assert sent["path"] == "/echo"
        assert sidecar.request("/admin", {"authorization": f"Bearer {token}"})[0] == 403  # claims: not an admin
        assert sidecar.request("/admin", {"authorization": f"Bearer {KEY.token(groups=['admin'])}"})[0] == 200
        # no token: authentication passes, the ALLOW policy needs a request principal
        status, _, body = sidecar.request("/echo")
        assert (status, body) == (403, b"RBAC: access denied")
        # a bad token: 401 before authorization
        forged = SigningKey("key-1").token()
        status, headers, body = sidecar.request("/echo?a=1", {"authorization": f"Bearer {forged}"})
        assert (status, body) == (401, b"Jwt verification fails")
        assert headers["www-authenticate"] == 'Bearer realm="http://httpbin.foo:8000/echo?a=1", error="invalid_token"'
        status, _, body = sidecar.request("/echo", {"authorization": f"Bearer {KEY.token(exp=1)}"})
        assert (status, body) == (401, b"Jwt is expired")
        status, _, body = sidecar.request("/echo", {"authorization": f"Bearer {KEY.token(iss='https://other')}"})
        assert (status, body) == (401, b"Jwt issuer is not configured")
        details = [e["response_code_details"] for e in sidecar.proxy.access_entries(7)]
        assert details[-3:] == ["jwt_authn_access_denied{Jwt_verification_fails}", "jwt_authn_access_denied{Jwt_is_expired}",
                                "jwt_authn_access_denied{Jwt_issuer_is_not_configured}"]
    finally:
        assert sidecar.proxy.stop() == 0


class JwksServer:
    """A JWKS document on a loopback HTTP server (http.server in a thread); `keys` can be swapped (rotation)."""

    def __init__(self, *keys: SigningKey, delay: float = 0.0) -> None:
        self.document = jwks(*keys)
        self.fetches = 0
        self.delay = delay  # before answering the first fetch
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = json.dumps({"issuer": server.base, "jwks_uri": server.uri}).encode()
                else:
                    server.fetches += 1
                    if server.fetches == 1 and server.delay:
                        time.sleep(server.delay)
                    body = server.document.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def uri(self) -> str:
        return f"{self.base}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(KEY)
    yield server
    server.close()


def test_jwks_uri_fetched_from_a_loopback_server_and_refreshed(folder: Path, upstream: Upstream,
                                                               jwks_server: JwksServer) -> None:
    sidecar = started(folder, upstream, *jwt_docs(f"jwksUri: {jwks_server.uri}"),
                      extra=("--jwks-refresh-interval", "0.3"))
    try:
        assert sidecar.request("/echo", {"authorization": f"Bearer {KEY.token()}"})[0] == 200
        assert jwks_server.fetches >= 1
        rotated = SigningKey("key-2", "EC")
        status, _, body = sidecar.request("/echo", {"authorization": f"Bearer {rotated.token()}"})
        assert (status, body) == (401, b"Jwks doesn't have key to match kid or alg from Jwt")
        jwks_server.document = jwks(rotated)  # the issuer rotates its keys; the proxy picks them up on refresh
        wait_until(lambda: sidecar.request("/echo", {"authorization": f"Bearer {rotated.token()}"})[0] == 200,
                   what="the rotated key fetched")
        assert sidecar.request("/echo", {"authorization": f"Bearer {KEY.token()}"})[0] == 401
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_token_arriving_before_the_first_jwks_fetch_ends_waits_for_it(folder: Path, upstream: Upstream) -> None:
    slow = JwksServer(KEY, delay=1.5)
    try:
        sidecar = started(folder, upstream, *jwt_docs(f"jwksUri: {slow.uri}"))
        try:
            assert not re.search(r"jwksUri \S+: 1 keys", sidecar.proxy.log)  # still fetching
            assert sidecar.request("/echo", {"authorization": f"Bearer {KEY.token()}"})[0] == 200
            assert slow.fetches == 1
        finally:
            assert sidecar.proxy.stop() == 0
    finally:
        slow.close()


def test_without_jwks_or_jwks_uri_the_keys_come_from_openid_discovery(folder: Path, upstream: Upstream,
                                                                      jwks_server: JwksServer) -> None:
    policy = doc("RequestAuthentication", "jwt", f"  jwtRules: [{{issuer: '{jwks_server.base}'}}]")
    sidecar = started(folder, upstream, policy)
    try:
        assert sidecar.request("/echo", {"authorization": f"Bearer {KEY.token(iss=jwks_server.base)}"})[0] == 200
        status, _, body = sidecar.request("/echo", {"authorization": f"Bearer {SigningKey('key-1').token(iss=jwks_server.base)}"})
        assert (status, body) == (401, b"Jwt verification fails")
        assert jwks_server.fetches == 1
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_jwks_uri_that_does_not_answer_fails_tokens_but_not_tokenless_requests(folder: Path,
                                                                                 upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    sidecar = started(folder, upstream, *jwt_docs(f"jwksUri: {dead}", require=False))
    try:
        status, _, body = sidecar.request("/echo", {"authorization": f"Bearer {KEY.token()}"})
        assert (status, body) == (401, b"Jwks remote fetch is failed")
        assert sidecar.request("/echo")[0] == 200
        assert re.search(r"jwksUri http://127\.0\.0\.1:\d+/jwks: fetch failed", sidecar.proxy.log)
    finally:
        assert sidecar.proxy.stop() == 0


def test_config_dump_still_loads_with_security_resources(folder: Path, upstream: Upstream) -> None:
    sidecar = started(folder, upstream, DENY_ADMIN, *jwt_docs(f"jwks: '{jwks(KEY)}'"))
    try:
        with urllib.request.urlopen(sidecar.proxy.admin + "/config_dump", timeout=5) as resp:
            assert resp.status == 200
            json.loads(resp.read())
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_gateway_enforces_the_policies_that_select_it_on_its_own_listener(tmp_path: Path, upstream: Upstream) -> None:
    """Istio's ingress policies: in the gateway's namespace (here the root namespace), selecting its labels; the
    destination port is the gateway's listening port."""
    routing = [service_entry("backend", [(upstream.port, {})], port=80), """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge, namespace: istio-system}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{route: [{destination: {host: backend.default.svc.cluster.local}}]}]
"""]
    ingress = doc("AuthorizationPolicy", "ingress", "  selector: {matchLabels: {istio: ingressgateway}}\n  action: DENY\n"
                                                    "  rules: [{to: [{operation: {paths: ['/private/*']}}]}]",
                  namespace="istio-system")
    proxy = ProxyProcess(write_config(tmp_path, "c.yaml", *routing, ingress),
                         args=["--gateway", "edge", "--namespace", "istio-system", "--label", "istio=ingressgateway"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/private/x", headers={"host": "shop.example.com"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (403, b"RBAC: access denied")
        conn.request("GET", "/echo", headers={"host": "shop.example.com"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        assert proxy.stop() == 0


# ------------------------------------------------------------------------------------------------ Istio's examples

GROUP1 = KEY.token(groups=["group1"])
OTHER_GROUP = KEY.token(groups=["group2"])
RA = jwt_docs(f"jwks: '{jwks(KEY)}'", require=False)[0]

# Istio's documentation examples (authorization-policy reference, security tasks), each: the policy, then
# (method, path, token, expected status) through the proxy.
ISTIO_EXAMPLES = [
    ("allow-nothing", doc("AuthorizationPolicy", "allow-nothing", "  {}"),
     [("GET", "/echo", None, 403)]),
    ("deny-all", doc("AuthorizationPolicy", "deny-all", "  action: DENY\n  rules: [{}]"),
     [("GET", "/echo", None, 403), ("POST", "/anything", None, 403)]),
    ("allow-all", doc("AuthorizationPolicy", "allow-all", "  rules: [{}]"),
     [("GET", "/echo", None, 200)]),
    ("by principal: a plaintext caller has none", doc("AuthorizationPolicy", "from-sleep",
                                                      "  rules: [{from: [{source: {principals: "
                                                      "['cluster.local/ns/default/sa/sleep']}}]}]"),
     [("GET", "/echo", None, 403)]),
    ("httpbin: GET /info*, POST /data", doc("AuthorizationPolicy", "httpbin",
                                            "  rules: [{to: [{operation: {methods: [GET], paths: ['/info*']}},"
                                            " {operation: {methods: [POST], paths: [/data]}}]}]"),
     [("GET", "/info/x", None, 200), ("POST", "/data", None, 200), ("POST", "/info", None, 403),
      ("GET", "/data", None, 403)]),
    ("by path template", doc("AuthorizationPolicy", "store", "  action: DENY\n"
                                                             "  rules: [{to: [{operation: {paths: ['/store/{*}/admin',"
                                                             " '/private/{**}']}}]}]"),
     [("GET", "/store/7/admin", None, 403), ("GET", "/store/7/8/admin", None, 200),
      ("GET", "/private/a/b", None, 403), ("GET", "/public/a", None, 200)]),
    ("by JWT claim (Istio's authz-jwt task)", RA + doc("AuthorizationPolicy", "require-jwt",
                                                       "  rules: [{from: [{source: {requestPrincipals: "
                                                       f"['{ISSUER}/alice']}}}}], when: [{{key: "
                                                       "'request.auth.claims[groups]', values: [group1]}]}]"),
     [("GET", "/echo", GROUP1, 200), ("GET", "/echo", OTHER_GROUP, 403), ("GET", "/echo", None, 403)]),
]


def test_istios_documented_examples_through_one_reloading_proxy(folder: Path, upstream: Upstream) -> None:
    sidecar = started(folder, upstream, "", extra=("--watch-interval", "0"))
    try:
        for name, policy, checks in ISTIO_EXAMPLES:
            write_config(folder, "security.yaml", policy)
            reload = urllib.request.Request(sidecar.proxy.admin + "/reload", method="POST")
            with urllib.request.urlopen(reload, timeout=10) as resp:
                assert resp.status == 200, name
            got = [(method, path, sidecar.request(path, {"authorization": f"Bearer {token}"} if token else {},
                                                  method)[0]) for method, path, token, _ in checks]
            assert got == [(method, path, status) for method, path, _, status in checks], name
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_strict_peer_authentication_is_refused_while_there_is_no_tls_transport(folder: Path,
                                                                                  upstream: Upstream) -> None:
    sidecar = started(folder, upstream, doc("PeerAuthentication", "default", "  mtls: {mode: PERMISSIVE}"))
    try:
        assert sidecar.request("/echo")[0] == 200
        write_config(folder, "security.yaml", doc("PeerAuthentication", "default", "  mtls: {mode: STRICT}"))
        wait_until(lambda: "security.yaml:0: spec.mtls.mode: STRICT mutual TLS is not enforced" in sidecar.proxy.log,
                   what="STRICT refused")
        assert sidecar.request("/echo")[0] == 200  # the running (PERMISSIVE) config stays
    finally:
        assert sidecar.proxy.stop() == 0


def test_a_token_for_another_audience_is_forbidden_as_envoy_answers_it(folder: Path, upstream: Upstream) -> None:
    ra = doc("RequestAuthentication", "jwt", f"  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{jwks(KEY)}'\n"
                                             "    audiences: [bookstore]\n    fromParams: [token]")
    sidecar = started(folder, upstream, ra)
    try:
        assert sidecar.request(f"/echo?token={KEY.token(aud='bookstore')}")[0] == 200
        status, _, body = sidecar.request(f"/echo?token={KEY.token(aud='petstore')}")
        assert (status, body) == (403, b"Audiences in Jwt are not allowed")
        none = "eyJhbGciOiJub25lIn0." + KEY.token(aud="bookstore").split(".")[1] + "."
        status, _, body = sidecar.request(f"/echo?token={none}")
        assert (status, body) == (401, b"Jwt header [alg] is not supported")
    finally:
        assert sidecar.proxy.stop() == 0
