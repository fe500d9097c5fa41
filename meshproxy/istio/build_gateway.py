"""Gateway `servers` -> model, checked as Istio's webhook checks them (validateServer, validateTLSOptions). What
meshproxy's gateway does not do yet is a warning here (a sidecar loads Gateways it never serves) and kept on the
server (`unsupported`): the gateway proxy that serves the Gateway refuses the config with those messages (gateway.py),
never ignores them (issue #16).

Certificate files are not read here (the loader is pure): security/server_tls.py reads them when a gateway proxy
that serves the Gateway loads it, and names the file, document and field of any that does not load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from . import model as m
from .problems import DocProblems

TLS_MODES: Final = ("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL")
TLS_VERSIONS: Final = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
TERMINATING: Final = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL")  # the modes meshproxy's gateway terminates
TLS_PROTOCOLS: Final = ("HTTPS", "TLS")  # Istio's protocol.IsTLS()
HTTP_PROTOCOLS: Final = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTPS")  # served by the gateway's HTTP listener
KNOWN_PROTOCOLS: Final = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL")
# ServerTLSSettings fields meshproxy does not act on yet: a load error naming the field.
NOT_IMPLEMENTED: Final = {
    "caCrl": "certificate revocation lists (caCrl) are not implemented",
    "credentialNames": "credentialNames (several certificates) is not implemented: use credentialName",
    "tlsCertificates": "tlsCertificates (several certificates) is not implemented: use serverCertificate/privateKey",
    "subjectAltNames": "checking the client certificate's subjectAltNames is not implemented",
    "verifyCertificateSpki": "verifyCertificateSpki is not implemented",
    "verifyCertificateHash": "verifyCertificateHash is not implemented",
    "caCertCredentialName": "caCertCredentialName is not implemented: put ca.crt beside the credential "
                            "(or in a <credentialName>-cacert folder)",
}


def _enum(value: Any, names: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else str(value)


def _host(doc: DocProblems, host: str, path: str) -> None:
    """Istio's validateNamespaceSlashWildcardHostname: `[ns/]host`, the namespace `*`, `.` or a name."""
    namespace, sep, name = host.rpartition("/")
    if sep and not namespace:
        doc.error(path, f"{host!r}: the namespace before '/' is empty")
    if not name:
        doc.error(path, f"{host!r}: the host after '/' is empty")
    elif name != "*" and not all(label and ("*" not in label or (i == 0 and label == "*"))
                                 for i, label in enumerate(name.split("."))):
        doc.error(path, f"{host!r} is not a valid host name (a wildcard must be a whole leading label: *.example.com)")


class Unsupported:
    """What one server asks that meshproxy's gateway does not do: warned about, kept for the gateway to refuse."""

    def __init__(self, doc: DocProblems) -> None:
        self.doc = doc
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))
        self.doc.warn(path, message + " (a gateway serving this Gateway refuses it)")


def _tls(doc: DocProblems, spec: Mapping[str, Any], path: str, protocol: str,
         unsupported: Unsupported) -> m.ServerTLSSettings:
    mode = _enum(spec.get("mode"), TLS_MODES, "PASSTHROUGH")
    tls = m.ServerTLSSettings(
        mode=mode, https_redirect=bool(spec.get("httpsRedirect", False)),
        server_certificate=spec.get("serverCertificate") or "", private_key=spec.get("privateKey") or "",
        ca_certificates=spec.get("caCertificates") or "", credential_name=spec.get("credentialName") or "",
        min_protocol_version=_enum(spec.get("minProtocolVersion"), TLS_VERSIONS, "TLS_AUTO"),
        max_protocol_version=_enum(spec.get("maxProtocolVersion"), TLS_VERSIONS, "TLS_AUTO"),
        cipher_suites=tuple(spec.get("cipherSuites") or ()))
    for name, message in NOT_IMPLEMENTED.items():
        if spec.get(name):
            unsupported.add(f"{path}.{name}", message)
    if spec.get("insecureSkipVerify"):
        unsupported.add(f"{path}.insecureSkipVerify", "insecureSkipVerify is not implemented on a gateway server")
    files = bool(tls.server_certificate or tls.private_key or tls.ca_certificates)
    if protocol in TLS_PROTOCOLS:
        pass
    elif protocol in HTTP_PROTOCOLS:  # Istio: only httpsRedirect on a plaintext HTTP port
        if mode != "PASSTHROUGH" or files:
            doc.error(path, "server cannot have TLS settings for plain text HTTP ports")
        return tls
    else:
        doc.error(path, "server cannot have TLS settings for non HTTPS/TLS ports")
        return tls
    if tls.https_redirect:
        doc.warn(f"{path}.httpsRedirect", "httpsRedirect applies to plaintext HTTP servers only: ignored here, as "
                                          "Istio")
    if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
        unsupported.add(f"{path}.mode", f"tls mode {mode} is not implemented on meshproxy's gateway (it terminates "
                                        f"TLS: SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL)")
    if mode not in TERMINATING:
        return tls
    if mode == "ISTIO_MUTUAL":  # the workload certificates (--cert-dir), nothing else
        for name, what in (("serverCertificate", "server certificate"), ("privateKey", "private key"),
                           ("caCertificates", "CA bundle"), ("credentialName", "credentialName")):
            if spec.get(name):
                doc.error(f"{path}.{name}", f"ISTIO_MUTUAL TLS cannot have associated {what}")
    elif tls.credential_name and (tls.server_certificate or tls.private_key):
        doc.error(path, "only one of credential_name, credential_names, server_certificate/private_key, "
                        "tls_certificates should be specified")
    elif not tls.credential_name:
        prefix = "SIMPLE TLS" if mode == "SIMPLE" else "MUTUAL TLS"
        if not tls.server_certificate:
            doc.error(f"{path}.serverCertificate", f"{prefix} requires a server certificate")
        if not tls.private_key:
            doc.error(f"{path}.privateKey", f"{prefix} requires a private key")
        if mode != "SIMPLE" and not tls.ca_certificates:
            doc.error(f"{path}.caCertificates", f"{prefix} requires a client CA bundle")
    if mode != "ISTIO_MUTUAL" and tls.credential_name and tls.ca_certificates:
        doc.warn(f"{path}.caCertificates", "with credentialName the CA comes from the credential (its ca.crt or "
                                           "cacert, or the <credentialName>-cacert folder): this file is not read")
    versions = TLS_VERSIONS.index
    if "TLS_AUTO" not in (tls.min_protocol_version, tls.max_protocol_version) and \
            versions(tls.min_protocol_version) > versions(tls.max_protocol_version):
        doc.error(f"{path}.maxProtocolVersion", f"{tls.max_protocol_version} is below minProtocolVersion "
                                                f"{tls.min_protocol_version}")
    if tls.cipher_suites and tls.max_protocol_version == "TLSV1_3":
        doc.warn(f"{path}.cipherSuites", "cipherSuites apply to TLS 1.2 and below; TLS 1.3 uses its own suites")
    return tls


def build_gateway(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.Gateway:
    raw_servers = spec.get("servers") or []
    if not raw_servers:
        doc.error("spec.servers", "at least one server is required")
    servers: list[m.GatewayServer] = []
    for i, raw in enumerate(raw_servers):
        path = f"spec.servers[{i}]"
        if not isinstance(raw, Mapping):
            continue  # the schema pass reported it
        port = raw.get("port")
        if not isinstance(port, Mapping):
            doc.error(f"{path}.port", "port is required")
            continue
        protocol = str(port.get("protocol") or "").upper()
        if protocol not in KNOWN_PROTOCOLS:
            doc.error(f"{path}.port.protocol", f"invalid protocol {port.get('protocol')!r}, supported protocols are "
                                               f"HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP")
        number = port.get("number")
        if not isinstance(number, int) or not 0 < number < 65536:
            doc.error(f"{path}.port.number", f"port number {number!r} must be in the range 1..65535")
            number = 0
        if not port.get("name"):
            doc.error(f"{path}.port.name", "port name must be set")
        if port.get("targetPort"):
            doc.error(f"{path}.port.targetPort", "targetPort has no impact on Gateways")
        hosts = tuple(str(h) for h in raw.get("hosts") or ())
        if not hosts:
            doc.error(f"{path}.hosts", "server config must contain at least one host")
        for j, host in enumerate(hosts):
            _host(doc, host, f"{path}.hosts[{j}]")
        unsupported = Unsupported(doc)
        raw_tls = raw.get("tls")
        tls: m.ServerTLSSettings | None = None
        if isinstance(raw_tls, Mapping):
            tls = _tls(doc, raw_tls, f"{path}.tls", protocol, unsupported)
        elif protocol in TLS_PROTOCOLS:
            doc.error(path, "server must have TLS settings for HTTPS/TLS protocols")
        if protocol == "TLS":
            unsupported.add(f"{path}.port.protocol", "protocol TLS (TLS to TCP routes) is not implemented on "
                                                     "meshproxy's gateway: use HTTPS")
        if raw.get("bind"):
            doc.warn(f"{path}.bind", "bind is not used: the listener's address comes from --gateway-port")
        servers.append(m.GatewayServer(m.ServicePort(number, protocol, str(port.get("name") or "")),
                                       tuple(h.lower() for h in hosts), tls, str(raw.get("name") or ""), path,
                                       tuple(unsupported.items)))
    return m.Gateway(meta=meta, selector=dict(spec.get("selector") or {}), servers=tuple(servers))
