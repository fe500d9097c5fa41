"""A mesh root CA and workload certificates, as Istio's self-signed CA (istiod's `istio-ca-secret`) makes them.

`init_ca(dir)` writes the plug-in CA layout Istio reads (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
`cert-chain.pem`; self-signed, so the CA is the root). `issue(ca, namespace, service_account, out)` writes a workload
folder in pilot-agent's layout (`cert-chain.pem`, `key.pem`, `root-cert.pem`): a leaf with an empty subject and the
critical URI SAN `spiffe://<trust domain>/ns/<ns>/sa/<sa>`, key usage digitalSignature + keyEncipherment, extended
key usage serverAuth + clientAuth, 24 h by default (Istio's DEFAULT_WORKLOAD_CERT_TTL). Keys are RSA 2048 (Istio's
default) or EC P-256 (Istio's ECC_SIGNATURE_ALGORITHM=ECDSA).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .spiffe import DEFAULT_TRUST_DOMAIN, spiffe_id

CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
ROOT_CERT: Final = "root-cert.pem"
CERT_CHAIN: Final = "cert-chain.pem"
KEY: Final = "key.pem"

KEY_RSA: Final = "rsa"
KEY_EC: Final = "ec"
KEY_TYPES: Final = (KEY_RSA, KEY_EC)
RSA_BITS: Final = 2048  # Istio's default key size, root and workload
ROOT_TTL: Final = datetime.timedelta(days=3650)  # Istio's self-signed root: 10 years
DEFAULT_WORKLOAD_TTL: Final = datetime.timedelta(hours=24)  # Istio's DEFAULT_WORKLOAD_CERT_TTL
CLOCK_SKEW: Final = datetime.timedelta(minutes=1)  # notBefore a little in the past, for peers whose clock is behind

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class CAError(Exception):
    """A CA folder that cannot be used (missing or unreadable file, key and certificate that do not match)."""


@dataclass(frozen=True, slots=True)
class MeshCA:
    cert: x509.Certificate
    key: PrivateKey
    root_pem: bytes  # the mesh root(s) workloads trust
    trust_domain: str


def new_key(kind: str) -> PrivateKey:
    if kind == KEY_EC:
        return ec.generate_private_key(ec.SECP256R1())
    if kind == KEY_RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"key type {kind!r}: expected one of {', '.join(KEY_TYPES)}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomically (a reader such as a watching sidecar never sees half a file), 0600 for keys."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(folder: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN, key_type: str = KEY_RSA,
            overwrite: bool = False) -> MeshCA:
    """A self-signed mesh root, Istio style: subject O=<trust domain>, CA:true, keyCertSign + cRLSign."""
    spiffe_id(trust_domain, "default", "default")  # validates the trust domain
    folder.mkdir(parents=True, exist_ok=True)
    if not overwrite and (folder / CA_KEY).exists():
        raise CAError(f"{folder / CA_KEY} exists: a CA is already there (pass --force to replace it)")
    key = new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(folder / CA_KEY, _key_pem(key), private=True)
    _write(folder / CA_CERT, pem)
    _write(folder / ROOT_CERT, pem)
    _write(folder / CERT_CHAIN, pem)
    return MeshCA(cert, key, pem, trust_domain)


def load_ca(folder: Path) -> MeshCA:
    """The CA of a folder made by init_ca (or an Istio plug-in CA folder); CAError naming the file otherwise."""
    paths = {name: folder / name for name in (CA_CERT, CA_KEY, ROOT_CERT)}
    data = {}
    for name, path in paths.items():
        try:
            data[name] = path.read_bytes()
        except OSError as exc:
            raise CAError(f"{path}: cannot read ({exc.strerror or exc}); make a CA with `meshproxy ca init`") from None
    try:
        cert = x509.load_pem_x509_certificate(data[CA_CERT])
    except ValueError as exc:
        raise CAError(f"{paths[CA_CERT]}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(data[CA_KEY], password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{paths[CA_KEY]}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CAError(f"{paths[CA_KEY]}: an RSA or EC key is needed")
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CAError(f"{paths[CA_KEY]}: this key does not belong to {paths[CA_CERT]}")
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    trust_domain = str(orgs[0].value) if orgs else DEFAULT_TRUST_DOMAIN
    return MeshCA(cert, key, data[ROOT_CERT], trust_domain)


def issue(ca: MeshCA, namespace: str, service_account: str, out: Path,
          ttl: datetime.timedelta = DEFAULT_WORKLOAD_TTL, key_type: str = KEY_RSA,
          trust_domain: str | None = None) -> str:
    """Write a workload certificate folder (pilot-agent's layout); returns its SPIFFE id."""
    if ttl <= datetime.timedelta(0):
        raise ValueError("the certificate lifetime must be positive")
    identity = spiffe_id(trust_domain or ca.trust_domain, namespace, service_account)
    key = new_key(key_type)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))  # Istio's workload certificates have an empty subject: the SAN is the name
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    chain = cert.public_bytes(serialization.Encoding.PEM)
    if ca.cert.issuer != ca.cert.subject:
        chain += ca.cert.public_bytes(serialization.Encoding.PEM)  # an intermediate CA: the chain carries it
    # The key first: a sidecar watching the folder sees the new pair only once the chain that names it is there.
    _write(out / KEY, _key_pem(key), private=True)
    _write(out / ROOT_CERT, ca.root_pem)
    _write(out / CERT_CHAIN, chain)
    return identity


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_ttl(text: str) -> datetime.timedelta:
    """`24h`, `90m`, `1h30m`, `7d` (Go-style durations, as Istio's flags take them, plus days)."""
    text = text.strip()
    pos, seconds = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration such as 24h, 90m or 1h30m")
    return datetime.timedelta(seconds=seconds)
