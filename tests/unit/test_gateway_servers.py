"""Gateway servers at load (istio/build_gateway.py: Istio's validateServer and validateTLSOptions, and what meshproxy
refuses as not implemented), a gateway port's route table (routing/gateway_port.py: hosts narrowed to the port's
servers, httpsRedirect), `--gateway-port` parsing and credentialName's folder layouts (security/server_tls.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshproxy.istio import model as m
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.istio.problems import Problem
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.gateway_port import PortHosts, port_table
from meshproxy.routing.policy import ACTION_REDIRECT
from meshproxy.security.server_tls import ServerTLSError, credential_files
from meshproxy.settings import GatewayPortSpec


def gateway_doc(servers: str, name: str = "gw") -> str:
    body = textwrap.indent(textwrap.dedent(servers).strip(), "  ")
    return (f"apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\nspec:\n"
            f"  selector: {{istio: ingressgateway}}\n  servers:\n{body}\n")


def problems_of(servers: str) -> list[str]:
    problems: list[Problem] = []
    load_text(gateway_doc(servers), "gw.yaml", problems)
    return [str(p) for p in problems]


HTTPS = "- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: [a.example.com]\n"


@pytest.mark.parametrize("servers, expected", [
    (HTTPS + "  tls: {mode: SIMPLE, credentialName: a}", []),
    (HTTPS + "  tls: {mode: MUTUAL, serverCertificate: /c, privateKey: /k, caCertificates: /ca}", []),
    (HTTPS, ["gw.yaml:0: spec.servers[0]: server must have TLS settings for HTTPS/TLS protocols"]),
    (HTTPS + "  tls: {mode: SIMPLE}", [
        "gw.yaml:0: spec.servers[0].tls.serverCertificate: SIMPLE TLS requires a server certificate",
        "gw.yaml:0: spec.servers[0].tls.privateKey: SIMPLE TLS requires a private key"]),
    (HTTPS + "  tls: {mode: MUTUAL, serverCertificate: /c, privateKey: /k}", [
        "gw.yaml:0: spec.servers[0].tls.caCertificates: MUTUAL TLS requires a client CA bundle"]),
    (HTTPS + "  tls: {mode: SIMPLE, credentialName: a, serverCertificate: /c, privateKey: /k}", [
        "gw.yaml:0: spec.servers[0].tls: only one of credential_name, credential_names, "
        "server_certificate/private_key, tls_certificates should be specified"]),
    # what meshproxy's gateway does not do: a warning for every proxy, an error for the gateway serving it
    (HTTPS + "  tls: {mode: PASSTHROUGH}", [
        "gw.yaml:0: spec.servers[0].tls.mode: warning: tls mode PASSTHROUGH is not implemented on meshproxy's gateway "
        "(it terminates TLS: SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL) (a gateway serving this Gateway refuses "
        "it)"]),
    (HTTPS + "  tls: {mode: ISTIO_MUTUAL}", []),
    (HTTPS + "  tls: {mode: ISTIO_MUTUAL, credentialName: a}", [
        "gw.yaml:0: spec.servers[0].tls.credentialName: ISTIO_MUTUAL TLS cannot have associated credentialName"]),
    (HTTPS + "  tls: {mode: SIMPLE, credentialName: a, caCrl: /crl}", [
        "gw.yaml:0: spec.servers[0].tls.caCrl: warning: certificate revocation lists (caCrl) are not implemented "
        "(a gateway serving this Gateway refuses it)"]),
    (HTTPS + "  tls: {mode: SIMPLE, credentialName: a, minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2}", [
        "gw.yaml:0: spec.servers[0].tls.maxProtocolVersion: TLSV1_2 is below minProtocolVersion TLSV1_3"]),
    ("- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*']\n  tls: {httpsRedirect: true}", []),
    ("- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*']\n  tls: {mode: SIMPLE, credentialName: a}", [
        "gw.yaml:0: spec.servers[0].tls: server cannot have TLS settings for plain text HTTP ports"]),
    ("- port: {number: 80, protocol: HTTP}\n  hosts: ['ns/a.example.com', 'a*.example.com']", [
        "gw.yaml:0: spec.servers[0].port.name: port name must be set",
        "gw.yaml:0: spec.servers[0].hosts[1]: 'a*.example.com' is not a valid host name (a wildcard must be a whole "
        "leading label: *.example.com)"]),
])
def test_servers_are_checked_as_istio_and_what_is_missing_is_refused(servers: str, expected: list[str]) -> None:
    assert problems_of(servers) == expected


ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop}
spec:
  hosts: [shop.example.com, "*.example.org"]
  gateways: [gw]
  http: [{route: [{destination: {host: shop.default.svc.cluster.local, port: {number: 80}}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: rest}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{route: [{destination: {host: rest.default.svc.cluster.local, port: {number: 80}}}]}]
"""


def gateway_table(servers: str) -> tuple[m.Gateway, object]:
    problems: list[Problem] = []
    resources = load_text(gateway_doc(servers) + "---\n" + ROUTES, "gw.yaml", problems)
    snapshot = snapshot_of(resources)
    table, _ = compile_table(snapshot, Identity(gateways=("gw",)))
    (gateway,) = snapshot.gateways
    return gateway, table


def vs_of(table, authority: bytes) -> str | None:  # type: ignore[no-untyped-def]
    vhost, _ = table.virtual_host(authority)
    if vhost is None:
        return None
    route = vhost.routes[0]
    return "redirect" if route.action == ACTION_REDIRECT else route.virtual_service


def test_a_port_serves_the_hosts_of_its_servers_only() -> None:
    gateway, table = gateway_table("""
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [shop.example.com, "*.example.org", "ns/api.example.net"]
          tls: {mode: SIMPLE, credentialName: a}
        - port: {number: 8443, name: https-all, protocol: HTTPS}
          hosts: ["*"]
          tls: {mode: SIMPLE, credentialName: a}
    """)
    assert vs_of(table, b"other.example.com") == "default/rest"  # the whole table: the "*" VirtualService
    narrow = port_table(table, PortHosts.of(443, [s for s in gateway.servers if s.port.number == 443]))
    assert vs_of(narrow, b"shop.example.com:443") == "default/shop"
    assert vs_of(narrow, b"a.example.org") == "default/shop"
    assert vs_of(narrow, b"api.example.net") == "default/rest"  # a server host reached through the "*" VS
    assert vs_of(narrow, b"other.example.com") is None  # 404 NR: no server of the port names it
    assert narrow.default_port == 443
    (dest,) = narrow.exact["shop.example.com"].routes[0].picker.choices  # type: ignore[union-attr]
    assert dest.request_headers.set == ((b"x-forwarded-proto", b"https"),)  # a TLS port: the client's scheme
    everything = port_table(table, PortHosts.of(8443, [s for s in gateway.servers if s.port.number == 8443]))
    assert vs_of(everything, b"other.example.com") == "default/rest"


def test_https_redirect_replaces_the_routes_of_its_hosts() -> None:
    gateway, table = gateway_table("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: [shop.example.com]
          tls: {httpsRedirect: true}
        - port: {number: 80, name: http-other, protocol: HTTP}
          hosts: [plain.example.com]
    """)
    narrow = port_table(table, PortHosts.of(80, gateway.servers))
    assert vs_of(narrow, b"shop.example.com") == "redirect"
    assert vs_of(narrow, b"plain.example.com") == "default/rest"
    vhost, _ = narrow.virtual_host(b"shop.example.com:8080")
    assert vhost is not None and vhost.routes[0].redirect is not None
    redirect = vhost.routes[0].redirect
    assert redirect.code == 301
    assert redirect.location(b"shop.example.com:8080", b"/a", b"b=1") == b"https://shop.example.com:8080/a?b=1"
    assert redirect.location(b"shop.example.com", b"/a", b"") == b"https://shop.example.com/a"


@pytest.mark.parametrize("text, number, listen", [
    ("443=8443", 443, ("127.0.0.1", 8443)),
    ("80=0.0.0.0:8080", 80, ("0.0.0.0", 8080)),
    ("443=[::1]:0", 443, ("::1", 0)),
])
def test_gateway_port_flag(text: str, number: int, listen: tuple[str, int]) -> None:
    assert GatewayPortSpec.parse(text) == GatewayPortSpec(number, listen)


@pytest.mark.parametrize("text", ["443", "x=8443", "0=8443", "443=host"])
def test_gateway_port_flag_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError):
        GatewayPortSpec.parse(text)


def test_credential_folders_in_istio_secret_layouts(tmp_path: Path) -> None:
    tls = tmp_path / "tls-secret"
    tls.mkdir()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tls / name).write_text("x")
    generic = tmp_path / "generic"
    generic.mkdir()
    for name in ("cert", "key"):
        (generic / name).write_text("x")
    (tmp_path / "generic-cacert").mkdir()
    (tmp_path / "generic-cacert" / "cacert").write_text("x")
    files = credential_files(str(tmp_path), "tls-secret", wants_ca=True)
    assert (files.cert.name, files.key.name, files.ca and files.ca.name) == ("tls.crt", "tls.key", "ca.crt")
    files = credential_files(str(tmp_path), "generic", wants_ca=True)
    assert (files.cert.name, files.key.name) == ("cert", "key")
    assert files.ca == tmp_path / "generic-cacert" / "cacert"  # Istio's <name>-cacert secret
    assert credential_files(str(tmp_path), "generic", wants_ca=False).ca is None
    for name, message in (("missing", "no such folder"), ("../x", "is not a secret name")):
        with pytest.raises(ServerTLSError, match=message):
            credential_files(str(tmp_path), name, wants_ca=False)
    with pytest.raises(ServerTLSError, match="--credentials-dir"):
        credential_files(None, "generic", wants_ca=False)
    (tmp_path / "generic-cacert" / "cacert").unlink()
    with pytest.raises(ServerTLSError, match="MUTUAL TLS needs the client CA"):
        credential_files(str(tmp_path), "generic", wants_ca=True)


def test_what_the_gateway_refuses_is_kept_on_the_server() -> None:
    problems: list[Problem] = []
    (gateway,) = load_text(gateway_doc(HTTPS + "  tls: {mode: SIMPLE, credentialName: a, subjectAltNames: [x]}"),
                           "gw.yaml", problems)
    assert gateway.servers[0].unsupported == (
        ("spec.servers[0].tls.subjectAltNames",
         "checking the client certificate's subjectAltNames is not implemented"),)
