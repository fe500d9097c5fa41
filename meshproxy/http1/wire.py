"""HTTP/1.1 bytes out: status lines, hop-by-hop rules, chunk framing, local replies.

Everything constant is built once at import: status lines, header names.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 7.6.1 connection-specific fields, plus the framing fields we always regenerate.
HOP_BY_HOP = frozenset(
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


DATE = DateHeader()


def local_reply(status: int, body: bytes = b"", *, close: bool = False, server: bytes = b"envoy",
                extra: tuple[tuple[bytes, bytes], ...] = (), head_only: bool = False) -> bytes:
    """A reply made by the proxy itself (Envoy's sendLocalReply): text/plain with content-length."""
    parts = [status_line(status), b"content-length: ", str(len(body)).encode(), CRLF]
    if body:
        parts.append(b"content-type: text/plain\r\n")
    for name, value in extra:
        parts.extend((name, b": ", value, CRLF))
    parts.extend((DATE.line(), b"server: ", server, CRLF))
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(CRLF)
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)
