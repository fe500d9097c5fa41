"""The protocol of a service port, as Istio decides it (pkg/config/protocol, pkg/config/kube/conversion.go).

A port is HTTP (HTTP/1.1 codec), HTTP2/gRPC (an HTTP/2 codec), an opaque TCP protocol (TCP, TLS, HTTPS, Mongo,
Redis, MySQL: proxied byte for byte), or `UNSUPPORTED`: undeclared, and sniffed from the first bytes of each
connection (Istio's "auto" protocol detection). Decided once per port at config load, never per connection.

- ServiceEntry ports: the `protocol` field (Istio's `protocol.Parse`). When it is empty, meshproxy reads the port
  name as Istio reads a Kubernetes Service port (ConvertProtocol): meshproxy's ServiceEntries stand in for the
  Kubernetes Services of a cluster, so `name: http-web` means what it means on a Service.
- Kubernetes ports: `appProtocol` first (with the `kubernetes.io/h2c|ws|wss` names), else the port name's prefix
  before the first `-` (`grpc-web` whole); an unknown name on a well-known server-first port (25, 53, 3306,
  27017) is TCP rather than sniffed.
"""

from __future__ import annotations

from typing import Final

GRPC: Final = "GRPC"
GRPC_WEB: Final = "GRPC-Web"
HTTP: Final = "HTTP"
HTTP_PROXY: Final = "HTTP_PROXY"
HTTP2: Final = "HTTP2"
HTTPS: Final = "HTTPS"
TCP: Final = "TCP"
TLS: Final = "TLS"
UDP: Final = "UDP"
MONGO: Final = "Mongo"
REDIS: Final = "Redis"
MYSQL: Final = "MySQL"
UNSUPPORTED: Final = "UnsupportedProtocol"  # not declared: sniffed per connection

_NAMES: Final = {"tcp": TCP, "udp": UDP, "grpc": GRPC, "grpc-web": GRPC_WEB, "http": HTTP, "http_proxy": HTTP_PROXY,
                 "http2": HTTP2, "https": HTTPS, "tls": TLS, "mongo": MONGO, "redis": REDIS, "mysql": MYSQL}
# Kubernetes' standard appProtocol names (core/v1 ServicePort.appProtocol).
_KUBERNETES_APP_PROTOCOLS: Final = {"kubernetes.io/h2c": HTTP2, "kubernetes.io/ws": HTTP, "kubernetes.io/wss": HTTPS}
WELL_KNOWN_SERVER_FIRST_PORTS: Final = frozenset({25, 53, 3306, 27017})  # SMTP, DNS, MySQL, MongoDB


def parse(text: str) -> str:
    """Istio's protocol.Parse: case-insensitive, UNSUPPORTED for anything else (and for "")."""
    return _NAMES.get(text.lower(), UNSUPPORTED)


def of_kubernetes_port(port: int, name: str, app_protocol: str | None = None) -> str:
    """Istio's ConvertProtocol for a TCP port of a Kubernetes Service."""
    if app_protocol is not None:
        known = _KUBERNETES_APP_PROTOCOLS.get(app_protocol)
        if known is not None:
            return known
        name = app_protocol
    if name[:8].lower() == "grpc-web":
        return GRPC_WEB
    protocol = parse(name.partition("-")[0])
    if protocol == UNSUPPORTED and port in WELL_KNOWN_SERVER_FIRST_PORTS:
        return TCP
    return protocol


def of_service_entry_port(port: int, name: str, protocol: str) -> str:
    """A ServiceEntry port: its `protocol`, else its name as a Kubernetes Service's (see the module docstring)."""
    if protocol:
        return parse(protocol)
    return of_kubernetes_port(port, name)


def is_http(protocol: str) -> bool:
    return protocol in (HTTP, HTTP2, HTTP_PROXY, GRPC, GRPC_WEB)


def is_http2(protocol: str) -> bool:
    return protocol in (HTTP2, GRPC, GRPC_WEB)


def is_tcp(protocol: str) -> bool:
    """Proxied as opaque bytes (Istio's IsTCP); UDP is not proxied at all."""
    return protocol in (TCP, HTTPS, TLS, MONGO, REDIS, MYSQL)


def is_tls(protocol: str) -> bool:
    return protocol in (HTTPS, TLS)


def is_sniffed(protocol: str) -> bool:
    return protocol == UNSUPPORTED
