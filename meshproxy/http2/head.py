"""HTTP/2 request heads -> the protocol-neutral `RequestHead` the exchange reads, as the HTTP/1.1 codec builds it.

h2 has already validated the block (pseudo-headers first and complete, lower-case names, no connection-specific
field, `te` only `trailers`). What remains is HTTP semantics the proxy needs: `:authority` (or `host`) as the
authority, `:path` split and normalized as Envoy normalizes it, the `cookie` crumbs joined for an HTTP/1.1 upstream
(RFC 9113 8.2.3), the listener's header policy (underscores, mesh-edge stripping), and the body's framing: a
request that did not end with its head and declares no length streams its body (`chunked` means "length unknown").
"""

from __future__ import annotations

from typing import Final

from ..http1.errors import ProtocolError
from ..http1.head import DEFAULT_POLICY, UNDERSCORE_ALLOW, UNDERSCORE_REJECT, HeadPolicy, remove_dot_segments
from ..messages import HTTP2, RequestHead
from .frames import decimal

COOKIE: Final = b"cookie"
NO_TOKENS: Final[frozenset[bytes]] = frozenset()


def build_request_head(block: list[tuple[bytes, bytes]], end_stream: bool,
                       policy: HeadPolicy = DEFAULT_POLICY) -> RequestHead:
    method = path = authority = b""
    host = b""
    # The regular fields kept, in order. None while every one is kept: then they are a slice of `block` (pseudo-
    # header fields come first, the codec checked), made at the end; compiled, a copy would box a tuple per field.
    headers: list[tuple[bytes, bytes]] | None = None
    first = 0  # where the regular fields begin
    cookies: list[bytes] = []
    content_length: int | None = None
    size = 0
    filters = policy.filters_names  # the policy read once, not per field
    underscores = policy.underscores
    checks_underscores = underscores != UNDERSCORE_ALLOW
    strip_names = policy.strip_names
    strip_prefix = policy.strip_prefix
    for index in range(len(block)):
        name, value = block[index]
        size += len(name) + len(value)
        if name[0] == 0x3A:  # ":" (names are never empty: the codec checked them)
            first = index + 1
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme: the upstream scheme is the proxy's own
        keep = True
        if filters:
            if checks_underscores and 0x5F in name:  # an int: memchr (see http1/head.py)
                if underscores == UNDERSCORE_REJECT:
                    raise ProtocolError(400, "http2.unexpected_underscore")
                keep = False
            elif (strip_names and name in strip_names) or (strip_prefix and name.startswith(strip_prefix)):
                keep = False
        if keep:
            if name == COOKIE:
                cookies.append(value)
                keep = False
            elif name == b"host":
                host = value
                keep = False  # the authority travels as :authority (HTTP/2) or Host (HTTP/1.1), written by the codec
            elif name == b"content-length":
                length = decimal(value)
                if content_length is not None or length < 0:
                    raise ProtocolError(400, "http2.content_length_not_allowed")
                content_length = length
        if not keep:
            if headers is None:
                headers = block[first:index]
        elif headers is not None:
            headers.append((name, value))
    if headers is None:
        headers = block[first:]
    if size > policy.max_header_bytes or len(headers) > policy.max_header_count:
        raise ProtocolError(431, "http2.headers_too_large")
    if cookies:
        headers.append((COOKIE, b"; ".join(cookies)))
    if not authority:
        authority = host
    if method == b"CONNECT":
        raise ProtocolError(403, "http2.connect_not_supported")
    if content_length is not None and policy.max_body_bytes and content_length > policy.max_body_bytes:
        raise ProtocolError(413, "request_payload_too_large")
    raw, query = path, b""
    if 0x3F in path:  # "?"; ints: memchr, no method call for the usual path without a query
        raw, _, query = path.partition(b"?")
    if 0x23 in raw:  # "#"
        raw = raw.partition(b"#")[0]
    return RequestHead(method, path, remove_dot_segments(raw) if raw != b"*" else raw, query, authority, headers,
                       HTTP2, True, content_length, not end_stream and content_length is None, False, NO_TOKENS)
