"""HTTP/1.1 bytes out: request and response heads, hop-by-hop rules, chunk framing, local replies.

Everything constant is built once at import: status lines, header names.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
DATE_NAME: Final = b"date"

# RFC 9110 7.6.1 connection-specific fields, plus the framing fields we always regenerate.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"trailer",
        b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"expect",
    }
)


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


STATUS_LINES: dict[int, bytes] = {code: _status_line(code) for code in range(100, 600)}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    return line if line is not None else f"HTTP/1.1 {code} Unknown\r\n".encode()


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`name: value` CRLF lines, ready to go into a head."""
    return b"".join(b"%b: %b\r\n" % pair for pair in headers)


def response_head(status: int, headers: list[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]],
                  content_length: int | None, chunked: bool, close: bool) -> bytes:
    """A proxied response's head: the upstream's headers less hop-by-hop ones, then `extra`; framing regenerated.
    A response without `date` gets one (RFC 9110 6.6.1 asks it of a forwarder with a clock, as Envoy does)."""
    parts = [status_line(status)]
    dated = False
    for name, value in headers:
        if name not in HOP_BY_HOP:
            if name == DATE_NAME:
                dated = True
            _line(parts, name, value)
    for name, value in extra:
        _line(parts, name, value)
    if not dated:
        parts.append(DATE.line())
    if content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)
    elif chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(CRLF)
    return b"".join(parts)


def request_head(method: bytes, path: bytes, authority: bytes, headers: list[tuple[bytes, bytes]],
                 drop: frozenset[bytes], extra: list[tuple[bytes, bytes]], content_length: int | None,
                 chunked: bool) -> bytes:
    """An upstream request's head, origin-form: `headers` less the names in `drop` (which must hold Host and the
    framing headers), then `extra`; framing regenerated."""
    parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, CRLF]
    for name, value in headers:
        if name not in drop:
            _line(parts, name, value)
    for name, value in extra:
        _line(parts, name, value)
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)
    parts.append(CRLF)
    return b"".join(parts)


def _line(parts: list[bytes], name: bytes, value: bytes) -> None:
    """`name: value` CRLF as four parts of a head joined once (compiled, four list appends beat building a line)."""
    parts.append(name)
    parts.append(b": ")
    parts.append(value)
    parts.append(CRLF)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class DateHeader:
    """`date: ...` line rebuilt at most once a second (uvicorn's on_tick idea, lazily)."""

    __slots__ = ("_second", "_line")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: " + formatdate(now, usegmt=True).encode() + CRLF
        return self._line


DATE: Final = DateHeader()


def local_reply(status: int, body: bytes = b"", *, close: bool = False, server: bytes = b"envoy",
                extra: tuple[tuple[bytes, bytes], ...] = (), head_only: bool = False) -> bytes:
    """A reply made by the proxy itself (Envoy's sendLocalReply): text/plain with content-length.

    Its fixed parts are made once per kind of reply (a fault abort under load is the same reply thousands of
    times a second); only the extra headers (a redirect's location, CORS) and the date line are per reply."""
    key = (status, body, close, server, head_only)
    parts = _LOCAL_REPLIES.get(key)
    if parts is None:
        parts = _local_reply_parts(*key)
        if len(_LOCAL_REPLIES) < LOCAL_REPLIES_MAX:  # directResponse bodies come from config, reload after reload
            _LOCAL_REPLIES[key] = parts
    if extra:
        return parts[0] + header_lines(extra) + DATE.line() + parts[1]
    return parts[0] + DATE.line() + parts[1]


# Keyed by status and body: Envoy's fixed bodies and the config's directResponse bodies, a small set.
LOCAL_REPLIES_MAX: Final = 1024
_LOCAL_REPLIES: dict[tuple[int, bytes, bool, bytes, bool], tuple[bytes, bytes]] = {}


def _local_reply_parts(status: int, body: bytes, close: bool, server: bytes, head_only: bool) -> tuple[bytes, bytes]:
    """(the head before the extra headers and the date line, the rest after them)."""
    before = [status_line(status), b"content-length: %d\r\n" % len(body)]
    if body:
        before.append(b"content-type: text/plain\r\n")
    after = [b"server: ", server, CRLF]
    if close:
        after.append(b"connection: close\r\n")
    after.append(CRLF)
    if body and not head_only:
        after.append(body)
    return b"".join(before), b"".join(after)
