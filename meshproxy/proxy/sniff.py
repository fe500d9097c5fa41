"""Protocol detection from a connection's first bytes, as Envoy's tls_inspector and http_inspector (sans-IO).

`classify(data)` answers NEED_MORE until the bytes decide: a TLS ClientHello (record type 22, version 3.x), the
HTTP/2 connection preface, an HTTP/1.x request line (`METHOD SP target SP HTTP/1.x`), or anything else (TCP). It
never needs more than MAX_SNIFF_BYTES. `server_name(data)` reads the SNI of a complete ClientHello without
terminating TLS (passthrough routing), `alpn(data)` the protocols it offers (the inbound listener tells an Istio
peer's mutual TLS from an app's own TLS by them); `client_hello_complete(data)` says when the ClientHello has
arrived whole.
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = 0
HTTP1: Final = 1
HTTP2: Final = 2  # prior-knowledge cleartext HTTP/2 (the preface)
TLS: Final = 3
TCP: Final = 4
NAMES: Final = {HTTP1: "http/1.1", HTTP2: "h2c", TLS: "tls", TCP: "tcp"}

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_SNIFF_BYTES: Final = 8192  # Envoy's http_inspector reads at most 8 KiB (a request line longer is not HTTP here)
MAX_CLIENT_HELLO: Final = 64 * 1024  # tls_inspector's max_client_hello_size is 64 KiB
MAX_METHOD: Final = 24
_METHOD_CHARS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_SERVER_NAME: Final = 0
_ALPN: Final = 16


def classify(data: bytes) -> int:
    if not data:
        return NEED_MORE
    if data[0] == _HANDSHAKE:
        if len(data) < 3:
            return NEED_MORE
        return TLS if data[1] == 3 else TCP
    if data[0] == H2_PREFACE[0] and H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        return HTTP2 if len(data) >= len(H2_PREFACE) else NEED_MORE
    return _http1(data)


def _http1(data: bytes) -> int:
    """HTTP/1.x if the first line is a request line; NEED_MORE while it may still become one."""
    end = data.find(b"\n", 0, MAX_SNIFF_BYTES)
    line = data[:end] if end >= 0 else data[:MAX_SNIFF_BYTES]
    space = line.find(b" ")
    method = line if space < 0 else line[:space]
    if not method or len(method) > MAX_METHOD or any(c not in _METHOD_CHARS for c in method):
        return TCP
    if end < 0:
        return NEED_MORE if len(data) < MAX_SNIFF_BYTES else TCP
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) == 3 and parts[1] and parts[2] in (b"HTTP/1.1", b"HTTP/1.0"):
        return HTTP1
    return TCP


def _records(data: bytes) -> bytes | None:
    """The handshake bytes of the TLS records in `data`, None while the ClientHello is incomplete."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data) and data[pos] == _HANDSHAKE:
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if pos + 5 + length > len(data):
            return None
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4:
            needed = 4 + int.from_bytes(out[1:4], "big")
            if len(out) >= needed:
                return bytes(out[:needed])
    return None


def client_hello_complete(data: bytes) -> bool:
    return _records(data) is not None or len(data) >= MAX_CLIENT_HELLO


def _extension(data: bytes, wanted: int) -> bytes | None:
    """The body of one extension of a complete ClientHello; None when absent or the hello is malformed."""
    hello = _records(data)
    if hello is None or hello[0] != _CLIENT_HELLO:
        return None
    try:
        pos = 4 + 2 + 32  # handshake header, client_version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos:pos + 2], "big")
            size = int.from_bytes(hello[pos + 2:pos + 4], "big")
            if kind == wanted:
                return hello[pos + 4:pos + 4 + size]
            pos += 4 + size
    except IndexError:
        return None
    return None


def alpn(data: bytes) -> tuple[str, ...]:
    """The protocols a complete ClientHello offers by ALPN, in its order; () without the extension."""
    body = _extension(data, _ALPN)
    if not body:
        return ()
    out = []
    at = 2  # protocol_name_list length
    while at < len(body):
        length = body[at]
        out.append(body[at + 1:at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    return tuple(out)


def server_name(data: bytes) -> str:
    """The ClientHello's SNI host name (lower case), "" when there is none or the hello is malformed."""
    body = _extension(data, _SERVER_NAME)
    if body is None:
        return ""
    at = 2  # server_name_list length
    while at + 3 <= len(body):
        name_type = body[at]
        length = int.from_bytes(body[at + 1:at + 3], "big")
        if name_type == 0:
            return body[at + 3:at + 3 + length].decode("ascii", "replace").lower().rstrip(".")
        at += 3 + length
    return ""
