"""The one error type of the HTTP/1.1 codec: what went wrong and the status to answer with."""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the proxy must refuse. After it the downstream connection is closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail  # Envoy's response code detail, e.g. http1.codec_error
