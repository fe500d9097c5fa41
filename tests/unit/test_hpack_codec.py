"""meshproxy.http2.hpack_codec against the `hpack` package as the other end, and RFC 7541's own examples."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError

from meshproxy.http2.hpack_codec import Decoder, Encoder, encode_prefixed, huffman_decode, huffman_encode

SEED = 1807
NAMES = [b":method", b":path", b":authority", b":status", b"content-type", b"x-request-id", b"cookie", b"date",
         b"grpc-status", b"grpc-message", b"user-agent", b"x-custom-header-with-a-long-name", b"te", b"accept"]


GRPC_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"backend"),
                (b":path", b"/bench.Echo/Unary"), (b"user-agent", b"grpc-python/1.60"),
                (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"x-forwarded-proto", b"http"),
                (b"x-envoy-attempt-count", b"1")]


def request_id(rng: random.Random) -> bytes:
    return "-".join(f"{rng.getrandbits(bits):0{bits // 4}x}" for bits in (32, 16, 16, 16, 48)).encode()


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


def test_request_ids_are_not_indexed_and_the_other_fields_stay_indexed() -> None:
    """x-request-id is new each request: sent without indexing (RFC 7541 6.2.2), it evicts nothing, so after the
    first request every other field of a long run goes out as one octet, its index."""
    rng = random.Random(SEED + 2)
    ours, theirs = Encoder(), hpack.Decoder()
    path = Encoder().encode([(b":path", b"/bench.Echo/Unary")])
    first_table = None
    for number in range(2000):
        rid = request_id(rng)
        headers = [*GRPC_REQUEST, (b"x-request-id", rid)]
        block = ours.encode(headers)
        assert theirs.decode(block, raw=True) == headers
        assert all(name != b"x-request-id" for name, _ in ours.table())
        assert (b"x-request-id", rid) not in theirs.header_table.dynamic_entries
        if number == 0:
            first_table = ours.table()
            continue
        assert ours.table() == first_table  # nothing added, nothing evicted
        # :method, :scheme, :authority, then :path (a literal without indexing), the other 5, the request id
        assert all(octet & 0x80 for octet in block[:3])  # one indexed octet each
        assert block[3:3 + len(path)] == path
        rest = block[3 + len(path):]
        assert all(octet & 0x80 for octet in rest[:5])
        assert rest[5] == 0x00  # x-request-id: literal without indexing, new name (6.2.2)
    # indexed by the first request: all but :method and :scheme (whole in the static table) and :path
    whole_in_static_or_unindexed = (b":method", b":scheme", b":path")
    assert first_table == [field for field in reversed(GRPC_REQUEST) if field[0] not in whole_in_static_or_unindexed]


def test_path_is_a_literal_without_indexing_with_the_static_name() -> None:
    block = Encoder().encode([(b":path", b"/bench.Echo/Unary")])
    assert block[0] == 0x04  # 0000 + :path's static index 4
    assert Decoder().decode(block, raw=True) == [(b":path", b"/bench.Echo/Unary")]


@pytest.mark.parametrize("table_size", [4096, 300])
def test_encoder_table_matches_the_hpack_decoders_through_evictions(table_size: int) -> None:
    """The encoder's idea of the dynamic table (what its indexes refer to) is the peer's, entry for entry, while
    entries come and go; and our decoder keeps the table the hpack package's encoder keeps."""
    rng = random.Random(SEED + 3)
    ours, theirs = Encoder(), hpack.Decoder()
    ours.header_table_size = table_size
    their_encoder, our_decoder = hpack.Encoder(), Decoder()
    for _ in range(400):
        headers = random_headers(rng, rng.randrange(1, 12))
        assert theirs.decode(ours.encode(headers), raw=True) == headers
        assert ours.table() == list(theirs.header_table.dynamic_entries)
        assert ours.size == theirs.header_table._current_size
        assert our_decoder.decode(their_encoder.encode(headers), raw=True) == headers
        assert our_decoder.table() == list(their_encoder.header_table.dynamic_entries)
        assert our_decoder.size == their_encoder.header_table._current_size


def test_indexes_beyond_one_octet_both_ways() -> None:
    """100 small entries (all fit): the oldest have indexes above 127, written with a continuation octet."""
    fields = [(b"x-%d" % number, b"v") for number in range(100)]
    ours, theirs, our_decoder = Encoder(), hpack.Decoder(), Decoder()
    for block in (ours.encode(fields), ours.encode(fields)):
        assert theirs.decode(block, raw=True) == fields
        assert our_decoder.decode(block, raw=True) == fields
    again = ours.encode(fields[:1])
    assert again == bytes([0xFF, 161 - 127])  # x-0 is the oldest of 100 entries: index 61 + 100
    assert our_decoder.decode(again, raw=True) == fields[:1]


def test_table_size_changes_between_blocks_evict_on_both_sides() -> None:
    rng = random.Random(SEED + 4)
    ours, theirs = Encoder(), Decoder()
    for size in (4096, 200, 0, 1000, 4096):
        ours.header_table_size = size
        for _ in range(20):
            headers = random_headers(rng, rng.randrange(1, 8))
            assert theirs.decode(ours.encode(headers), raw=True) == headers
            assert theirs.table() == ours.table()
            assert theirs.size == ours.size <= size


def test_huffman_and_integers_match_the_hpack_package() -> None:
    rng = random.Random(SEED + 5)
    coder = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                         hpack.huffman_constants.REQUEST_CODES_LENGTH)
    for length in range(80):
        data = bytes(rng.randrange(256) for _ in range(length))
        assert huffman_encode(data) == coder.encode(data)
        assert huffman_decode(huffman_encode(data)) == data
    for prefix_bits in (4, 5, 6, 7):
        for value in [*range(300), 2 ** 14 - 1, 2 ** 14, 2 ** 21 + 5, 2 ** 28 + 3]:
            out: list[bytes] = []
            encode_prefixed(value, (1 << prefix_bits) - 1, 0, out)
            assert b"".join(out) == bytes(hpack.hpack.encode_integer(value, prefix_bits))


def test_a_value_sent_again_after_its_entry_was_evicted_is_a_literal_again() -> None:
    """The encoder remembers the value object it last found for a name; an evicted entry's index must not be
    reused from that memory. A 100-octet table holds one of these 60-octet entries at a time."""
    value, other = b"v" * 20, b"w" * 20
    ours, theirs = Encoder(), hpack.Decoder()
    ours.header_table_size = 100
    theirs.max_allowed_table_size = 100
    for headers, indexed in (([(b"x-aaaaaa", value)], False), ([(b"x-aaaaaa", value)], True),
                             ([(b"x-aaaaaa", other)], False), ([(b"x-aaaaaa", value)], False),
                             ([(b"x-aaaaaa", value)], True)):
        block = ours.encode(headers)
        assert theirs.decode(block, raw=True) == headers
        assert (block[-1] == 0x80 | 62) is indexed  # the one entry, index 62, or a literal that replaces it


def test_literals_of_static_names_repeated_or_changed_decode_as_sent() -> None:
    """The decoder takes a static name's Huffman-coded value as last time when its octets are the same: the
    same octets under another name, a changed value, and the entries each literal adds all stay right."""
    ours = Decoder()
    sent = [(b"server", b"nginx/1.22.1"), (b"server", b"nginx/1.22.1"), (b"user-agent", b"nginx/1.22.1"),
            (b"server", b"nginx/1.22.2"), (b"server", b"nginx/1.22.1"), (b":path", b"/bench.Echo/Unary")]
    for number, field in enumerate(sent, start=1):
        for theirs in (hpack.Encoder(), hpack.Encoder()):  # a fresh encoder: a literal with indexing each time
            block = theirs.encode([field])
            assert block[0] & 0xC0 == 0x40 and block[1] & 0x80  # static name, Huffman-coded value
            assert ours.decode(block, raw=True) == [field]
        never = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(*field)])
        decoded = ours.decode(never, raw=True)
        assert decoded == [field] and isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)
        assert ours.table()[:2] == [field, field] and len(ours.table()) == 2 * number


def test_the_decoder_keeps_no_large_literal_between_blocks() -> None:
    """What the decoder remembers of literals is bounded per connection, whatever the peer sends."""
    ours = Decoder(max_header_list_size=2 ** 20)
    large = [(b"cookie", b"a" * 50_000), (b"user-agent", b"b" * 50_000)]
    assert ours.decode(hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(*field) for field in large]),
                       raw=True) == large
    assert ours.last_literals == {}
    small = [(b"cookie", b"c=d")]
    assert ours.decode(hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(*small[0])]), raw=True) == small
    assert list(ours.last_literals) == [32] and ours.last_literals[32].header == small[0]  # cookie: static 32


def test_a_block_that_reads_no_dynamic_entry_counts_the_entries_it_adds() -> None:
    """`added`: the entries a block added when it read no dynamic entry (what `replay` puts in again), else -1:
    a dynamic index, a dynamic name, a size update, or an entry too large for the table (which empties it)."""
    nginx = bytes.fromhex("887689aa6355e580ae212e1f5c0138")  # :status 200, server and content-length added
    decoder, reference = Decoder(), hpack.Decoder()
    assert decoder.decode(nginx, raw=True) == reference.decode(nginx, raw=True)
    assert decoder.added == 2
    decoder.replay(decoder.table()[::-1][-2:])
    reference.decode(nginx, raw=True)
    assert decoder.table() == list(reference.header_table.dynamic_entries)
    for block in (b"\xbe",  # the dynamic entry 62
                  b"\x7e\x01x",  # a literal of entry 62's name
                  b"\x3f\xe1\x1f\x82"):  # a table size update (to 4096), then :method GET
        decoder.decode(block, raw=True)
        assert decoder.added == -1
    assert decoder.decode(b"\x82", raw=True) == [(b":method", b"GET")]  # static indexes only
    assert decoder.added == 0
    small = Decoder()
    small.header_table_size = small.max_allowed_table_size = 64
    small.decode(b"\x40\x01a\x01b" + b"\x40\x01c\x20" + b"x" * 32, raw=True)  # the second entry empties the table
    assert small.added == -1 and small.table() == []


def literal_block(fields: list[tuple[bytes, bytes]]) -> bytes:
    """Literals with incremental indexing and a new name, not Huffman-coded: a block that reads no dynamic entry."""
    out = bytearray()
    for name, value in fields:
        out.append(0x40)
        for string in (name, value):
            assert len(string) < 0x7F
            out.append(len(string))
            out += string
    return bytes(out)


def test_a_replayed_block_leaves_the_table_as_decoding_it_again_does() -> None:
    """`replay` of a block's entries against hpack's decoder decoding it again, through evictions, and after a size
    update that leaves the block's entries too large to fit together (then they go in one by one)."""
    rng = random.Random(SEED)
    blocks = [literal_block([(b"x-%d" % rng.randrange(50), b"v" * rng.randrange(1, 60))
                             for _ in range(rng.randrange(1, 5))]) for _ in range(8)]
    decoder, reference = Decoder(), hpack.Decoder()
    kept: dict[bytes, list[tuple[bytes, ...]]] = {}
    for step in range(300):
        if step == 150:  # both shrink to 100 octets: a kept block of three or four entries no longer fits at once
            for side in (decoder, reference):
                side.decode(b"\x3f\x45", raw=True)
        block = rng.choice(blocks)
        expected = reference.decode(block, raw=True)
        if block in kept:
            decoder.replay(kept[block])
        else:
            assert decoder.decode(block, raw=True) == expected
            if decoder.added >= 0:  # (-1: its entries did not all fit the table)
                assert decoder.added == len(expected)
                kept[block] = decoder.table()[:len(expected)][::-1]
        assert decoder.table() == list(reference.header_table.dynamic_entries)
        assert decoder.size == reference.header_table._current_size
