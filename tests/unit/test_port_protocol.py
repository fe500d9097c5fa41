"""Protocol per port as Istio decides it (routing/protocol.py: pkg/config/protocol, kube ConvertProtocol)."""

from __future__ import annotations

import pytest

from meshproxy.routing import protocol as p


@pytest.mark.parametrize(("port", "name", "app_protocol", "expected"), [
    (80, "http", None, p.HTTP),
    (80, "http-web", None, p.HTTP),
    (80, "HTTP2-x", None, p.HTTP2),
    (80, "grpc", None, p.GRPC),
    (80, "grpc-web", None, p.GRPC_WEB),
    (80, "grpc-web-x", None, p.GRPC_WEB),
    (80, "grpcweb", None, p.UNSUPPORTED),
    (443, "https-a", None, p.HTTPS),
    (443, "tls", None, p.TLS),
    (6379, "redis", None, p.REDIS),
    (27017, "mongo-main", None, p.MONGO),
    (5000, "tcp-db", None, p.TCP),
    (5000, "", None, p.UNSUPPORTED),
    (5000, "web", None, p.UNSUPPORTED),
    (3306, "", None, p.TCP),  # a well-known server-first port is not sniffed
    (27017, "db", None, p.TCP),
    (25, "", None, p.TCP),
    (80, "tcp", "http", p.HTTP),  # appProtocol wins over the name
    (80, "http", "kubernetes.io/h2c", p.HTTP2),
    (80, "", "kubernetes.io/ws", p.HTTP),
    (80, "", "kubernetes.io/wss", p.HTTPS),
    (80, "http", "custom.io/x", p.UNSUPPORTED),
])
def test_kubernetes_port(port: int, name: str, app_protocol: str | None, expected: str) -> None:
    assert p.of_kubernetes_port(port, name, app_protocol) == expected


@pytest.mark.parametrize(("name", "protocol", "expected"), [
    ("anything", "TCP", p.TCP),
    ("http-x", "tcp", p.TCP),  # the protocol field wins (Istio's ServiceEntry conversion)
    ("web", "HTTP", p.HTTP),
    ("tcp-a", "", p.TCP),  # no protocol: the name, as a Kubernetes Service port's
    ("", "", p.UNSUPPORTED),
    ("x", "UDP", p.UDP),
    ("x", "nonsense", p.UNSUPPORTED),
])
def test_service_entry_port(name: str, protocol: str, expected: str) -> None:
    assert p.of_service_entry_port(9000, name, protocol) == expected


def test_families() -> None:
    assert all(p.is_http(x) for x in (p.HTTP, p.HTTP2, p.GRPC, p.GRPC_WEB, p.HTTP_PROXY))
    assert all(p.is_tcp(x) for x in (p.TCP, p.TLS, p.HTTPS, p.MONGO, p.REDIS, p.MYSQL))
    assert not p.is_tcp(p.UDP) and not p.is_http(p.UDP) and p.is_sniffed(p.UNSUPPORTED)
    assert p.is_tls(p.HTTPS) and p.is_tls(p.TLS) and not p.is_tls(p.TCP)
