"""Request heads: built once from the parser's callbacks, validated, then read-only.

Header names are lower-cased once here; values are kept byte-for-byte. Framing
is reduced to `content_length` / `chunked` so the upstream side can regenerate it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError

MAX_HEADER_BYTES = 60 * 1024  # Envoy max_request_headers_kb default
MAX_HEADER_COUNT = 100  # Envoy max_headers_count default


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # request-target as sent
    path: bytes  # origin-form path, dot-segments removed, without the query
    query: bytes  # without the "?"
    authority: bytes  # Host, or the authority of an absolute-form target
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value), arrival order
    version: bytes  # b"1.1" or b"1.0"
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool
    connection_tokens: frozenset[bytes]  # extra hop-by-hop names listed in Connection

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """First value of a header (names are lower-case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path_and_query(self) -> bytes:
        return self.path + b"?" + self.query if self.query else self.path


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 section 5.2.4, as Envoy's normalize_path (Istio's default BASE normalization)."""
    if b"/." not in path:
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


def build_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                       version: str, keep_alive: bool) -> RequestHead:
    """Validate what httptools let through and reduce framing to two fields."""
    if version not in ("1.1", "1.0"):
        raise ProtocolError(505 if version.startswith("2") else 400, "http1.invalid_version")
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    expect_continue = False
    tokens: frozenset[bytes] = frozenset()
    for name, value in headers:
        if name == b"host":
            if host is not None:
                raise ProtocolError(400, "http1.duplicate_host")
            host = value
        elif name == b"content-length":
            if content_length is not None or not value.isdigit():
                raise ProtocolError(400, "http1.content_length_not_allowed")
            content_length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.strip().lower() != b"chunked":
                raise ProtocolError(501, "http1.invalid_transfer_encoding")
            chunked = True
        elif name == b"connection":
            tokens = tokens | frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        elif name == b"expect" and value.lower() == b"100-continue":
            expect_continue = True
    if chunked and content_length is not None:
        raise ProtocolError(400, "http1.content_length_and_chunked_not_allowed")
    authority, path, query = split_target(target)
    if authority is None:
        if host is None:
            if version == "1.1":
                raise ProtocolError(400, "http1.missing_host_header")
            host = b""
        authority = host
    return RequestHead(method, target, path, query, authority, headers, version.encode(), keep_alive,
                       content_length, chunked, expect_continue, tokens)
