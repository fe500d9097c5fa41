"""gRPC message counting over a body split anywhere; the grpc-status of a header block."""

from __future__ import annotations

import random

from meshproxy.http2.grpc import GRPC_UNKNOWN, MessageCounter, grpc_status_of


def frame(payload: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


def test_messages_are_counted_whatever_the_pieces() -> None:
    rng = random.Random(7)
    body = b"".join(frame(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))) for _ in range(50))
    for _ in range(200):
        counter = MessageCounter()
        cuts = sorted(rng.sample(range(1, len(body)), rng.randrange(0, 30)))
        for a, b in zip([0, *cuts], [*cuts, len(body)]):
            counter.feed(body[a:b])
        assert counter.count == 50


def test_an_empty_message_counts_and_a_partial_prefix_is_held() -> None:
    counter = MessageCounter()
    counter.feed(frame(b"")[:3])
    assert counter.count == 0
    counter.feed(frame(b"")[3:] + frame(b"abc"))
    assert counter.count == 2


def test_grpc_status_is_read_as_decimal_digits_else_unknown() -> None:
    for value, status in [(b"0", 0), (b"14", 14), (b"016", 16), (b"", GRPC_UNKNOWN), (b"-1", GRPC_UNKNOWN),
                          (b"1 ", GRPC_UNKNOWN), (b"\xd9\xa1", GRPC_UNKNOWN), (b"9" * 30, int(b"9" * 30))]:
        assert grpc_status_of([(b"grpc-message", b"x"), (b"grpc-status", value)]) == status
    assert grpc_status_of([(b"content-type", b"application/grpc")]) == -2
