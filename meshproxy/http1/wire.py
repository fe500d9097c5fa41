"""HTTP/1.1 bytes out: request and response heads, hop-by-hop rules, chunk framing, local replies.

Everything constant is built once at import: status lines, header names.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from ..messages import HeaderBlock, HeaderTemplate

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


STATUS_LINES: Final = tuple(_status_line(code) for code in range(1000))  # indexed: a third of a dict's cost


def status_line(code: int) -> bytes:
    return STATUS_LINES[code] if 0 <= code < 1000 else f"HTTP/1.1 {code} Unknown\r\n".encode()


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`name: value` CRLF lines, ready to go into a head."""
    return b"".join(b"%b: %b\r\n" % pair for pair in headers)


def response_head(status: int, headers: list[tuple[bytes, bytes]], extra: list[HeaderBlock],
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
    for template, values in extra:
        _add_block(parts, template, values)
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
                 drop: frozenset[bytes], extra: list[HeaderBlock], content_length: int | None,
                 chunked: bool) -> bytes:
    """An upstream request's head, origin-form: `headers` less the names in `drop` (which must hold Host and the
    framing headers), then `extra`; framing regenerated."""
    parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, CRLF]
    for name, value in headers:
        if name not in drop:
            _line(parts, name, value)
    for template, values in extra:
        _add_block(parts, template, values)
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


def _segments(template: HeaderTemplate) -> tuple[bytes, ...]:
    """The text around a template's values (`name: ` before each, CRLF after), made at its first use; a block of
    fixed values is one segment, its whole text."""
    segments = template.http1
    if not segments:
        if template.fixed:
            segments = (b"".join([b"%b: %b\r\n" % pair for pair in zip(template.names, template.fixed)]),)
        else:
            names = template.names
            segments = (names[0] + b": ", *[CRLF + name + b": " for name in names[1:]], CRLF) if names else (b"",)
        template.http1 = segments
    return segments


def _add_block(parts: list[bytes], template: HeaderTemplate, values: tuple[bytes, ...]) -> None:
    """A block of added headers as one part of the head. A %-format with a literal format string is built in one
    allocation when compiled (mypyc's CPyBytes_Build): a third of a join part per segment and value, or of a
    format string made at run time."""
    s = _segments(template)
    n = len(values)
    if n == 0:
        parts.append(s[0])
    elif n == 1:
        parts.append(b"%b%b%b" % (s[0], values[0], s[1]))
    elif n == 2:
        parts.append(b"%b%b%b%b%b" % (s[0], values[0], s[1], values[1], s[2]))
    elif n == 3:
        parts.append(b"%b%b%b%b%b%b%b" % (s[0], values[0], s[1], values[1], s[2], values[2], s[3]))
    elif n == 4:
        parts.append(b"%b%b%b%b%b%b%b%b%b" % (s[0], values[0], s[1], values[1], s[2], values[2], s[3], values[3],
                                             s[4]))
    elif n == 5:  # a new trace's headers (telemetry.core.NEW_TRACE)
        parts.append(b"%b%b%b%b%b%b%b%b%b%b%b" % (s[0], values[0], s[1], values[1], s[2], values[2], s[3], values[3],
                                                 s[4], values[4], s[5]))
    else:
        parts.append(s[0])
        for i in range(n):
            parts.append(values[i])
            parts.append(s[i + 1])


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class DateHeader:
    """`date: ...` line rebuilt at most once a second (uvicorn's on_tick idea, lazily); `value()` the date alone,
    for HTTP/2's header fields."""

    __slots__ = ("_second", "_line", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""
        self._value = b""

    def _tick(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
            self._line = b"date: " + self._value + CRLF

    def line(self) -> bytes:
        self._tick()
        return self._line

    def value(self) -> bytes:
        self._tick()
        return self._value


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
_LOCAL_REPLIES: Final[dict[tuple[int, bytes, bool, bytes, bool], tuple[bytes, bytes]]] = {}


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
