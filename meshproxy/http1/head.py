"""Request heads: built once from the parser's callbacks, validated, then read-only.

Header names are lower-cased once here; values are kept byte-for-byte except for
trailing whitespace (RFC 9112 section 5: OWS around a field value is not part of it).
Framing is reduced to `content_length` / `chunked` so the upstream side regenerates
it: one Content-Length or one `Transfer-Encoding: chunked`, never the client's lines.

httptools (llhttp, strict mode) rejects most malformed input itself: bad tokens,
CR/LF/NUL and other controls in values, bare LF, obs-fold, CL+TE, duplicate or
malformed Content-Length, bad chunk sizes. What it lets through and RFC 9112 or
Envoy refuses is refused here, each with Envoy's status and response code detail:

- HTTP/2.0 request line -> 505, HTTP/0.9 -> 400 (`http1.invalid_version`)
- missing Host on HTTP/1.1, more than one Host, a Host that is not an authority -> 400
- Transfer-Encoding other than one final `chunked` line (`identity` + `chunked` on two
  lines, `,chunked`, `gzip, chunked`) -> 501; with Content-Length -> 400; on HTTP/1.0 -> 400
- asterisk-form target on anything but OPTIONS -> 400
- header names with an underscore: allowed, dropped, or rejected (400), per `HeadPolicy`
- a declared Content-Length above the body limit -> 413

The size limits (60 KiB / 100 headers -> 431) are counted by the listener while parsing,
with the numbers from the same `HeadPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from ..messages import HTTP10, HTTP11, RequestHead
from .errors import ProtocolError

MAX_HEADER_BYTES: Final = 60 * 1024  # Envoy max_request_headers_kb default: request-target + names + values
MAX_HEADER_COUNT: Final = 100  # Envoy max_headers_count default

UNDERSCORE_ALLOW: Final = "allow"
UNDERSCORE_DROP: Final = "drop"
UNDERSCORE_REJECT: Final = "reject"
UNDERSCORE_ACTIONS: Final = (UNDERSCORE_ALLOW, UNDERSCORE_DROP, UNDERSCORE_REJECT)

# The x-envoy-* request headers Envoy sanitizes from external requests (header_sanitizing.rst): each one
# changes what a proxy does (retries, timeouts, tracing, internal/external), so only a trusted client
# may send them. meshproxy's inbound listener drops these; the gateway drops every x-envoy-* header.
ENVOY_CONTROL_HEADERS: Final = frozenset({
    b"x-envoy-decorator-operation", b"x-envoy-downstream-service-cluster", b"x-envoy-downstream-service-node",
    b"x-envoy-expected-rq-timeout-ms", b"x-envoy-external-address", b"x-envoy-force-trace", b"x-envoy-internal",
    b"x-envoy-ip-tags", b"x-envoy-max-retries", b"x-envoy-retry-grpc-on", b"x-envoy-retry-on",
    b"x-envoy-retriable-status-codes", b"x-envoy-retriable-header-names", b"x-envoy-hedge-on-per-try-timeout",
    b"x-envoy-upstream-alt-stat-name", b"x-envoy-upstream-rq-per-try-timeout-ms",
    b"x-envoy-upstream-rq-timeout-alt-response", b"x-envoy-upstream-rq-timeout-ms",
    b"x-envoy-upstream-stream-duration-ms",
})
ENVOY_PREFIX: Final = b"x-envoy-"

# RFC 3986 authority characters (reg-name, IP-literal brackets, port); anything else in Host is refused.
_AUTHORITY_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%:[]"
_OWS: Final = (0x20, 0x09)
_UNDERSCORE: Final = 0x5F  # `int in bytes` is a memchr, ten times cheaper than `b"_" in bytes`
_DOT: Final = 0x2E
_HASH: Final = 0x23
_AUTHORITY_CACHE: Final[dict[bytes, bool]] = {}  # Host values seen -> valid; bounded against hostile values
_AUTHORITY_CACHE_MAX: Final = 4096


@dataclass(frozen=True, slots=True)
class HeadPolicy:
    """What one listener accepts in a request head (compiled once from Settings)."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_header_count: int = MAX_HEADER_COUNT
    max_body_bytes: int = 0  # 0: no limit; a declared Content-Length above it is 413 before any byte moves
    underscores: str = UNDERSCORE_REJECT  # Envoy's edge advice: headers_with_underscores_action REJECT_REQUEST
    strip_names: frozenset[bytes] = frozenset()  # request headers removed before routing (mesh edge)
    strip_prefix: bytes = b""  # every request header starting with this is removed ("" = none)
    accept_http10: bool = False  # Envoy's accept_http_10 (Istio: off unless ISTIO_META_HTTP10): else 426

    filters_names: bool = field(init=False, default=False)  # any per-name check at all (computed)

    def __post_init__(self) -> None:
        if self.underscores not in UNDERSCORE_ACTIONS:
            raise ValueError(f"underscore action must be one of {', '.join(UNDERSCORE_ACTIONS)}")
        object.__setattr__(self, "filters_names",
                           self.underscores != UNDERSCORE_ALLOW or bool(self.strip_names) or bool(self.strip_prefix))


DEFAULT_POLICY: Final = HeadPolicy()


def _has_dot_segment(path: bytes) -> bool:
    """A segment that starts with a dot ("/."): a native scan of a short path (a gRPC method's has a dot, and no
    such segment), find() for a long one (memmem, past the cost of its method call)."""
    size = len(path)
    if size > 64:
        return path.find(b"/.") >= 0
    for at in range(1, size):
        if path[at] == _DOT and path[at - 1] == 0x2F:
            return True
    return False


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4, as Envoy's normalize_path (Istio's default BASE normalization)."""
    if _DOT not in path or not _has_dot_segment(path):  # an int first: memchr (see split_target)
        return path
    output: list[bytes] = []
    segments = path.split(b"/")
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if segment == b".":
            if last:
                output.append(b"")
        elif segment == b"..":
            if output:
                output.pop()
            if last:
                output.append(b"")
        else:
            output.append(segment)
    return b"/" + b"/".join(output)


def split_target(target: bytes) -> tuple[bytes | None, bytes, bytes]:
    """request-target -> (authority of an absolute-form target or None, path, query)."""
    authority = None
    rest = target
    if not target.startswith(b"/"):
        lowered = target[:8].lower()
        if lowered.startswith(b"http://"):
            rest = target[7:]
        elif lowered.startswith(b"https://"):
            raise ProtocolError(400, "http1.https_url_on_plaintext_connection")
        elif target == b"*":
            return None, b"*", b""
        else:
            raise ProtocolError(400, "http1.invalid_url")
        slash = rest.find(b"/")
        question = rest.find(b"?")
        end = min(i for i in (slash, question, len(rest)) if i >= 0)
        authority, rest = rest[:end], rest[end:] or b"/"
        if not authority or b"@" in authority:
            raise ProtocolError(400, "http1.invalid_url")
        if rest.startswith(b"?"):
            rest = b"/" + rest
    path, _, query = rest.partition(b"?")
    path = path.partition(b"#")[0]
    return authority, remove_dot_segments(path), query.partition(b"#")[0]



def valid_authority(value: bytes) -> bool:
    """uri-host [":" port] (RFC 9112 section 3.2, RFC 3986 section 3.2); empty is allowed (RFC 9112 3.2)."""
    if value.translate(None, _AUTHORITY_CHARS):
        return False  # a character no authority has: space, "/", "@", "?", "#", "\\", controls, non-ASCII
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0 or b"[" in value[1:] or b"]" in value[end + 1:]:
            return False
        port = value[end + 1:]
    else:
        if b"[" in value or b"]" in value:
            return False
        colon = value.find(b":")
        port = value[colon:] if colon >= 0 else b""
    return not port or (port[:1] == b":" and len(port) <= 6 and (len(port) == 1 or port[1:].isdigit()))


def build_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                       version: str, keep_alive: bool, policy: HeadPolicy = DEFAULT_POLICY) -> RequestHead:
    """Validate what httptools let through and reduce framing to two fields (names are lower-case)."""
    if version != "1.1":
        if version != "1.0":
            raise ProtocolError(505 if version.startswith("2") else 400, "http1.invalid_version")
        if not policy.accept_http10:
            raise ProtocolError(426, "http1.http10_not_supported")
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    expect_continue = False
    tokens: frozenset[bytes] = frozenset()
    filtering = policy.filters_names
    if filtering:
        underscores = policy.underscores
        strip_names = policy.strip_names
        strip_prefix = policy.strip_prefix
    out = headers  # copied on the first change (a stripped value, a dropped line): most requests have none
    i = -1
    for name, value in headers:
        i += 1
        if value and value[-1] in _OWS:
            value = value.rstrip(b" \t")
            if out is headers:
                out = headers[:i]
        if filtering:
            if _UNDERSCORE in name and underscores != UNDERSCORE_ALLOW:
                if underscores == UNDERSCORE_REJECT:
                    raise ProtocolError(400, "http1.unexpected_underscore")
                if out is headers:
                    out = headers[:i]
                continue
            if (strip_names and name in strip_names) or (strip_prefix and name.startswith(strip_prefix)):
                if out is headers:
                    out = headers[:i]
                continue
        if out is not headers:
            out.append((name, value))
        if name == b"host":
            if host is not None:
                raise ProtocolError(400, "http1.duplicate_host")
            valid = _AUTHORITY_CACHE.get(value)
            if valid is None:
                valid = valid_authority(value)
                if len(_AUTHORITY_CACHE) < _AUTHORITY_CACHE_MAX:
                    _AUTHORITY_CACHE[value] = valid
            if not valid:
                raise ProtocolError(400, "http1.invalid_authority")
            host = value
        elif name == b"content-length":
            if content_length is not None or not value.isdigit():
                raise ProtocolError(400, "http1.content_length_not_allowed")
            content_length = int(value)
        elif name == b"transfer-encoding":
            # Only one line, whose only coding is chunked (Envoy: anything else is 501).
            if chunked or value.lower() != b"chunked":
                raise ProtocolError(501, "http1.invalid_transfer_encoding")
            chunked = True
        elif name == b"connection":
            tokens = tokens | frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        elif name == b"expect" and value.lower() == b"100-continue":
            expect_continue = True
    if chunked and content_length is not None:
        raise ProtocolError(400, "http1.content_length_and_chunked_not_allowed")
    if chunked and version == "1.0":
        raise ProtocolError(400, "http1.invalid_transfer_encoding")  # RFC 9112 6.1: faulty framing in 1.0
    if content_length is not None and policy.max_body_bytes and content_length > policy.max_body_bytes:
        raise ProtocolError(413, "request_payload_too_large")
    # The common origin-form, inline. The byte tests are ints: `int in bytes` is a memchr, where `bytes in bytes`
    # first tries the needle as an int and builds and clears a TypeError (1.3k instructions in CPython 3.11).
    if target[:1] == b"/" and (_DOT not in target or target.find(b"/.") < 0) and _HASH not in target:
        authority = None
        path, _, query = target.partition(b"?")
    else:
        authority, path, query = split_target(target)
    if path == b"*" and method != b"OPTIONS":
        raise ProtocolError(400, "http1.invalid_url")  # asterisk-form is for OPTIONS only
    if authority is None:
        if host is None:
            if version == "1.1":
                raise ProtocolError(400, "http1.missing_host_header")
            host = b""
        elif not host:  # present but empty: RFC 9112 3.2 allows it only beside an absolute-form target
            raise ProtocolError(400, "http1.invalid_authority")
        authority = host
    elif not valid_authority(authority):
        raise ProtocolError(400, "http1.invalid_url")
    return RequestHead(method, target, path, query, authority, out, HTTP11 if version == "1.1" else HTTP10,
                       keep_alive, content_length, chunked, expect_continue, tokens)
