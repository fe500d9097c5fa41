"""The client side of the HTTP/1.1 codec, sans-IO, on httptools: response bytes in, response events out.

`ClientCodec.feed(data)` parses one response per request and calls its handler's `ResponseEvents` (the upstream
transport) with the head (status, headers, the body's length when known), body chunks and the end. Interim 1xx
responses are dropped (the proxy answers `Expect` itself). A body delimited by the close of the connection ends
with `close()`. Malformed bytes, or a response nobody asked for, raise `ProtocolError`.
The request side is serialized by `http1.wire`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import httptools

from ..messages import ResponseEvents
from .errors import ProtocolError, Upgraded

FRAMING_LENGTH: Final = 0  # content-length
FRAMING_CHUNKED: Final = 1
FRAMING_EOF: Final = 2  # body runs until the upstream closes
FRAMING_NONE: Final = 3  # no body (HEAD, 1xx, 204, 304)

UNEXPECTED_RESPONSE: Final = "http1.unexpected_response"


class CallbackHandler(ResponseEvents):
    """Response events to three plain callables, for code outside the compiled hot path (a tool, a test): an
    interpreted class cannot inherit a compiled trait."""

    __slots__ = ("head", "body", "end")

    def __init__(self, head: Callable[[int, list[tuple[bytes, bytes]], int | None, bool], None],
                 body: Callable[[bytes], None], end: Callable[[], None]) -> None:
        self.head = head
        self.body = body
        self.end = end

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        self.head(status, headers, content_length, end_stream)

    def on_response_body(self, data: bytes) -> None:
        self.body(data)

    def on_response_end(self) -> None:
        self.end()


class _Unexpected(Exception):
    pass


class ClientCodec:
    __slots__ = ("handler", "parser", "expecting", "head_only", "status", "headers", "head_done", "framing",
                 "content_length", "keep_alive", "upgraded")

    def __init__(self, handler: ResponseEvents) -> None:
        self.handler = handler
        self.parser = httptools.HttpResponseParser(self)
        self.expecting = False  # a request was sent and its response has not ended
        self.head_only = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.framing = FRAMING_LENGTH
        self.content_length: int | None = None
        self.keep_alive = True  # the connection may carry another request after this response
        self.upgraded = False  # a 101 to an upgrade request: the connection is a tunnel now

    def expect(self, head_only: bool) -> None:
        """A request was sent: parse its response (`head_only`: the request was HEAD, no body follows)."""
        self.expecting = True
        self.head_only = head_only
        self.status = 0
        self.headers = []
        self.head_done = False
        self.content_length = None
        self.keep_alive = True

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Unexpected):
                raise ProtocolError(502, UNEXPECTED_RESPONSE) from None
            raise ProtocolError(502, f"http1.codec_error: {exc.__context__}") from None
        except httptools.HttpParserUpgrade as exc:
            if self.upgraded:
                raise Upgraded(data[int(exc.args[0]):]) from None
            raise ProtocolError(502, UNEXPECTED_RESPONSE) from None
        except httptools.HttpParserError as exc:
            raise ProtocolError(502, f"http1.codec_error: {exc}") from None

    def close(self) -> bool:
        """The connection closed: True if that ended a close-delimited body (the response is complete)."""
        if self.expecting and self.head_done and self.framing == FRAMING_EOF:
            self._finish()
            return True
        return False

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if not self.expecting:
            # A response nobody asked for (bytes after a complete response, e.g. a smuggled second one): stop here;
            # the connection is discarded, so the next request never reads these bytes.
            raise _Unexpected

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101 and self.expecting and self.parser.should_upgrade():
                self._switch_protocols()
                return
            self.headers = []  # 1xx interim response: dropped
            return
        self.head_done = True
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        framing = FRAMING_EOF
        for name, value in self.headers:
            if name == b"content-length":
                framing, self.content_length = FRAMING_LENGTH, int(value)
            elif name == b"transfer-encoding":
                framing = FRAMING_CHUNKED
        if self.head_only or status == 204 or status == 304:
            framing = FRAMING_NONE
        if framing == FRAMING_EOF:
            self.keep_alive = False
        self.framing = framing
        length = self.content_length if framing == FRAMING_LENGTH else (0 if framing == FRAMING_NONE else None)
        self.handler.on_response_head(status, self.headers, length, framing == FRAMING_NONE)
        if self.head_only and self.expecting:
            self.parser = httptools.HttpResponseParser(self)  # llhttp would wait for a body a HEAD never gets
            self._finish()

    def _switch_protocols(self) -> None:
        """101 to an upgrade request: the final response; its body is the tunnel, until the upstream closes."""
        self.head_done = True
        self.status = 101
        self.keep_alive = False
        self.framing = FRAMING_EOF
        self.upgraded = True
        self.handler.on_response_head(101, self.headers, None, False)
        self.expecting = False  # llhttp completes the 101 "message" now: not the response's end (the close is)

    def on_body(self, body: bytes) -> None:
        if self.expecting:
            self.handler.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.head_done and self.expecting:
            self._finish()

    def _finish(self) -> None:
        self.expecting = False
        self.handler.on_response_end()


class TunnelClientCodec(ClientCodec):
    """After a 101: the upstream's bytes are the response body as they come, until it closes (close() ends it)."""

    __slots__ = ()

    def __init__(self, handler: ResponseEvents) -> None:
        super().__init__(handler)
        self.expecting = True
        self.head_done = True
        self.status = 101
        self.keep_alive = False
        self.framing = FRAMING_EOF
        self.upgraded = True

    def feed(self, data: bytes) -> None:
        if data:
            self.handler.on_response_body(data)
