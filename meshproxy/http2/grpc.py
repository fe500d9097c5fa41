"""gRPC's message framing over an HTTP/2 body (a 1-byte flag and a 4-byte big-endian length before each message),
counted as it streams by, for Istio's istio_request_messages_total / istio_response_messages_total."""

from __future__ import annotations

from typing import Final

PREFIX: Final = 5  # compressed flag + length


class MessageCounter:
    """Counts the messages that start in a body fed in arbitrary pieces; holds at most a partial 5-byte prefix."""

    __slots__ = ("count", "skip", "prefix")

    def __init__(self) -> None:
        self.count = 0
        self.skip = 0  # bytes of the current message still to pass
        self.prefix = b""  # a prefix split across pieces

    def feed(self, data: bytes) -> None:
        position = 0
        size = len(data)
        while position < size:
            if self.skip:
                step = min(self.skip, size - position)
                self.skip -= step
                position += step
                continue
            need = PREFIX - len(self.prefix)
            piece = data[position:position + need]
            position += len(piece)
            if len(piece) < need:
                self.prefix += piece
                return
            header = self.prefix + piece if self.prefix else piece
            self.prefix = b""
            self.count += 1
            self.skip = int.from_bytes(header[1:5], "big")

    def first_complete(self) -> bool:
        """The first message has arrived whole (a second may have begun): a response that goes on is streaming."""
        return self.count > 1 or (self.count == 1 and self.skip == 0)
