"""The pure parts of upstream TLS: SNI, SAN matching, Envoy's failure words, what each DestinationRule tls becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.istio import model as m
from meshproxy.security.ca import init_ca, issue
from meshproxy.security.certs import CertError, CertStore
from meshproxy.security.client_tls import (
    ALPN_ISTIO_TCP,
    HTTP2,
    HTTP11,
    TCP,
    UpstreamTLSCompiler,
    dns_matches,
    istio_sni,
    san_mismatch_reason,
    tls_failure_reason,
)

SIDECAR = {"security.istio.io/tlsMode": "istio"}


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("api.example.com", "API.example.com.", True),
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "a.b.example.com", False),  # the wildcard is one label
    ("*.example.com", "example.com", False),
    ("api.example.com", "web.example.com", False),
])
def test_dns_sans_match_as_envoys_dns_name_match(pattern: str, name: str, matches: bool) -> None:
    assert dns_matches(pattern, name) is matches


def test_envoys_words() -> None:
    assert istio_sni("outbound|9080|v1|reviews.default.svc.cluster.local") == \
        "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    assert tls_failure_reason("WRONG_VERSION_NUMBER") == \
        "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end"
    assert tls_failure_reason("TLSV13_ALERT_CERTIFICATE_REQUIRED") == \
        "TLS_error:|268436572:SSL routines:OPENSSL_internal:TLSV13_ALERT_CERTIFICATE_REQUIRED:TLS_error_end"
    assert san_mismatch_reason(["spiffe://a", "b.example"]) == (
        "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN "
        "matcher, certificate SANs are [spiffe://a, b.example]:TLS_error_end")


def test_what_each_setting_becomes(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", key_type="ec")
    issue(ca, "default", "me", tmp_path / "me", key_type="ec")
    with_certs = UpstreamTLSCompiler(CertStore(tmp_path / "me"))
    without = UpstreamTLSCompiler(None)
    name, host = "outbound|9080|v1|reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local"
    accounts = (("default", "bookinfo-reviews"),)

    # auto mTLS: only to sidecars, only with certificates
    assert without.for_endpoint(None, name, host, (), accounts, SIDECAR) is None
    assert with_certs.for_endpoint(None, name, host, (), accounts, {}) is None
    auto = with_certs.for_endpoint(None, name, host, ("spiffe://x/y",), accounts, SIDECAR)
    assert auto is not None and auto.mode == "ISTIO_MUTUAL" and auto.server_hostname == istio_sni(name)
    assert auto.subject_alt_names == ("spiffe://x/y", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    assert auto.context() is with_certs.store.client_context()  # type: ignore[union-attr]
    assert with_certs.for_endpoint(m.ClientTLSSettings(mode="DISABLE"), name, host, (), accounts, SIDECAR) is None
    own = with_certs.for_endpoint(m.ClientTLSSettings(mode="ISTIO_MUTUAL", subject_alt_names=("spiffe://z",),
                                                      sni="custom"), name, host, (), accounts, {})
    assert own is not None and (own.subject_alt_names, own.server_hostname) == (("spiffe://z",), "custom")

    # SIMPLE: auto SNI and auto SAN validation from the host; one context per setting, shared across SNIs
    simple = m.ClientTLSSettings(mode="SIMPLE", ca_certificates=str(tmp_path / "ca" / "root-cert.pem"))
    first = with_certs.for_endpoint(simple, name, host, (), (), {})
    other = with_certs.for_endpoint(simple, "outbound|443||api.example", "api.example", (), (), {})
    assert first is not None and other is not None
    assert (first.server_hostname, first.subject_alt_names) == (host, (host,))
    assert first.files is other.files and first is not other
    skip = with_certs.for_endpoint(m.ClientTLSSettings(mode="SIMPLE", insecure_skip_verify=True), name, host, (),
                                   (), {})
    assert skip is not None and skip.subject_alt_names == ()

    with pytest.raises(CertError, match="needs the workload certificates"):
        without.for_endpoint(m.ClientTLSSettings(mode="ISTIO_MUTUAL"), name, host, (), (), {})
    with pytest.raises(CertError, match="missing"):
        without.for_endpoint(m.ClientTLSSettings(mode="MUTUAL", client_certificate=str(tmp_path / "none.pem"),
                                                 private_key=str(tmp_path / "none.key")), name, host, (), (), {})


def test_alpn_sni_and_names_per_protocol(tmp_path: Path) -> None:
    """ALPN as Istio's cluster builder and Envoy's pools set it; auto SNI and auto SAN validation are Envoy HTTP
    options, so a TCP connection of a SIMPLE rule without `sni` sends none and checks no name."""
    ca = init_ca(tmp_path / "ca", key_type="ec")
    issue(ca, "default", "me", tmp_path / "me", key_type="ec")
    compiler = UpstreamTLSCompiler(CertStore(tmp_path / "me"))
    name, host = "outbound|9080||db.default.svc.cluster.local", "db.default.svc.cluster.local"
    istio = compiler.for_endpoint(None, name, host, (), (), SIDECAR)
    assert istio is not None
    assert (istio.alpn(HTTP11), istio.alpn(HTTP2), istio.alpn(TCP)) == (
        ("istio-http/1.1", "istio", "http/1.1"), ("istio-h2", "istio", "h2"), ALPN_ISTIO_TCP)
    assert istio.sni(TCP) == istio.sni(HTTP2) == istio_sni(name)  # Istio's SNI is the TLS context's: every protocol
    assert istio.context(HTTP2) is not istio.context(HTTP11)  # an SSLContext carries its ALPN

    roots = str(tmp_path / "ca" / "root-cert.pem")
    auto = compiler.for_endpoint(m.ClientTLSSettings(mode="SIMPLE", ca_certificates=roots), name, host, (), (), {})
    assert auto is not None
    assert (auto.alpn(HTTP11), auto.alpn(HTTP2), auto.alpn(TCP)) == (("http/1.1",), ("h2",), ())
    assert (auto.sni(HTTP11), auto.sni(TCP)) == (host, "")
    assert auto.check_peer(None, TCP) == ""  # no name to check over TCP
    assert auto.check_peer(None, HTTP11) == san_mismatch_reason([])  # the host, over HTTP
    assert auto.context(TCP) is auto.context(TCP) and auto.context(TCP) is not auto.context(HTTP2)
    named = compiler.for_endpoint(m.ClientTLSSettings(mode="SIMPLE", ca_certificates=roots, sni="db.example",
                                                      subject_alt_names=("db.example",)), name, host, (), (), {})
    assert named is not None and named.sni(TCP) == "db.example" and named.check_peer(None, TCP) != ""
