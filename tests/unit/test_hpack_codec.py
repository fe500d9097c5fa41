"""meshproxy.http2.hpack_codec against the `hpack` package as the other end, and RFC 7541's own examples."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError

from meshproxy.http2.hpack_codec import Decoder, Encoder, huffman_decode

SEED = 1807
NAMES = [b":method", b":path", b":authority", b":status", b"content-type", b"x-request-id", b"cookie", b"date",
         b"grpc-status", b"grpc-message", b"user-agent", b"x-custom-header-with-a-long-name", b"te", b"accept"]


def random_headers(rng: random.Random, count: int) -> list[tuple[bytes, bytes]]:
    headers = []
    for _ in range(count):
        name = rng.choice(NAMES)
        kind = rng.random()
        if kind < 0.3:
            value = rng.choice([b"GET", b"/", b"200", b"application/grpc", b"0", b"trailers", b""])
        elif kind < 0.8:
            value = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789-_/.:; =") for _ in range(rng.randrange(40)))
        else:
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))  # any octet, Huffman's long codes
        headers.append((name, value))
    return headers


@pytest.mark.parametrize("table_size", [4096, 256, 0])
def test_encoder_output_decodes_with_the_hpack_package(table_size: int) -> None:
    rng = random.Random(SEED)
    ours, theirs = Encoder(), hpack.Decoder()
    ours.header_table_size = table_size
    theirs.max_allowed_table_size = 4096
    for _ in range(300):
        headers = random_headers(rng, rng.randrange(1, 12))
        assert theirs.decode(ours.encode(headers), raw=True) == headers
    assert theirs.header_table_size == table_size  # the size update went out at the start of the first block


def test_decoder_reads_what_the_hpack_package_encodes() -> None:
    rng = random.Random(SEED + 1)
    theirs, ours = hpack.Encoder(), Decoder()
    for round_index in range(300):
        headers = random_headers(rng, rng.randrange(1, 12))
        block = theirs.encode(headers, huffman=round_index % 3 != 0)
        assert ours.decode(block, raw=True) == headers


def test_never_indexed_headers_stay_never_indexed_both_ways() -> None:
    secret = hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer abc")
    block = Encoder().encode([(b":method", b"GET"), secret])
    assert block[1] & 0xF0 == 0x10  # literal never indexed, RFC 7541 6.2.3
    decoded = Decoder().decode(block, raw=True)
    assert decoded == [(b":method", b"GET"), (b"authorization", b"Bearer abc")]
    assert isinstance(decoded[1], hpack.NeverIndexedHeaderTuple)
    encoder = Encoder()
    encoder.encode([(b"cookie", b"a=b", True)])  # a sensitive 3-tuple is not added to the table either
    assert encoder.table() == []


def test_rfc7541_c4_requests_with_huffman() -> None:
    decoder = Decoder()
    first = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    assert decoder.decode(first, raw=True) == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                                (b":authority", b"www.example.com")]
    second = bytes.fromhex("828684be5886a8eb10649cbf")
    assert decoder.decode(second, raw=True)[-1] == (b"cache-control", b"no-cache")
    third = bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")
    assert decoder.decode(third, raw=True)[-1] == (b"custom-key", b"custom-value")
    assert decoder.size == 164  # C.4.3's table size


def test_rfc7541_c6_responses_with_eviction() -> None:
    decoder = Decoder()
    decoder.header_table_size = 256
    decoder.max_allowed_table_size = 256
    blocks = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
              "4883640effc1c0bf",
              "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af2708"
              "7f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]
    headers = [decoder.decode(bytes.fromhex(block), raw=True) for block in blocks]
    assert headers[1][0] == (b":status", b"307")
    assert headers[2][-1] == (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
    assert decoder.size == 215  # C.6.3: entries evicted to fit 256 octets


@pytest.mark.parametrize(("block", "error"), [
    (b"\x80", HPACKDecodingError),  # index 0
    (b"\xbf", HPACKDecodingError),  # index 63: beyond an empty dynamic table
    (b"\x40\x03ab", HPACKDecodingError),  # name longer than the block
    (b"\x40\x81\xff\x00", HPACKDecodingError),  # Huffman: 8 bits of padding (RFC 7541 5.2)
    (b"\x40\x81\x00\x00", HPACKDecodingError),  # Huffman: padding that is not EOS's 1s
    (b"\x40\x84\xff\xff\xff\xff\x00", HPACKDecodingError),  # Huffman: the EOS symbol itself
    (b"\x1f", HPACKDecodingError),  # truncated integer
    (b"\x1f\xff\xff\xff\xff\xff\xff\xff\x01", HPACKDecodingError),  # an integer beyond any header's size
    (b"\x82\x3f\xe1\x1f", HPACKDecodingError),  # a table size update after a header
    (b"\x3f\xe2\x1f", InvalidTableSizeError),  # 4097 > the allowed 4096
])
def test_malformed_blocks_raise_hpack_errors(block: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        Decoder().decode(block, raw=True)


def test_decoded_list_size_is_bounded() -> None:
    decoder = Decoder(max_header_list_size=100)
    block = Encoder().encode([(b"x-a", b"a" * 40), (b"x-b", b"b" * 40)])
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(block, raw=True)


def test_huffman_round_trip_of_every_octet() -> None:
    data = bytes(range(256)) * 2
    block = Encoder().encode([(b"x-all", data)])
    assert hpack.Decoder().decode(block, raw=True) == [(b"x-all", data)]
    assert huffman_decode(hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                                       hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(data)) == data
