"""gRPC as HTTP/2 carries it, read per request (so compiled): what makes a request gRPC, its `grpc-timeout`, the
`grpc-status` of a response; and the message framing of a body (a 1-byte flag and a 4-byte big-endian length
before each message), counted as it streams by, for Istio's istio_request_messages_total /
istio_response_messages_total."""

from __future__ import annotations

from typing import Final

from ..messages import RequestHead
from .frames import decimal

PREFIX: Final = 5  # compressed flag + length
GRPC_CONTENT_TYPE: Final = b"application/grpc"
GRPC_STATUS: Final = b"grpc-status"
GRPC_UNKNOWN: Final = 2
GRPC_TIMEOUT_UNITS: Final = {0x48: 3600.0, 0x4D: 60.0, 0x53: 1.0, 0x6D: 1e-3, 0x75: 1e-6, 0x6E: 1e-9}  # H M S m u n


def grpc_timeout(value: bytes | None) -> float:
    """A `grpc-timeout` header (1-8 digits and a unit) in seconds; 0.0 when absent or malformed (then ignored, as
    Envoy's Grpc::Common::getGrpcTimeout)."""
    if value is None or not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return 0.0
    unit = GRPC_TIMEOUT_UNITS.get(value[-1])
    return int(value[:-1]) * unit if unit is not None else 0.0


def grpc_status_of(headers: list[tuple[bytes, bytes]]) -> int:
    """The grpc-status in a header block (a trailers-only response, or trailers); -2 when there is none."""
    for name, value in headers:
        if name == GRPC_STATUS:
            status = decimal(value)  # a native loop, not isdigit() and int(): method calls
            return status if status >= 0 else GRPC_UNKNOWN
    return -2


def is_grpc(head: RequestHead) -> bool:
    """A gRPC request (content-type application/grpc, +proto, +json...), as Envoy's Grpc::Common::isGrpcRequestHeaders."""
    content_type = head.header(b"content-type")
    return content_type is not None and content_type.startswith(GRPC_CONTENT_TYPE) and \
        (len(content_type) == len(GRPC_CONTENT_TYPE) or content_type[len(GRPC_CONTENT_TYPE)] in b"+;")


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
            self.skip = (header[1] << 24) | (header[2] << 16) | (header[3] << 8) | header[4]  # native, no call

    def first_complete(self) -> bool:
        """The first message has arrived whole (a second may have begun): a response that goes on is streaming."""
        return self.count > 1 or (self.count == 1 and self.skip == 0)
