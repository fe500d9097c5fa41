"""The workload's certificates, read from a folder in pilot-agent's layout, and the TLS contexts made from them.

`meshproxy run --cert-dir DIR` reads `cert-chain.pem` (the leaf first), `key.pem` and `root-cert.pem`, as Istio's
agent writes them (`/etc/certs`, or the files of `OUTPUT_CERTS`), so that in a cluster an Istio agent can supply
them. `CertStore` keeps the current set and re-reads it when a file changes (polled with a stat: inode, size,
mtime); new connections get contexts made from the new files, connections already open keep theirs. A rotated set
that does not load (half written, a key that does not match, an expired certificate) keeps the previous one and
is logged as an error naming the file.

Contexts follow Istio's sidecar defaults: TLS 1.2 to 1.3, the ECDHE AEAD cipher suites for TLS 1.2, the peer
verified against the mesh roots; the server side requires a client certificate (Istio's inbound mTLS, STRICT and
PERMISSIVE alike). ALPN: the client offers what Istio's sidecars offer for an HTTP/1.1 request over ISTIO_MUTUAL
(`istio-http/1.1`, `istio`, `http/1.1`, the istio_alpn filter's override); the server selects among the protocols
its listener speaks (`http/1.1` here; `istio-*` names only route in Envoy's filter chain match, no server selects
them).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .peer import remember_sni
from .sessions import ResumingClientContext
from .spiffe import principal_of, trust_domain_of

if TYPE_CHECKING:  # imported where used: cryptography costs 8 MiB, which a proxy without TLS should not carry
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import SSHPrivateKeyTypes

log = logging.getLogger("meshproxy.security")

CERT_CHAIN: Final = "cert-chain.pem"
KEY: Final = "key.pem"
ROOT_CERT: Final = "root-cert.pem"
FILES: Final = (CERT_CHAIN, KEY, ROOT_CERT)

# Istio's sidecar defaults (meshConfig.meshMTLS; security/pkg/...: SupportedCiphers for TLS 1.2).
TLS12_CIPHERS: Final = ":".join((
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
ALPN_ISTIO_HTTP11: Final = ("istio-http/1.1", "istio", "http/1.1")  # Istio's mtlsHTTP11ALPN (istio_alpn filter)
ALPN_ISTIO_H2: Final = ("istio-h2", "istio", "h2")  # mtlsHTTP2ALPN, for an HTTP/2 upstream
ALPN_SERVER_HTTP11: Final = ("http/1.1",)
DEFAULT_POLL_INTERVAL: Final = 1.0


class CertError(Exception):
    """A certificate folder or file that cannot be used; the message names the file."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message


@dataclass(frozen=True, slots=True)
class WorkloadCerts:
    """One consistent read of a certificate folder."""

    directory: Path
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    spiffe_id: str  # spiffe://cluster.local/ns/default/sa/bookinfo-reviews
    not_after: datetime.datetime

    @property
    def principal(self) -> str:
        """Istio's principal form: `cluster.local/ns/default/sa/bookinfo-reviews`."""
        return principal_of(self.spiffe_id)

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.spiffe_id)


FOLDER_HINT: Final = ("the folder needs cert-chain.pem, key.pem and root-cert.pem, as pilot-agent writes them; "
                      "`meshproxy ca issue` makes one")


def _read(path: Path, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(path, f"missing ({hint})" if hint else "missing") from None
    except OSError as exc:
        raise CertError(path, f"cannot read: {exc.strerror or exc}") from None


def load_certificates(path: Path, data: bytes | None = None) -> list[x509.Certificate]:
    """Every PEM certificate of a file (at least one); CertError naming the file otherwise."""
    from cryptography import x509

    raw = _read(path) if data is None else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise CertError(path, f"not PEM certificates ({exc})") from None
    if not certs:
        raise CertError(path, "holds no certificate")
    return certs


def load_private_key(path: Path, data: bytes | None = None) -> SSHPrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    raw = _read(path) if data is None else data
    try:
        return serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(path, f"not an unencrypted PEM private key ({exc})") from None


def check_key_pair(cert: x509.Certificate, key: SSHPrivateKeyTypes, key_path: Path, cert_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise CertError(key_path, f"this private key does not belong to the first certificate of {cert_path}")


def read_cert_dir(directory: Path | str, now: datetime.datetime | None = None) -> WorkloadCerts:
    """Read and check a workload certificate folder; CertError naming the file at fault."""
    from cryptography import x509

    folder = Path(directory)
    chain_path, key_path, roots_path = (folder / name for name in FILES)
    chain_pem, key_pem, roots_pem = (_read(p, FOLDER_HINT) for p in (chain_path, key_path, roots_path))
    chain = load_certificates(chain_path, chain_pem)
    key = load_private_key(key_path, key_pem)
    load_certificates(roots_path, roots_pem)
    leaf = chain[0]
    check_key_pair(leaf, key, key_path, chain_path)
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = next((uri for uri in uris if principal_of(uri)), "")
    if not spiffe:
        raise CertError(chain_path, "the certificate has no spiffe:// URI SAN: it names no workload identity")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        raise CertError(chain_path, f"the certificate of {spiffe} expired at {not_after:%Y-%m-%dT%H:%M:%SZ}")
    return WorkloadCerts(folder, chain_pem, key_pem, roots_pem, spiffe, not_after)


def load_chain_and_key(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` from bytes already read and checked (the files may change under us meanwhile): through
    a private temporary file, removed at once."""
    fd, name = tempfile.mkstemp(prefix="meshproxy-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(chain_pem if chain_pem.endswith(b"\n") else chain_pem + b"\n")
            out.write(key_pem)
        context.load_cert_chain(name)
    finally:
        os.unlink(name)


def _istio_defaults(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)


def server_context(certs: WorkloadCerts, require_client_cert: bool = True,
                   alpn: Sequence[str] = ALPN_SERVER_HTTP11) -> ssl.SSLContext:
    """The inbound side of mutual TLS: our certificate, the client's verified against the mesh roots."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _istio_defaults(context)
    load_chain_and_key(context, certs.chain_pem, certs.key_pem)
    context.load_verify_locations(cadata=certs.roots_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    context.sni_callback = remember_sni
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def client_context(certs: WorkloadCerts, alpn: Sequence[str] = ALPN_ISTIO_HTTP11) -> ssl.SSLContext:
    """ISTIO_MUTUAL: our certificate, the server's verified against the mesh roots (its SPIFFE id is checked
    against the destination's service accounts after the handshake, see client_tls.py)."""
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)  # as Envoy, resumes sessions between sidecars
    _istio_defaults(context)
    context.check_hostname = False  # a SPIFFE identity is no host name
    context.verify_mode = ssl.CERT_REQUIRED
    load_chain_and_key(context, certs.chain_pem, certs.key_pem)
    context.load_verify_locations(cadata=certs.roots_pem.decode("ascii"))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


Stamp = tuple[tuple[int, int, int, int] | None, ...]


def files_stamp(paths: Iterable[Path]) -> Stamp:
    """What tells a changed file, for the price of a stat each (a Kubernetes secret volume swaps a symlink: the
    inode changes; an in-place write changes the size or mtime); None for a file that is not there."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _stamp(folder: Path) -> Stamp:
    return files_stamp(folder / name for name in FILES)


class CertStore:
    """The current workload certificates and their contexts; `poll()` picks up rotated files (see the module
    docstring). Contexts are made once per certificate set and reused by every connection until the next one."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.stamp = _stamp(self.directory)
        self.certs = read_cert_dir(self.directory)  # CertError at start: the proxy does not start without them
        self.generation = 1  # bumped at each rotation
        self.suspect: Stamp | None = None  # files that did not load once (perhaps half written)
        self.failed: Stamp | None = None  # files that did not load twice: logged once, until they change
        self._server: dict[tuple[bool, tuple[str, ...]], ssl.SSLContext] = {}
        self._client: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._task: asyncio.Task[None] | None = None

    def server_context(self, require_client_cert: bool = True,
                       alpn: Sequence[str] = ALPN_SERVER_HTTP11) -> ssl.SSLContext:
        key = (require_client_cert, tuple(alpn))
        context = self._server.get(key)
        if context is None:
            context = self._server[key] = server_context(self.certs, require_client_cert, alpn)
        return context

    def client_context(self, alpn: Sequence[str] = ALPN_ISTIO_HTTP11) -> ssl.SSLContext:
        key = tuple(alpn)
        context = self._client.get(key)
        if context is None:
            context = self._client[key] = client_context(self.certs, alpn)
        return context

    def poll(self) -> bool:
        """Re-read the folder if a file changed; True when new certificates are in use."""
        stamp = _stamp(self.directory)
        if stamp == self.stamp or stamp == self.failed:
            return False
        try:
            certs = read_cert_dir(self.directory)
            # what Python's ssl makes of them, before they replace working contexts
            server_context(certs)
            client_context(certs)
        except (CertError, ssl.SSLError, ValueError) as exc:
            # The agent may be between two writes of a rotation: an error only when the same files fail twice.
            if stamp != self.suspect:
                self.suspect = stamp
                return False
            self.failed = stamp
            path = exc.path if isinstance(exc, CertError) else str(self.directory)
            reason = exc.reason if isinstance(exc, CertError) else str(exc)
            log.error("rotated certificates rejected: %s: %s; still using %s (valid until %s)", path, reason,
                          self.certs.spiffe_id, f"{self.certs.not_after:%Y-%m-%dT%H:%M:%SZ}")
            return False
        self.stamp, self.certs, self.failed, self.suspect = stamp, certs, None, None
        self.generation += 1
        self._server.clear()
        self._client.clear()
        log.info("certificates rotated: %s from %s, valid until %s", certs.spiffe_id, self.directory,
                 f"{certs.not_after:%Y-%m-%dT%H:%M:%SZ}")
        return True

    def start(self, interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if self._task is None and interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(interval))

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # the watch must survive anything: the current certificates stay in use
                log.exception("checking the certificates in %s failed", self.directory)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
