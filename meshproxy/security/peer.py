"""What a TLS connection says about its peer, read once when the connection is made: its SPIFFE principal and the
server name (SNI) it asked for. Light on purpose (the data path imports it): no cryptography here."""

from __future__ import annotations

import ssl
from typing import Any, Final

from .spiffe import principal_of

SNI_ATTRIBUTE: Final = "meshproxy_sni"


def uri_sans(peercert: dict[str, Any] | None) -> tuple[str, ...]:
    """The URI SANs of a certificate as `ssl.SSLSocket.getpeercert()` returns it (verified certificates only)."""
    if not peercert:
        return ()
    return tuple(value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI")


def remember_sni(ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
    """A server context's sni_callback: the SNI a client asked for (Envoy's requested server name,
    AuthorizationPolicy's `connection.sni`), kept on the connection's SSLObject, where nothing else keeps it."""
    setattr(ssl_object, SNI_ATTRIBUTE, server_name or "")


def requested_server_name(ssl_object: object) -> str:
    """What `remember_sni` kept; "" without TLS or without SNI."""
    return getattr(ssl_object, SNI_ATTRIBUTE, "") if ssl_object is not None else ""


def peer_principal(ssl_object: Any) -> str:
    """The peer's principal (`td/ns/x/sa/y`) from a connected, verified `ssl.SSLObject` (or SSLSocket); "" when
    there is no TLS, no verified peer certificate, or no SPIFFE URI SAN in it (Envoy: the first URI SAN)."""
    if ssl_object is None:
        return ""
    try:
        cert = ssl_object.getpeercert()
    except ValueError:  # handshake not done
        return ""
    for uri in uri_sans(cert):
        principal = principal_of(uri)
        if principal:
            return principal
    return ""
