"""The ingress gateway's TLS termination: a Gateway's `servers[].tls` (SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL)
compiled at load into one TLS context per server, grouped per listener port, the server picked by SNI as Envoy's
filter chain match picks it.

- **Files**: `serverCertificate`, `privateKey`, `caCertificates` are paths; `credentialName: NAME` is a folder
  `--credentials-dir DIR/NAME/` in the layout of the Kubernetes secrets Istio reads: `cert`, `key`, `cacert` (a
  generic secret) or `tls.crt`, `tls.key`, `ca.crt` (a TLS secret), the generic names first as in Istio's
  credentials controller; MUTUAL's CA may also be in `DIR/NAME-cacert/` (Istio's `<name>-cacert` secret).
  ISTIO_MUTUAL uses the gateway's own workload certificates (`--cert-dir`: cert-chain.pem, key.pem) and requires a
  client certificate from the mesh roots (root-cert.pem), as Istio's gateways do with their SDS identity.
- **SNI**, as Envoy's `server_names` (istiod gives a server's hosts, none when a host is `*`): an exact name first,
  then the longest wildcard suffix, then a server whose hosts include `*`; no SNI, or an SNI no server names, with
  no `*` server: the handshake fails (`unrecognized_name`), as Envoy finds no filter chain and closes.
- **One port, several servers**: Python's ssl switches the certificate and the trusted CA at SNI time, but the
  client-certificate request, protocol versions and cipher suites are the connection's before SNI is read; so the
  TLS servers of one port must agree on those (a load error otherwise, naming the server). Sessions are kept by the
  port's first context whichever server SNI picked, so a session could resume under another server than the one
  that verified its client certificate: servers of one port that verify clients must trust the same client CA.
- **Defaults**, as Istio's gateways: TLS 1.2 to 1.3, the ECDHE AEAD suites for TLS 1.2; ALPN `http/1.1` (the
  gateway's TLS listener speaks HTTP/1.1; Istio also offers h2).
- **Rotation**: `GatewayTLS.poll()` stats the files of every server (as security/certs.py does for workload
  certificates); changed files give new contexts to new connections, open connections keep theirs. Files that do
  not load keep the running contexts and are logged as an error naming the file. A config reload reads them anew:
  there a file that does not load is a load error naming the file, document and field, and the running config stays.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..istio import model as m
from ..istio.problems import Problem
from .certs import (
    CERT_CHAIN,
    CertError,
    KEY,
    ROOT_CERT,
    TLS12_CIPHERS,
    check_key_pair,
    files_stamp,
    load_certificates,
    load_chain_and_key,
    load_private_key,
)
from .peer import remember_sni

log = logging.getLogger("meshproxy.security")

# Istio's Kubernetes secret keys (pilot/pkg/credentials/kube/secrets.go): generic first, then kubernetes.io/tls.
GENERIC_FILES: Final = ("cert", "key", "cacert")
TLS_SECRET_FILES: Final = ("tls.crt", "tls.key", "ca.crt")
CA_SUFFIX: Final = "-cacert"  # Istio's GatewaySdsCaSuffix: a separate secret holding the client CA
VERSIONS: Final = {"TLSV1_0": ssl.TLSVersion.TLSv1, "TLSV1_1": ssl.TLSVersion.TLSv1_1,
                   "TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}
DEFAULT_MIN: Final = ssl.TLSVersion.TLSv1_2  # Istio's gateway default
DEFAULT_MAX: Final = ssl.TLSVersion.TLSv1_3
ALPN: Final = ("http/1.1",)
VERIFY: Final = {"SIMPLE": ssl.CERT_NONE, "MUTUAL": ssl.CERT_REQUIRED, "OPTIONAL_MUTUAL": ssl.CERT_OPTIONAL,
                  "ISTIO_MUTUAL": ssl.CERT_REQUIRED}
ANY_HOST: Final = "*"


class ServerTLSError(Exception):
    """A server's TLS that cannot be used: the field at fault (`tls.credentialName`...) and why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """Where one server's certificate, key and client CA are read, with the field each comes from."""

    cert: Path
    key: Path
    ca: Path | None
    cert_field: str = "serverCertificate"
    key_field: str = "privateKey"
    ca_field: str = "caCertificates"

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.ca,) if self.ca is not None else ())


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def credential_files(credentials_dir: str | None, name: str, wants_ca: bool) -> ServerFiles:
    """`credentialName` -> its files in `--credentials-dir` (see the module docstring)."""
    where = "tls.credentialName"
    if not credentials_dir:
        raise ServerTLSError(where, f"credentialName {name!r} needs the folder of credentials: start meshproxy "
                                    f"with --credentials-dir DIR, DIR/{name}/ holding tls.crt and tls.key (or cert "
                                    f"and key)")
    if "/" in name or name in (".", ".."):
        raise ServerTLSError(where, f"credentialName {name!r} is not a secret name")
    folder = Path(credentials_dir) / name
    if not folder.is_dir():
        raise ServerTLSError(where, f"{folder}: no such folder (credentialName {name!r} in --credentials-dir)")
    for cert_name, key_name, ca_name in (GENERIC_FILES, TLS_SECRET_FILES):
        if (folder / cert_name).is_file() and (folder / key_name).is_file():
            break
    else:
        raise ServerTLSError(where, f"{folder}: holds neither tls.crt and tls.key nor cert and key")
    ca: Path | None = None
    if wants_ca:
        ca = _first_existing(folder, (ca_name, "cacert", "ca.crt")) or \
            _first_existing(Path(credentials_dir) / (name + CA_SUFFIX), ("cacert", "ca.crt"))
        if ca is None:
            raise ServerTLSError(where, f"{folder}: MUTUAL TLS needs the client CA: ca.crt (or cacert) in this folder "
                                        f"or in {folder}{CA_SUFFIX}/")
    return ServerFiles(folder / cert_name, folder / key_name, ca, where, where, where)


def server_files(tls: m.ServerTLSSettings, credentials_dir: str | None, cert_dir: str | None = None) -> ServerFiles:
    if tls.mode == "ISTIO_MUTUAL":  # the gateway's workload certificates; clients verified against the mesh roots
        if not cert_dir:
            raise ServerTLSError("tls.mode", "tls mode ISTIO_MUTUAL needs the gateway's workload certificates: start "
                                             "it with --cert-dir (`meshproxy ca issue` makes a folder)")
        folder = Path(cert_dir)
        return ServerFiles(folder / CERT_CHAIN, folder / KEY, folder / ROOT_CERT, "tls.mode", "tls.mode", "tls.mode")
    wants_ca = tls.mode != "SIMPLE"
    if tls.credential_name:
        return credential_files(credentials_dir, tls.credential_name, wants_ca)
    return ServerFiles(Path(tls.server_certificate), Path(tls.private_key),
                       Path(tls.ca_certificates) if wants_ca and tls.ca_certificates else None,
                       "tls.serverCertificate", "tls.privateKey", "tls.caCertificates")


def cipher_list(suites: Sequence[str]) -> tuple[str, list[str]]:
    """Istio's cipherSuites -> an OpenSSL cipher string, and the names OpenSSL does not know (Istio warns about
    invalid names and ignores them); the default is Istio's gateway list."""
    if not suites:
        return TLS12_CIPHERS, []
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    known: list[str] = []
    unknown: list[str] = []
    for suite in dict.fromkeys(suites):
        try:
            probe.set_ciphers(suite)
        except ssl.SSLError:
            unknown.append(suite)
            continue
        known.append(suite)
    return ":".join(known), unknown


@dataclass(frozen=True, slots=True)
class Handshake:
    """What one connection settles before SNI is read: the servers of a port must agree on it."""

    verify: ssl.VerifyMode
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    ciphers: str


def handshake_of(tls: m.ServerTLSSettings) -> Handshake:
    ciphers, _ = cipher_list(tls.cipher_suites)
    return Handshake(VERIFY[tls.mode], VERSIONS.get(tls.min_protocol_version, DEFAULT_MIN),
                     VERSIONS.get(tls.max_protocol_version, DEFAULT_MAX), ciphers)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(path, "missing") from None
    except OSError as exc:
        raise CertError(path, f"cannot read: {exc.strerror or exc}") from None


def server_context(files: ServerFiles, handshake: Handshake) -> ssl.SSLContext:
    """One server's context from its files, each read once (a rotation may be writing them); CertError naming the
    file that does not load."""
    chain_pem, key_pem = _read(files.cert), _read(files.key)
    chain = load_certificates(files.cert, chain_pem)
    check_key_pair(chain[0], load_private_key(files.key, key_pem), files.key, files.cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = handshake.minimum
    context.maximum_version = handshake.maximum
    if handshake.ciphers:
        context.set_ciphers(handshake.ciphers)
    try:
        load_chain_and_key(context, chain_pem, key_pem)
    except ssl.SSLError as exc:
        raise CertError(files.cert, f"not usable as a server certificate with {files.key}: {exc}") from None
    if files.ca is not None:
        ca_pem = _read(files.ca)
        load_certificates(files.ca, ca_pem)  # a clear message for a file that is not PEM certificates
        context.load_verify_locations(cadata=ca_pem.decode("ascii", errors="replace"))
    context.verify_mode = handshake.verify
    context.set_alpn_protocols(list(ALPN))
    return context


@dataclass(slots=True)
class CompiledServer:
    server: m.GatewayServer
    origin: m.Origin
    files: ServerFiles
    handshake: Handshake
    names: tuple[str, ...]  # SNI names (hosts without namespace); "*" matches any SNI and none
    context: ssl.SSLContext
    stamp: tuple[tuple[int, int, int, int] | None, ...] = ()
    client_ca: bytes = b""  # the CA bundle client certificates are verified against ("" when none is asked)


def client_ca_of(files: ServerFiles) -> bytes:
    return _read(files.ca) if files.ca is not None else b""


def other_client_ca(servers: Sequence[CompiledServer]) -> CompiledServer | None:
    """The first server that verifies clients against another CA than the port's first server (see the module
    docstring: a session verified by one could resume under the other)."""
    if len(servers) < 2 or servers[0].handshake.verify == ssl.CERT_NONE:
        return None
    return next((c for c in servers[1:] if c.client_ca != servers[0].client_ca), None)


@dataclass(slots=True)
class PortTLS:
    """The TLS servers of one gateway port: `context()` is what the listener hands each new connection."""

    number: int
    servers: list[CompiledServer]
    exact: dict[str, CompiledServer] = field(default_factory=dict)
    wildcards: list[tuple[str, CompiledServer]] = field(default_factory=list)  # (".suffix", server), longest first
    fallback: CompiledServer | None = None  # a server whose hosts include "*"
    base: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        for compiled in self.servers:
            for name in compiled.names:
                if name == ANY_HOST:
                    self.fallback = self.fallback or compiled
                elif name.startswith("*."):
                    if all(suffix != name[1:] for suffix, _ in self.wildcards):
                        self.wildcards.append((name[1:], compiled))
                else:
                    self.exact.setdefault(name, compiled)
        self.wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        for compiled in self.servers:
            compiled.context.sni_callback = self._pick
        self.base = (self.fallback or self.servers[0]).context

    def select(self, server_name: str | None) -> CompiledServer | None:
        """Envoy's filter chain match on the requested server name."""
        if server_name:
            name = server_name.lower().rstrip(".")
            hit = self.exact.get(name)
            if hit is not None:
                return hit
            for suffix, compiled in self.wildcards:
                if name.endswith(suffix):
                    return compiled
        return self.fallback

    def _pick(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> int | None:
        remember_sni(ssl_object, server_name, context)
        compiled = self.select(server_name)
        if compiled is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if compiled.context is not context:
            ssl_object.context = compiled.context
        return None

    def context(self) -> ssl.SSLContext:
        assert self.base is not None
        return self.base


def _compile_port(number: int, servers: Sequence[tuple[m.Gateway, m.GatewayServer]], credentials_dir: str | None,
                  cert_dir: str | None, problems: list[Problem]) -> PortTLS | None:
    compiled: list[CompiledServer] = []
    plain: list[m.GatewayServer] = []
    first: tuple[m.GatewayServer, Handshake] | None = None
    for gateway, server in servers:
        origin = gateway.meta.origin
        tls = server.tls
        if tls is None or tls.mode not in VERIFY:
            plain.append(server)
            continue
        where = f"{server.path}.tls"
        _, unknown = cipher_list(tls.cipher_suites)
        if unknown:
            problems.append(Problem(origin.file, origin.doc, f"{where}.cipherSuites",
                                    f"ignoring invalid cipher suites: {', '.join(unknown)}", "warning"))
            if len(unknown) == len(set(tls.cipher_suites)):
                problems.append(Problem(origin.file, origin.doc, f"{where}.cipherSuites",
                                        "no cipher suite OpenSSL knows is left"))
                continue
        handshake = handshake_of(tls)
        if first is None:
            first = (server, handshake)
        elif handshake != first[1]:
            problems.append(Problem(origin.file, origin.doc, where,
                                    f"port {number} has TLS servers that differ in client certificates, protocol "
                                    f"versions or cipher suites ({first[0].path} and this one): not implemented (one "
                                    f"connection settles them before SNI picks the server); use separate ports"))
            continue
        try:
            files = server_files(tls, credentials_dir, cert_dir)
            context = server_context(files, handshake)
            client_ca = client_ca_of(files)
        except ServerTLSError as exc:
            problems.append(Problem(origin.file, origin.doc, f"{server.path}.{exc.field}", exc.message))
            continue
        except CertError as exc:
            field_name = next((name for name, path in ((files.cert_field, files.cert), (files.key_field, files.key),
                                                         (files.ca_field, files.ca)) if str(path) == exc.path),
                              "tls")
            problems.append(Problem(origin.file, origin.doc, f"{server.path}.{field_name}",
                                    f"{exc.path}: {exc.reason}"))
            continue
        except (ssl.SSLError, ValueError) as exc:
            problems.append(Problem(origin.file, origin.doc, where, f"not usable: {exc}"))
            continue
        names = tuple(dict.fromkeys(h.rpartition("/")[2].lower() for h in server.hosts))
        for name in names:  # Istio: conflicting servers, the first one wins
            earlier = next((c for c in compiled if name in c.names), None)
            if earlier is not None:
                problems.append(Problem(origin.file, origin.doc, f"{server.path}.hosts",
                                        f"{name!r} on port {number} is already served by {earlier.server.path}: "
                                        f"that server's certificate is used", "warning"))
        compiled.append(CompiledServer(server, origin, files, handshake, names, context, files_stamp(files.paths()),
                                       client_ca))
    other = other_client_ca(compiled)
    if other is not None:
        problems.append(Problem(other.origin.file, other.origin.doc, f"{other.server.path}.tls",
                                f"port {number} has servers that verify client certificates against different CAs "
                                f"({compiled[0].server.path} and this one): not implemented (a TLS session of one could "
                                f"resume under the other); use separate ports"))
        return None
    if compiled and plain:
        gateway, server = servers[0]
        problems.append(Problem(gateway.meta.origin.file, gateway.meta.origin.doc, plain[0].path,
                                f"port {number} mixes plaintext and TLS servers: not implemented (one listener is "
                                f"either TLS or plaintext)"))
        return None
    return PortTLS(number, compiled) if compiled else None


def compile_gateway_tls(servers_by_port: dict[int, list[tuple[m.Gateway, m.GatewayServer]]],
                        credentials_dir: str | None, cert_dir: str | None = None
                        ) -> tuple[dict[int, PortTLS], list[Problem]]:
    """Every TLS port of the gateway: its servers' contexts, read from their files now. Problems with severity
    "error" make the load fail."""
    problems: list[Problem] = []
    ports: dict[int, PortTLS] = {}
    for number, servers in servers_by_port.items():
        port = _compile_port(number, servers, credentials_dir, cert_dir, problems)
        if port is not None:
            ports[number] = port
    return ports, problems


class GatewayTLS:
    """The current TLS of every gateway port: swapped whole by a config reload (`install`), re-read by `poll()`
    when a file changes. `context_for(port)` is what a listener calls at each accept."""

    def __init__(self) -> None:
        self.ports: dict[int, PortTLS] = {}
        self.pending: dict[int, PortTLS] | None = None  # compiled by a load, installed when the load is accepted
        self.suspect: dict[int, tuple[object, ...]] = {}
        self.failed: dict[int, tuple[object, ...]] = {}
        self.rotations = 0

    def install(self, ports: dict[int, PortTLS]) -> None:
        self.ports = ports
        self.suspect.clear()
        self.failed.clear()

    def context_for(self, number: int) -> Callable[[], ssl.SSLContext]:
        def current() -> ssl.SSLContext:
            port = self.ports.get(number)
            if port is None:  # a reload took the port's TLS servers away: nothing is served on it
                raise ssl.SSLError(f"gateway port {number} has no TLS server")
            return port.context()
        return current

    def poll(self) -> bool:
        """Re-read the files of ports whose files changed; True when new contexts are in use."""
        changed = False
        for number, port in list(self.ports.items()):
            stamps = tuple(files_stamp(c.files.paths()) for c in port.servers)
            if stamps == tuple(c.stamp for c in port.servers) or stamps == self.failed.get(number):
                continue
            try:
                servers = [CompiledServer(c.server, c.origin, c.files, c.handshake, c.names,
                                          server_context(c.files, c.handshake), stamp, client_ca_of(c.files))
                           for c, stamp in zip(port.servers, stamps)]
                other = other_client_ca(servers)
                if other is not None:
                    raise ValueError(f"{other.files.ca} is not the client CA of the port's other servers")
            except (CertError, ssl.SSLError, ValueError) as exc:
                if stamps != self.suspect.get(number):  # perhaps between two writes: an error when it fails twice
                    self.suspect[number] = stamps
                    continue
                self.failed[number] = stamps
                log.error("gateway port %d: rotated certificates rejected: %s; still serving the previous ones",
                          number, exc)
                continue
            self.ports[number] = PortTLS(number, servers)
            self.suspect.pop(number, None)
            self.failed.pop(number, None)
            self.rotations += 1
            changed = True
            log.info("gateway port %d: certificates reloaded from %s", number,
                     ", ".join(str(c.files.cert) for c in servers))
        return changed
