"""`meshproxy ca`: the mesh root and workload certificates, parsed back with cryptography (and openssl when there),
checked against what Istio's self-signed CA and pilot-agent write; the workload folder read back as a sidecar does."""

from __future__ import annotations

import datetime
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.cli import main
from meshproxy.proxy.secure_server import looks_like_tls
from meshproxy.security.ca import parse_ttl
from meshproxy.security.certs import CertError, CertStore, read_cert_dir
from meshproxy.security.peer import peer_principal
from meshproxy.security.spiffe import principal_of, spiffe_id


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_init_and_issue_write_istios_layout_and_fields(tmp_path: Path, key_type: str) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "reviews"
    assert "trust domain example.org" in run("ca", "init", str(ca_dir), "--trust-domain", "example.org",
                                             "--key-type", key_type)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem",
                                                        "root-cert.pem"]
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert root.not_valid_after_utc - root.not_valid_before_utc > datetime.timedelta(days=3600)

    output = run("ca", "issue", "--ca", str(ca_dir), "--namespace", "default", "--service-account",
                 "bookinfo-reviews", "--out", str(out), "--key-type", key_type)
    assert output.startswith("spiffe://example.org/ns/default/sa/bookinfo-reviews in ")
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    (leaf,) = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())
    assert leaf.subject == x509.Name([]) and leaf.issuer == root.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty: the SAN is the name (RFC 5280 4.2.1.6)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/default/sa/bookinfo-reviews"]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=24) <= lifetime <= datetime.timedelta(hours=24, minutes=2)
    key_class = ec.EllipticCurvePublicKey if key_type == "ec" else rsa.RSAPublicKey
    assert isinstance(leaf.public_key(), key_class)
    root.public_key()  # the leaf verifies under the root, as OpenSSL sees it:
    context = ssl.create_default_context(cafile=str(out / "root-cert.pem"))
    context.load_cert_chain(out / "cert-chain.pem", out / "key.pem")

    certs = read_cert_dir(out)
    assert certs.principal == "example.org/ns/default/sa/bookinfo-reviews" and certs.trust_domain == "example.org"
    if shutil.which("openssl"):
        text = subprocess.run(["openssl", "x509", "-in", str(out / "cert-chain.pem"), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout
        assert "URI:spiffe://example.org/ns/default/sa/bookinfo-reviews" in text
        assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
        assert "Digital Signature, Key Encipherment" in text
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(out / "root-cert.pem"),
                                   str(out / "cert-chain.pem")], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_issue_ttl_and_bad_input(tmp_path: Path) -> None:
    run("ca", "init", str(tmp_path / "ca"), "--key-type", "ec")
    run("ca", "issue", "--ca", str(tmp_path / "ca"), "--namespace", "ns1", "--service-account", "sa",
        "--out", str(tmp_path / "w"), "--ttl", "1h30m", "--key-type", "ec")
    (leaf,) = x509.load_pem_x509_certificates((tmp_path / "w" / "cert-chain.pem").read_bytes())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(hours=1, minutes=31)
    bad = CliRunner().invoke(main, ["ca", "issue", "--ca", str(tmp_path / "ca"), "--namespace", "Not_A_Name",
                                    "--service-account", "sa", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "namespace 'Not_A_Name' is not a Kubernetes name" in bad.output
    missing = CliRunner().invoke(main, ["ca", "issue", "--ca", str(tmp_path / "nothing"), "--namespace", "ns",
                                        "--service-account", "sa", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "ca-cert.pem: cannot read" in missing.output
    again = CliRunner().invoke(main, ["ca", "init", str(tmp_path / "ca")])
    assert again.exit_code == 1 and "a CA is already there" in again.output
    assert parse_ttl("24h") == datetime.timedelta(hours=24) and parse_ttl("7d") == datetime.timedelta(days=7)
    with pytest.raises(ValueError):
        parse_ttl("24 hours")


def test_a_cert_dir_that_does_not_hold_together_names_the_file(tmp_path: Path) -> None:
    run("ca", "init", str(tmp_path / "ca"), "--key-type", "ec")
    for name in ("a", "b"):
        run("ca", "issue", "--ca", str(tmp_path / "ca"), "--namespace", "default", "--service-account", name,
            "--out", str(tmp_path / name), "--key-type", "ec")
    (tmp_path / "a" / "key.pem").write_bytes((tmp_path / "b" / "key.pem").read_bytes())
    with pytest.raises(CertError) as caught:
        read_cert_dir(tmp_path / "a")
    assert caught.value.path == str(tmp_path / "a" / "key.pem") and "does not belong" in caught.value.reason
    (tmp_path / "b" / "root-cert.pem").write_text("junk")
    with pytest.raises(CertError, match="root-cert.pem: not PEM certificates|root-cert.pem: holds no certificate"):
        read_cert_dir(tmp_path / "b")
    run("ca", "issue", "--ca", str(tmp_path / "ca"), "--namespace", "default", "--service-account", "c",
        "--out", str(tmp_path / "c"), "--key-type", "ec")
    later = datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)
    with pytest.raises(CertError, match=r"cert-chain.pem: the certificate of spiffe://.*/sa/c expired at"):
        read_cert_dir(tmp_path / "c", now=later)


def test_store_polls_and_swaps_contexts_only_for_good_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run("ca", "init", str(tmp_path / "ca"), "--key-type", "ec")
    issue = ["ca", "issue", "--ca", str(tmp_path / "ca"), "--namespace", "default", "--service-account", "w",
             "--out", str(tmp_path / "w"), "--key-type", "ec"]
    run(*issue)
    store = CertStore(tmp_path / "w")
    first = store.server_context()
    assert store.server_context() is first and not store.poll()  # nothing changed: one stat per file, no read
    run(*issue)
    assert store.poll() and store.generation == 2 and store.server_context() is not first
    good = store.certs
    (tmp_path / "w" / "cert-chain.pem").write_text("half written")
    with caplog.at_level("ERROR", logger="meshproxy.security"):
        assert not store.poll()  # once: perhaps the agent is between two writes, nothing said yet
        assert not caplog.records
        assert not store.poll()
        (message,) = [r.getMessage() for r in caplog.records]
        assert message.startswith(f"rotated certificates rejected: {tmp_path / 'w' / 'cert-chain.pem'}: not PEM "
                                  "certificates")
        assert message.endswith(f"still using {good.spiffe_id} (valid until {good.not_after:%Y-%m-%dT%H:%M:%SZ})")
        assert not store.poll() and len(caplog.records) == 1  # said once
    assert store.certs is good


def test_spiffe_ids_principals_and_tls_detection() -> None:
    assert spiffe_id("cluster.local", "default", "sleep") == "spiffe://cluster.local/ns/default/sa/sleep"
    assert principal_of("spiffe://cluster.local/ns/default/sa/sleep") == "cluster.local/ns/default/sa/sleep"
    assert principal_of("https://example.com") == ""
    assert peer_principal(None) == ""
    assert looks_like_tls(b"\x16\x03") is True
    assert looks_like_tls(b"GE") is False and looks_like_tls(b"\x16") is None and looks_like_tls(b"") is None


def test_gateway_tls_loads_as_a_typed_server() -> None:
    """Gateway TLS is read into the model (tests/unit/test_gateway_build.py has its checks); the files are read by the
    gateway that serves it (tests/integration/test_gateway_tls.py)."""
    from meshproxy.istio.load import load_text

    problems: list = []
    resources = load_text("""apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: /etc/cert.pem, privateKey: /etc/key.pem}
""", "gw.yaml", problems)
    assert problems == []
    (gateway,) = resources
    tls = gateway.servers[0].tls
    assert tls is not None
    assert (tls.mode, tls.server_certificate, tls.private_key) == ("SIMPLE", "/etc/cert.pem", "/etc/key.pem")


def test_a_proxy_without_tls_does_not_import_cryptography() -> None:
    """8 MiB of idle memory: only certificate reading pulls it in."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, meshproxy.app, meshproxy.cli; "
                           "print(sorted(m for m in sys.modules if m.startswith('cryptography')))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
