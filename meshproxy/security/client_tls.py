"""Upstream TLS per cluster: a DestinationRule's `tls` (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL) and Istio's auto
mTLS, compiled into `UpstreamTLS` objects at config load, never per request.

- SIMPLE: TLS origination, the server verified against `caCertificates` (the system roots when unset, as Istio's
  VERIFY_CERTIFICATE_AT_CLIENT), `caCrl` checked, `subjectAltNames` matched (URI or DNS, exact; a DNS SAN may
  be a wildcard), none of it with `insecureSkipVerify`. Without `sni` the SNI is the service's host (Istio's
  auto SNI, from the destination host) and, when no subjectAltNames are given, the certificate must be valid for
  it (auto SAN validation). Auto SNI and auto SAN validation are HTTP protocol options in Envoy: a TCP cluster
  sends no SNI and checks no name unless `sni` / `subjectAltNames` say so.
- MUTUAL: SIMPLE plus the client certificate `clientCertificate` / `privateKey`.
- ISTIO_MUTUAL: the workload certificates (--cert-dir, rotated), the mesh roots, SNI
  `outbound_.<port>_.<subset>_.<host>`, Istio's ALPN, and the server's SPIFFE id checked against the
  destination's service accounts when known (ServiceEntry `subjectAltNames`, endpoint `serviceAccount`); a
  DestinationRule's own `subjectAltNames` replace them.

- No `tls` at all: auto mTLS, ISTIO_MUTUAL to endpoints labelled `security.istio.io/tlsMode: istio` when the
  proxy has workload certificates, plaintext to the others. An explicit DISABLE is plaintext.

ALPN depends on what the connection carries (`UpstreamTLS.context(protocol)`), as Istio's cluster builder and
Envoy's pools set it: ISTIO_MUTUAL offers `istio-http/1.1`, `istio`, `http/1.1` for HTTP/1.1 (the istio_alpn
filter's override), `istio-h2`, `istio`, `h2` for HTTP/2, and `istio-peer-exchange`, `istio` for TCP (Istio's
ALPNInMeshWithMxc: when chosen, both sides speak the TCP metadata exchange, telemetry/peer_exchange.py);
SIMPLE / MUTUAL offer `h2` for HTTP/2 (Istio's ALPNH2Only), `http/1.1` for HTTP/1.1 (Envoy's HTTP/1.1 pool
fallback) and nothing for TCP.

A SAN mismatch is found after the handshake (Python has no verify callback) and fails the connection as Envoy's
does during it: 503 UF, transport failure reason (Envoy 1.40's words) `TLS_error:|268435581:SSL routines:
OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher, certificate SANs are [<its SANs>]:
TLS_error_end`; a chain that does not verify `...:verify cert failed: X509_verify_cert: certificate verification
error at depth 0: <why>:TLS_error_end`.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..istio import model as m
from ..istio.problems import Problem
from .certs import (
    ALPN_ISTIO_H2,
    ALPN_ISTIO_HTTP11,
    CertError,
    CertStore,
    check_key_pair,
    files_stamp,
    load_certificates,
    load_private_key,
)
from .sessions import ResumingClientContext
from .spiffe import DEFAULT_TRUST_DOMAIN

log = logging.getLogger("meshproxy.security")

DISABLE: Final = "DISABLE"
SIMPLE: Final = "SIMPLE"
MUTUAL: Final = "MUTUAL"
ISTIO_MUTUAL: Final = "ISTIO_MUTUAL"
TLS_MODE_LABEL: Final = "security.istio.io/tlsMode"
TLS_MODE_ISTIO: Final = "istio"

# What an upstream connection carries: its ALPN, and whether Envoy's HTTP-only auto SNI / auto SAN apply.
HTTP11: Final = "http/1.1"
HTTP2: Final = "h2"
TCP: Final = "tcp"
PEER_EXCHANGE: Final = "istio-peer-exchange"  # the ALPN after which Istio's sidecars exchange TCP metadata
ALPN_ISTIO_TCP: Final = (PEER_EXCHANGE, "istio")  # Istio's ALPNInMeshWithMxc
_ISTIO_ALPN: Final = {HTTP11: ALPN_ISTIO_HTTP11, HTTP2: ALPN_ISTIO_H2, TCP: ALPN_ISTIO_TCP}
_ORIGINATION_ALPN: Final[dict[str, tuple[str, ...]]] = {HTTP11: (HTTP11,), HTTP2: (HTTP2,), TCP: ()}

# BoringSSL's packed error codes (ERR_LIB_SSL << 24 | reason), as Envoy writes them in transport failure reasons;
# alerts are SSL_AD_REASON_OFFSET (1000) + the alert number.
_SSL_LIB: Final = 16 << 24
_REASONS: Final = {
    "CERTIFICATE_VERIFY_FAILED": 125,
    "WRONG_VERSION_NUMBER": 247,
    "UNSUPPORTED_PROTOCOL": 252,
    "NO_SHARED_CIPHER": 184,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": 1040,
    "SSLV3_ALERT_BAD_CERTIFICATE": 1042,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": 1045,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": 1046,
    "TLSV1_ALERT_UNKNOWN_CA": 1048,
    "TLSV1_ALERT_ACCESS_DENIED": 1049,
    "TLSV1_ALERT_DECRYPT_ERROR": 1051,
    "TLSV1_ALERT_PROTOCOL_VERSION": 1070,
    "TLSV1_ALERT_INTERNAL_ERROR": 1080,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": 1116,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": 1120,
}
VERIFY_FAILED: Final = "CERTIFICATE_VERIFY_FAILED:verify cert failed: "


def tls_failure_reason(reason: str) -> str:
    """Envoy's transport failure reason for an SSL error reason name (`CERTIFICATE_VERIFY_FAILED`...)."""
    name = reason.partition(":")[0]
    code = _REASONS.get(name)
    packed = f"{_SSL_LIB + code}:" if code is not None else ""
    return f"TLS_error:|{packed}SSL routines:OPENSSL_internal:{reason}:TLS_error_end"


def san_mismatch_reason(sans: Iterable[str]) -> str:
    """Envoy 1.40's words when no SAN of the server's certificate is one the cluster expects."""
    return tls_failure_reason(f"{VERIFY_FAILED}SAN matcher, certificate SANs are [{', '.join(sans)}]")


def handshake_failure_reason(exc: BaseException) -> str:
    """An exception of a failed client handshake -> Envoy's transport failure reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):  # the chain: Python does not say at which depth; the leaf's
        return tls_failure_reason(f"{VERIFY_FAILED}X509_verify_cert: certificate verification error at depth 0: "
                                  f"{exc.verify_message}")
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return tls_failure_reason(str(exc.reason))
    if isinstance(exc, (ConnectionResetError, ssl.SSLEOFError, EOFError, ConnectionAbortedError)):
        return "TLS_error:|Connection reset by peer:TLS_error_end"  # closed by the server during the handshake
    return f"TLS_error:|{exc}:TLS_error_end"


def dns_matches(pattern: str, name: str) -> bool:
    """A certificate's DNS SAN `pattern` (maybe `*.example.com`) against an expected name, as Envoy's
    dnsNameMatch: the wildcard stands for exactly one label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


FILE_CHECK_INTERVAL: Final = 1.0  # seconds between two looks at a setting's files (at a new connection)


class FileContext:
    """A SIMPLE / MUTUAL setting's context, made again when its files change (as Istio's agent serves file
    certificates to Envoy by SDS with a file watch): looked at, with a stat per file, at most once a second and
    only when a new connection asks. Files that do not load keep the last good context and are logged as an error
    naming the file (once; the same files twice, as a rotation may be caught half written)."""

    __slots__ = ("spec", "paths", "contexts", "stamp", "checked_at", "suspect", "failed")

    def __init__(self, spec: m.ClientTLSSettings) -> None:
        self.spec = spec
        self.paths = tuple(Path(p) for p in (spec.ca_certificates, spec.ca_crl, spec.client_certificate,
                                             spec.private_key) if p)
        self.stamp = files_stamp(self.paths)
        # One context per ALPN list asked for (an SSLContext carries its ALPN); HTTP/1.1's made at once, so that
        # CertError refuses the setting at load.
        self.contexts: dict[tuple[str, ...], ssl.SSLContext] = {(HTTP11,): simple_context(self.spec, (HTTP11,))}
        self.checked_at = time.monotonic()
        self.suspect: tuple[Any, ...] | None = None
        self.failed: tuple[Any, ...] | None = None

    def current(self, alpn: tuple[str, ...] = (HTTP11,)) -> ssl.SSLContext:
        """CertError only when files that loaded before no longer do and this ALPN list never had a context."""
        now = time.monotonic()
        if now - self.checked_at >= FILE_CHECK_INTERVAL and self.paths:
            self.checked_at = now
            stamp = files_stamp(self.paths)
            if stamp != self.stamp and stamp != self.failed:
                try:
                    contexts = {known: simple_context(self.spec, known) for known in self.contexts}
                except CertError as exc:
                    if stamp == self.suspect:
                        self.failed = stamp
                        log.error("rotated TLS files rejected: %s: %s; the previous ones stay in use", exc.path,
                                  exc.reason)
                    self.suspect = stamp
                else:
                    self.contexts, self.stamp, self.suspect, self.failed = contexts, stamp, None, None
                    log.info("TLS files reloaded: %s", ", ".join(map(str, self.paths)))
        context = self.contexts.get(alpn)
        if context is None:
            context = self.contexts[alpn] = simple_context(self.spec, alpn)
        return context


@dataclass(frozen=True, slots=True, eq=False)
class UpstreamTLS:
    """How connections to one endpoint of one cluster do TLS: read once per new connection."""

    mode: str
    server_hostname: str  # SNI; "" sends none
    subject_alt_names: tuple[str, ...]  # the server must present one of these (URI or DNS); () checks none
    files: FileContext | None = None  # SIMPLE / MUTUAL: the setting's context, made again when its files change
    store: CertStore | None = None  # ISTIO_MUTUAL: the current workload certificates' context (rotation)
    error: str = ""  # settings that could not be loaded: every connection fails with this transport reason
    auto_sni: bool = False  # server_hostname is Istio's auto SNI (the host): HTTP only, as Envoy's option
    auto_san: bool = False  # subject_alt_names is Istio's auto SAN validation (the host): HTTP only

    @property
    def mutual(self) -> bool:
        return self.mode in (MUTUAL, ISTIO_MUTUAL)

    def alpn(self, protocol: str = HTTP11) -> tuple[str, ...]:
        """What a connection carrying `protocol` (HTTP11, HTTP2, TCP) offers (see the module docstring)."""
        return (_ISTIO_ALPN if self.store is not None else _ORIGINATION_ALPN)[protocol]

    def context(self, protocol: str = HTTP11) -> ssl.SSLContext:
        """The context of a new connection carrying `protocol`: the current files' or certificates'."""
        if self.store is not None:
            return self.store.client_context(_ISTIO_ALPN[protocol])
        assert self.files is not None
        return self.files.current(_ORIGINATION_ALPN[protocol])

    def sni(self, protocol: str = HTTP11) -> str:
        return "" if self.auto_sni and protocol == TCP else self.server_hostname

    def check_peer(self, ssl_object: Any, protocol: str = HTTP11) -> str:
        """After the handshake: "" when the server's certificate names an expected SAN, else Envoy's transport
        failure reason."""
        expected = self.subject_alt_names
        if not expected or (self.auto_san and protocol == TCP):
            return ""
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        names = (cert or {}).get("subjectAltName", ())
        for san in expected:
            for kind, value in names:
                if (kind == "DNS" and dns_matches(value, san)) or (kind != "DNS" and value == san):
                    return ""
        return san_mismatch_reason(value for _, value in names)


def istio_sni(cluster_name: str) -> str:
    """`outbound|9080|v1|reviews.default.svc.cluster.local` -> `outbound_.9080_.v1_.reviews.default.svc.cluster.local`
    (Istio's SNI for ISTIO_MUTUAL, the cluster name with `_.` for `|`)."""
    return cluster_name.replace("|", "_.")


def _base_client_context() -> ssl.SSLContext:
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)  # sessions resumed per SNI, as Envoy's upstream TLS
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # Envoy's upstream default
    return context


def simple_context(spec: m.ClientTLSSettings, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """SIMPLE / MUTUAL: CertError naming the file that does not load. Names are checked after the handshake
    (UpstreamTLS.check_peer), as Envoy's SAN matcher, not by OpenSSL's host name check."""
    context = _base_client_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.check_hostname = False
    if spec.insecure_skip_verify:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        if spec.ca_certificates:
            path = Path(spec.ca_certificates)
            load_certificates(path)
            _load(context.load_verify_locations, path)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if spec.ca_crl:
            _load(context.load_verify_locations, Path(spec.ca_crl))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if spec.mode == MUTUAL:
        cert_path, key_path = Path(spec.client_certificate), Path(spec.private_key)
        chain = load_certificates(cert_path)
        check_key_pair(chain[0], load_private_key(key_path), key_path, cert_path)
        try:
            context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise CertError(cert_path, f"not usable as a client certificate ({exc})") from None
    return context


def _load(method: Any, path: Path) -> None:
    try:
        method(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise CertError(path, f"cannot be loaded ({getattr(exc, 'strerror', None) or exc})") from None


class UpstreamTLSCompiler:
    """ClientTLSSettings (+ the cluster's SNI and SANs) -> UpstreamTLS, cached by settings: one SSLContext per
    distinct setting, shared by the clusters that use it. At each config load `check_tls_files` proves every
    setting loads and the cache is emptied; `for_endpoint` runs when the data path meets a new cluster (its
    ClusterState is built), once per endpoint, never per request."""

    def __init__(self, store: CertStore | None) -> None:
        self.store = store
        self.cache: dict[tuple[Any, ...], UpstreamTLS] = {}

    @property
    def trust_domain(self) -> str:
        return self.store.certs.trust_domain if self.store is not None else DEFAULT_TRUST_DOMAIN

    def for_endpoint(self, spec: m.ClientTLSSettings | None, cluster_name: str, service: str,
                     sans: tuple[str, ...], service_accounts: tuple[tuple[str, str], ...],
                     labels: Mapping[str, str]) -> UpstreamTLS | None:
        """None: plaintext."""
        if spec is None:  # auto mTLS
            if self.store is None or labels.get(TLS_MODE_LABEL) != TLS_MODE_ISTIO:
                return None
            spec = AUTO_MUTUAL
        if spec.mode == DISABLE:
            return None
        return self.compile(spec, cluster_name, service, sans, service_accounts)

    def compile(self, spec: m.ClientTLSSettings, cluster_name: str, service: str, sans: tuple[str, ...],
                service_accounts: tuple[tuple[str, str], ...]) -> UpstreamTLS:
        if spec.mode == ISTIO_MUTUAL:
            if self.store is None:
                raise CertError("--cert-dir", "tls mode ISTIO_MUTUAL needs the workload certificates: start "
                                              "meshproxy with --cert-dir (`meshproxy ca issue` makes a folder)")
            expected = spec.subject_alt_names or sans + tuple(
                f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}" for ns, sa in service_accounts)
            key: tuple[Any, ...] = (spec.mode, spec.sni or istio_sni(cluster_name), tuple(dict.fromkeys(expected)))
            found = self.cache.get(key)
            if found is None:
                found = self.cache[key] = UpstreamTLS(ISTIO_MUTUAL, key[1], key[2], store=self.store)
            return found
        sni = spec.sni or service
        expected = () if spec.insecure_skip_verify else spec.subject_alt_names
        auto_san = not spec.sni and not expected and not spec.insecure_skip_verify and bool(sni)
        if auto_san:
            expected = (sni,)  # Istio's auto SAN validation: the certificate must be valid for the auto SNI
        key = (spec, sni, expected)
        found = self.cache.get(key)
        if found is None:
            files = next((tls.files for known, tls in self.cache.items() if known[0] == spec), None)
            if files is None:  # one context per setting, whatever the SNI
                files = FileContext(spec)
            found = self.cache[key] = UpstreamTLS(spec.mode, sni, expected, files=files, auto_sni=not spec.sni,
                                                  auto_san=auto_san)
        return found


AUTO_MUTUAL: Final = m.ClientTLSSettings(mode=ISTIO_MUTUAL)


def broken_tls(message: str) -> UpstreamTLS:
    """For a cluster whose TLS files stopped loading after the load that checked them: its connections fail
    (503 UF) rather than go out in plaintext."""
    return UpstreamTLS(DISABLE, "", (), error=f"TLS_error:|{message}:TLS_error_end")


def tls_places(snapshot: m.Snapshot) -> Iterable[tuple[m.DestinationRule, str, m.ClientTLSSettings]]:
    """Every `tls` of every DestinationRule, with its field path (for problems)."""
    for dr in snapshot.destination_rules:
        layers: list[tuple[str, m.TrafficPolicy | None]] = [("spec.trafficPolicy", dr.traffic_policy)]
        layers += [(f"spec.subsets[{i}].trafficPolicy", s.traffic_policy) for i, s in enumerate(dr.subsets)]
        for path, policy in layers:
            if policy is None:
                continue
            if policy.tls is not None:
                yield dr, f"{path}.tls", policy.tls
            for i, port in enumerate(policy.port_level_settings):
                if port.tls is not None:
                    yield dr, f"{path}.portLevelSettings[{i}].tls", port.tls


_FILE_FIELDS: Final = (("caCertificates", "ca_certificates"), ("clientCertificate", "client_certificate"),
                       ("privateKey", "private_key"), ("caCrl", "ca_crl"))


def check_tls_files(snapshot: m.Snapshot, compiler: UpstreamTLSCompiler) -> list[Problem]:
    """At load: every SIMPLE / MUTUAL setting's files load, and ISTIO_MUTUAL has workload certificates; each
    problem names the DestinationRule's file, document and field (and the certificate file at fault)."""
    problems: list[Problem] = []
    for dr, path, spec in tls_places(snapshot):
        origin = dr.meta.origin
        if spec.mode == ISTIO_MUTUAL and compiler.store is None:
            problems.append(Problem(origin.file, origin.doc, f"{path}.mode",
                                    "tls mode ISTIO_MUTUAL needs the workload certificates: start meshproxy with "
                                    "--cert-dir (`meshproxy ca issue` makes a folder)"))
        elif spec.mode in (SIMPLE, MUTUAL):
            try:
                simple_context(spec)
            except CertError as exc:
                field = next((name for name, attr in _FILE_FIELDS if getattr(spec, attr) == exc.path), "mode")
                problems.append(Problem(origin.file, origin.doc, f"{path}.{field}", f"{exc.path}: {exc.reason}"))
    return problems
