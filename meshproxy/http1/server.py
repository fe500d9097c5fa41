"""The server side of the HTTP/1.1 codec, sans-IO, on httptools: request bytes in, request events out.

`ServerCodec.feed(data)` parses and calls its handler's `RequestEvents` (the downstream transport) with a validated
`RequestHead`, body chunks and the end of each request; whatever is wrong with the bytes is raised as one
`ProtocolError` carrying Envoy's status and response code detail, after which the connection must answer and
close. Limits are counted while parsing, with the numbers of the listener's `HeadPolicy`: request-target + header
names and values over `max_header_bytes`, or more than `max_header_count` lines -> 431; body over
`max_body_bytes` -> 413. Trailers are parsed and not forwarded.

`Upgrade: websocket` on a bodiless GET is proxied, as Istio configures Envoy (upgrade_configs: websocket): the head
is reported as any other, then `feed` raises `Upgraded` with the bytes after it, which belong to the tunnel (the
transport swaps this codec for a `TunnelCodec`). Other upgrades are refused (403 `upgrade_failed`), CONNECT too; an
`Upgrade: h2c` request without a body is served as the HTTP/1.1 request it also is (RFC 9113 3.2 lets a server
ignore it; Envoy strips it).
The response side is serialized by `http1.wire`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import httptools

from ..messages import RequestEvents, RequestHead
from .errors import ProtocolError, Upgraded
from .head import DEFAULT_POLICY, HeadPolicy, build_request_head

log = logging.getLogger("meshproxy.http1")

NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []  # never appended to: on_message_begin gives each head its own list
HEAD_SLACK: Final = 4096  # bytes of a head beyond max_header_bytes before 431 (the request line, separators)
# The start of HTTP/2's connection preface (RFC 9113 3.4): llhttp stops on it; the transport may switch to HTTP/2.
H2_PREFACE_START: Final = b"PRI * HTTP/2.0\r\n\r\n"
H2_PREFACE_DETAIL: Final = "http1.http2_preface"


class CallbackHandler(RequestEvents):
    """Request events to three plain callables, for code outside the compiled hot path (the admin port): an
    interpreted class cannot inherit a compiled trait."""

    __slots__ = ("head", "body", "end")

    def __init__(self, head: Callable[[RequestHead], None], body: Callable[[bytes], None],
                 end: Callable[[], None]) -> None:
        self.head = head
        self.body = body
        self.end = end

    def on_request_head(self, head: RequestHead) -> None:
        self.head(head)

    def on_request_body(self, data: bytes) -> None:
        self.body(data)

    def on_request_end(self) -> None:
        self.end()


class _LimitError(Exception):
    """Raised inside a parser callback; feed() turns it into the ProtocolError it carries."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(error.detail)
        self.error = error


HEADERS_TOO_LARGE: Final = ProtocolError(431, "http1.headers_too_large")
BODY_TOO_LARGE: Final = ProtocolError(413, "request_payload_too_large")


class ServerCodec:
    __slots__ = (
        "handler", "parser", "policy", "url", "headers", "head_size", "in_head", "head_fed", "head_started",
        "body_bytes", "upgrade_ignored", "max_head_bytes", "max_head_count", "max_body", "chunk", "message_bytes",
        "upgrading",
    )

    def __init__(self, handler: RequestEvents, policy: HeadPolicy = DEFAULT_POLICY) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.policy = policy
        self.max_head_bytes = policy.max_header_bytes  # read per header line: plain attributes
        self.max_head_count = policy.max_header_count
        self.max_body = policy.max_body_bytes
        self.url = b""
        self.headers = NO_HEADERS
        self.head_size = 0
        self.in_head = True
        self.head_fed = 0  # bytes fed since the head in progress began (a head that never ends is still bounded)
        self.head_started = False  # bytes of a request head arrived, the head is not complete yet
        self.body_bytes = 0  # body bytes of the request being parsed (counted only with a body limit)
        self.upgrade_ignored = False  # the request being parsed is an h2c upgrade served as HTTP/1.1
        self.chunk = b""  # the bytes being fed, when a request may begin at their start
        self.message_bytes = b""  # the bytes in which the request being parsed began at the start, if it did
        self.upgrading = False  # the request being parsed is a WebSocket upgrade

    def feed(self, data: bytes) -> None:
        """Parse `data`, calling the handler; raises ProtocolError."""
        if self.in_head:
            self.head_fed += len(data)
            if not self.head_started:
                self.chunk = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            if isinstance(cause, _LimitError):
                raise cause.error from None
            log.error("request callback failed", exc_info=cause)
            raise ProtocolError(400, "http1.codec_error") from None
        except httptools.HttpParserUpgrade as exc:
            if self.upgrading:
                self.upgrading = False
                raise Upgraded(data[int(exc.args[0]):]) from None
            if not self.upgrade_ignored:
                raise ProtocolError(403, "upgrade_failed") from None
            self.upgrade_ignored = False  # an h2c upgrade served as a plain request: parse on after it
            self.parser = httptools.HttpRequestParser(self)
            rest = data[int(exc.args[0]):]
            if rest:
                self.feed(rest)
            return
        except httptools.HttpParserInvalidMethodError:
            raise ProtocolError(400, "http1.invalid_method") from None
        except httptools.HttpParserError as exc:
            if str(exc).startswith("Pause on PRI"):
                raise ProtocolError(400, H2_PREFACE_DETAIL) from None  # h2c with prior knowledge
            raise ProtocolError(400, "http1.codec_error") from None
        if self.in_head and self.head_fed > self.max_head_bytes + HEAD_SLACK:
            raise HEADERS_TOO_LARGE

    def stop(self) -> None:
        """After an error: nothing of the head in progress counts any more."""
        self.head_started = False

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self.message_bytes = self.chunk  # only the first request of these bytes begins at their start
        self.chunk = b""
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.in_head = True
        self.head_started = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.max_head_bytes:
            raise _LimitError(HEADERS_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # trailers: not forwarded
        self.head_size += len(name) + len(value)
        self.headers.append((name.lower(), value))
        if self.head_size > self.max_head_bytes or len(self.headers) > self.max_head_count:
            raise _LimitError(HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_fed = 0
        self.head_started = False
        self.body_bytes = 0
        parser = self.parser
        if parser.should_upgrade():
            self._check_upgrade(parser.get_method())
        method = parser.get_method()
        head = build_request_head(method, self.url, self.headers, self._version(method), parser.should_keep_alive(),
                                  self.policy)
        self.headers = NO_HEADERS  # owned by the head now; not kept by an idle connection
        self.handler.on_request_head(head)

    def _version(self, method: bytes) -> str:
        """The request's HTTP version. httptools formats it into a new string (2k instructions, a twentieth of a
        proxied request), so when the request line arrived whole at the start of the bytes fed, read it there:
        llhttp accepted `method SP target SP HTTP/x.y CRLF` there. Anything else asks httptools: a line split
        across reads, a request after another in the same bytes, leading empty lines (they shift the line, and no
        CRLF can then be where the version's ends)."""
        data = self.message_bytes
        self.message_bytes = b""
        if data:
            at = len(method) + len(self.url) + 2
            line_end = data[at:at + 10]
            if line_end == b"HTTP/1.1\r\n":
                return "1.1"
            if line_end == b"HTTP/1.0\r\n":
                return "1.0"
        return self.parser.get_http_version()

    def _check_upgrade(self, method: bytes) -> None:
        """CONNECT and protocol upgrades are refused, but for a bodiless h2c upgrade (see the module docstring);
        httptools skips the body of an upgrade request, so with a body it is refused too."""
        if method == b"CONNECT":
            raise ProtocolError(403, "http1.connect_not_supported")
        upgrade = [v for n, v in self.headers if n == b"upgrade"]
        framed = [v for n, v in self.headers if n == b"transfer-encoding" or (n == b"content-length" and v.strip(b" \t")
                                                                              not in (b"0", b""))]
        protocol = upgrade[0].strip(b" \t").lower() if len(upgrade) == 1 else b""
        if protocol == b"h2c" and not framed:
            self.upgrade_ignored = True
            return
        if protocol == b"websocket" and method == b"GET" and not framed:
            self.upgrading = True
            return
        raise ProtocolError(403, "upgrade_failed")

    def on_body(self, body: bytes) -> None:
        if self.max_body:
            self.body_bytes += len(body)
            if self.body_bytes > self.max_body:
                raise _LimitError(BODY_TOO_LARGE)
        self.handler.on_request_body(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_fed = 0
        self.handler.on_request_end()


class TunnelCodec(ServerCodec):
    """After an upgrade: the client's bytes go to the upgraded request's body as they come, unparsed."""

    __slots__ = ("tunnel",)

    def __init__(self, handler: RequestEvents, tunnel: Callable[[bytes], None]) -> None:
        super().__init__(handler)
        self.tunnel = tunnel  # the upgraded request's body sink

    def feed(self, data: bytes) -> None:
        self.tunnel(data)
