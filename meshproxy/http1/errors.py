"""The one error type of the HTTP/1.1 codec: what went wrong and the status to answer with."""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the proxy must refuse. After it the downstream connection is closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail  # Envoy's response code detail, e.g. http1.codec_error


class Upgraded(Exception):
    """The message just parsed switched the connection to another protocol (a WebSocket upgrade): from here on its
    bytes are the tunnel's, `rest` the first of them (read with the head)."""

    def __init__(self, rest: bytes) -> None:
        super().__init__("upgraded")
        self.rest = rest
