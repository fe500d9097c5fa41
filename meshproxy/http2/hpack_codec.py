"""HPACK (RFC 7541), compiled with mypyc: the `hpack` package's Encoder and Decoder, same interface, same errors.

h2 spends most of a small request's time in the pure-Python `hpack` package (a search per header, a bit-level
Huffman decoder, debug logging per header). H2Codec hands h2 these instead (`conn.encoder`, `conn.decoder`);
h2 keeps everything else (frames, states, validation). The tables (static table, Huffman code) are the `hpack`
package's own; what is ours is the code that runs per header:

- Encoder: a header found whole in the static or dynamic table is sent as its index; else a literal with
  incremental indexing (never indexed when the header is a `NeverIndexedHeaderTuple` or a sensitive 3-tuple, as
  h2 marks authorization and short cookies), its name indexed when the name is known, its strings Huffman-coded
  when that is shorter. Table size changes from the peer's SETTINGS go out at the start of the next block.
- Decoder: every representation, the Huffman code through a 4-bit state machine built once at import, padding
  and EOS checked as section 5.2 says, the decoded list size bounded by `max_header_list_size`, table size
  updates only at the start of a block and within `max_allowed_table_size`.
"""

from __future__ import annotations

from typing import Any, Final

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable
from mypy_extensions import i64

DEFAULT_TABLE_SIZE: Final = 4096
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 2 ** 16  # hpack's default (h2 sets its own)
ENTRY_OVERHEAD: Final = 32  # RFC 7541 4.1
MAX_INTEGER_BYTES: Final = 6  # continuation bytes of one integer: 2^35 and more is nobody's header length
STATIC: Final[tuple[tuple[bytes, bytes], ...]] = tuple(HeaderTable.STATIC_TABLE)
STATIC_LENGTH: Final = len(STATIC)  # 61


def _static_maps() -> tuple[dict[tuple[bytes, bytes], int], dict[bytes, int]]:
    pairs: dict[tuple[bytes, bytes], int] = {}
    names: dict[bytes, int] = {}
    for index, (name, value) in enumerate(STATIC, start=1):
        pairs.setdefault((name, value), index)
        names.setdefault(name, index)
    return pairs, names


STATIC_PAIRS, STATIC_NAMES = _static_maps()
HUFFMAN_CODES: Final[list[int]] = list(REQUEST_CODES)
HUFFMAN_LENGTHS: Final = bytes(REQUEST_CODES_LENGTH[:256])  # bytes: indexed without boxing (EOS's is not needed)
EOS: Final = 256
FAIL: Final = -2  # in the machine's emit list: this nibble completes EOS, or follows no code
NOTHING: Final = 0  # HUFFMAN_STEP values
SYMBOL: Final = 1
BROKEN: Final = 2


def _huffman_machine() -> tuple[list[int], list[int], list[bool]]:
    """The decoder's state machine, four bits at a time: for (state, nibble) the next state and the symbol the
    nibble completes (-1 none; every code is at least 5 bits, so at most one). States are the code tree's inner
    nodes; `accept[state]`: the bits read since the last symbol may end the string (fewer than 8 bits, all 1s:
    a prefix of EOS, RFC 7541 5.2)."""
    left: list[int] = [-1]
    right: list[int] = [-1]
    leaf: dict[int, int] = {}  # child id (negative: -1 - symbol) of a leaf
    for symbol in range(257):
        code, length = REQUEST_CODES[symbol], REQUEST_CODES_LENGTH[symbol]
        node = 0
        for position in range(length - 1, -1, -1):
            bit = (code >> position) & 1
            children = right if bit else left
            if position == 0:
                children[node] = -1 - symbol
                leaf[-1 - symbol] = symbol
            else:
                if children[node] < 0:
                    left.append(-1)
                    right.append(-1)
                    children[node] = len(left) - 1
                node = children[node]
    count = len(left)
    ones_depth = [-1] * count  # depth of a node reached from the root by 1 bits only
    ones_depth[0] = 0
    node, depth = 0, 0
    while right[node] >= 0:
        node, depth = right[node], depth + 1
        ones_depth[node] = depth
    accept = [0 <= ones_depth[state] <= 7 for state in range(count)]
    next_state = [0] * (count * 16)
    emit = [-1] * (count * 16)
    for state in range(count):
        for nibble in range(16):
            node, symbol = state, -1
            for position in (3, 2, 1, 0):
                child = right[node] if (nibble >> position) & 1 else left[node]
                if child < 0:
                    found = leaf[child]
                    if found == EOS or symbol >= 0:
                        symbol = FAIL
                        break
                    symbol, node = found, 0
                else:
                    node = child
            next_state[state * 16 + nibble] = node
            emit[state * 16 + nibble] = symbol
    return next_state, emit, accept


def _machine_bytes() -> tuple[bytes, bytes, bytes, bytes]:
    """The machine as byte strings (mypyc indexes bytes without boxing): next state (the 256 inner nodes fit a
    byte), what the step does (NOTHING, SYMBOL, BROKEN), the symbol, and whether a state may end a string."""
    next_state, emit, accept = _huffman_machine()
    step = bytes(SYMBOL if symbol >= 0 else BROKEN if symbol == FAIL else NOTHING for symbol in emit)
    return bytes(next_state), step, bytes(max(symbol, 0) for symbol in emit), bytes(accept)


HUFFMAN_NEXT, HUFFMAN_STEP, HUFFMAN_SYMBOL, HUFFMAN_ACCEPT = _machine_bytes()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    state = 0
    next_state, step, symbols = HUFFMAN_NEXT, HUFFMAN_STEP, HUFFMAN_SYMBOL
    for byte in data:
        index = (state << 4) | (byte >> 4)
        kind = step[index]
        if kind == SYMBOL:
            out.append(symbols[index])
        elif kind == BROKEN:
            raise HPACKDecodingError("Invalid Huffman string")
        state = next_state[index]
        index = (state << 4) | (byte & 0x0F)
        kind = step[index]
        if kind == SYMBOL:
            out.append(symbols[index])
        elif kind == BROKEN:
            raise HPACKDecodingError("Invalid Huffman string")
        state = next_state[index]
    if not HUFFMAN_ACCEPT[state]:
        raise HPACKDecodingError("Invalid Huffman padding")
    return bytes(out)


def huffman_length(data: bytes) -> int:
    bits = 0
    lengths = HUFFMAN_LENGTHS
    for byte in data:
        bits += lengths[byte]
    return (bits + 7) >> 3


def huffman_encode(data: bytes) -> bytes:
    # Octets out as SINGLE's byte strings joined once: a bytearray.append per octet is a method call with a boxed int.
    out: list[bytes] = []
    codes, lengths, single = HUFFMAN_CODES, HUFFMAN_LENGTHS, SINGLE
    # i64: at most 7 + 30 bits buffered; native shifts (a plain int's are checked for overflow at each step)
    buffered: i64 = 0
    count: i64 = 0
    for at in range(len(data)):
        byte = data[at]
        length = i64(lengths[byte])
        buffered = (buffered << length) | i64(codes[byte])
        count += length
        while count >= 8:
            count -= 8
            out.append(single[(buffered >> count) & 0xFF])
        buffered &= (i64(1) << count) - 1
    if count:
        out.append(single[((buffered << (8 - count)) | ((i64(1) << (8 - count)) - 1)) & 0xFF])  # EOS's 1s pad
    return b"".join(out)


# The encoder writes a block as a list of byte strings joined once: list.append is cheap compiled, where each
# bytearray.append is a method call with a boxed int.
SINGLE: Final = tuple(bytes((octet,)) for octet in range(256))
# Strings repeat (header values, names): their encoded form is kept, and Huffman-coded strings' decoded form.
CACHED_STRING_MAX: Final = 128  # longer strings are coded each time
CACHE_ENTRIES: Final = 2048  # then the cache starts over
ENCODED: dict[bytes, bytes] = {}
DECODED: dict[bytes, bytes] = {}


def encode_integer(value: int, prefix_bits: int, first: int, out: list[bytes]) -> None:
    """`value` with a `prefix_bits` prefix, the first byte's other bits from `first` (RFC 7541 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(SINGLE[first | value])
        return
    octets = bytearray()
    octets.append(first | limit)
    value -= limit
    while value >= 128:
        octets.append((value & 0x7F) | 0x80)
        value >>= 7
    octets.append(value)
    out.append(bytes(octets))


def encoded_string(data: bytes) -> bytes:
    """A string literal (RFC 7541 5.2): Huffman-coded when that is shorter."""
    size = huffman_length(data)
    parts: list[bytes] = []
    if size < len(data):
        encode_integer(size, 7, 0x80, parts)
        parts.append(huffman_encode(data))
    else:
        encode_integer(len(data), 7, 0, parts)
        parts.append(data)
    return b"".join(parts)


def encode_string(data: bytes, out: list[bytes]) -> None:
    encoded = ENCODED.get(data)
    if encoded is None:
        encoded = _remember(ENCODED, data, encoded_string(data))
    out.append(encoded)


def _remember(cache: dict[bytes, bytes], key: bytes, value: bytes) -> bytes:
    """`value`, kept under `key` when the key is short; a full cache starts over (bounded memory, no eviction
    bookkeeping: the strings that repeat come back at once)."""
    if len(key) <= CACHED_STRING_MAX:
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        cache[key] = value
    return value


# Fields whose values rarely repeat, sent without indexing so they do not push out the ones that do: nghttp2's list
# (its hd_deflate should_indexing), and the request id every request gets anew.
REQUEST_ID: Final = b"x-request-id"
UNINDEXED: Final = frozenset({b":path", b"age", b"content-length", b"etag", b"if-modified-since", b"if-none-match",
                              b"location", b"set-cookie", b"x-request-id"})


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


class Encoder:
    """`hpack.Encoder`'s interface: `encode(headers)`, `header_table_size` (the peer's SETTINGS_HEADER_TABLE_SIZE)."""

    def __init__(self) -> None:
        self.max_size = DEFAULT_TABLE_SIZE
        self.size = 0
        self.inserted = 0  # entries ever added; entry number n has index STATIC_LENGTH + inserted - n
        self.entries: list[tuple[bytes, bytes, int]] = []  # oldest first: (name, value, number)
        self.pairs: dict[tuple[bytes, bytes], int] = {}  # -> the newest entry number holding it
        self.names: dict[bytes, int] = {}
        self.size_changes: list[int] = []

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value != self.max_size:
            self.max_size = value
            self._evict(0)
            self.size_changes.append(value)

    def _evict(self, room: int) -> None:
        entries = self.entries
        while entries and self.size + room > self.max_size:
            name, value, number = entries.pop(0)
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD
            if self.pairs.get((name, value)) == number:
                del self.pairs[(name, value)]
            if self.names.get(name) == number:
                del self.names[name]

    def _add(self, name: bytes, value: bytes) -> None:
        entry_size = len(name) + len(value) + ENTRY_OVERHEAD
        if entry_size > self.max_size:  # RFC 7541 4.4: the table is emptied, nothing added
            self._evict(self.max_size + 1)
            return
        self._evict(entry_size)
        number = self.inserted
        self.inserted = number + 1
        self.entries.append((name, value, number))
        self.size += entry_size
        self.pairs[(name, value)] = number
        self.names[name] = number

    def start_block(self, out: list[bytes]) -> None:
        """A header block's beginning: the table size changes since the last one (RFC 7541 4.2)."""
        if self.size_changes:
            for size in self.size_changes:
                encode_integer(size, 5, 0x20, out)
            self.size_changes = []

    def encode(self, headers: object, huffman: bool = True) -> bytes:
        out: list[bytes] = []
        self.start_block(out)
        items: object = list(headers.items()) if isinstance(headers, dict) else headers
        for header in items:  # type: ignore[attr-defined]
            sensitive = False
            if isinstance(header, HeaderTuple):
                sensitive = not header.indexable
            elif len(header) > 2:
                sensitive = bool(header[2])
            self.add(_as_bytes(header[0]), _as_bytes(header[1]), sensitive, out)
        return b"".join(out)

    def add(self, name: bytes, value: bytes, sensitive: bool, out: list[bytes]) -> None:
        pair = (name, value)
        index = STATIC_PAIRS.get(pair, 0)
        if not index:
            number = self.pairs.get(pair, -1)
            if number >= 0:
                index = STATIC_LENGTH + self.inserted - number
        if index:
            encode_integer(index, 7, 0x80, out)
            return
        name_index = STATIC_NAMES.get(name, 0)
        if not name_index:
            number = self.names.get(name, -1)
            if number >= 0:
                name_index = STATIC_LENGTH + self.inserted - number
        if sensitive:
            encode_integer(name_index, 4, 0x10, out)
        elif name in UNINDEXED:
            encode_integer(name_index, 4, 0, out)  # literal without indexing
        else:
            encode_integer(name_index, 6, 0x40, out)
        if not name_index:
            encode_string(name, out)
        if name == REQUEST_ID:
            out.append(encoded_string(value))  # new each time: kept out of the cache
        else:
            encode_string(value, out)
        if not sensitive and name not in UNINDEXED:
            self._add(name, value)


class Decoder:
    """`hpack.Decoder`'s interface: `decode(block, raw=True)`, `max_header_list_size`, `max_allowed_table_size`,
    `header_table_size`; the same exceptions (h2 turns them into a connection error)."""

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.max_size = DEFAULT_TABLE_SIZE
        self.size = 0
        self.entries: list[tuple[bytes, bytes]] = []  # oldest first
        self.changes = 0  # counts every change to the table: a block that changes nothing decodes alike while equal

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.max_size = value
        self.changes += 1
        self._evict(0)

    def _evict(self, room: int) -> None:
        entries = self.entries
        while entries and self.size + room > self.max_size:
            name, value = entries.pop(0)
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        entry_size = len(name) + len(value) + ENTRY_OVERHEAD
        if entry_size > self.max_size:
            self.entries.clear()
            self.size = 0
            return
        self._evict(entry_size)
        self.entries.append((name, value))
        self.size += entry_size

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= STATIC_LENGTH:
            return STATIC[index - 1]
        position = len(self.entries) - (index - STATIC_LENGTH)
        if index <= 0 or position < 0:
            raise InvalidTableIndexError(f"Invalid table index {index}")
        return self.entries[position]

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        data = bytes(data)
        headers: list[Any] = []  # Any, not a tuple type: mypyc would rebuild a NeverIndexedHeaderTuple as a tuple
        end = len(data)
        position = 0
        inflated = 0
        while position < end:
            first = data[position]
            never = False
            if first & 0x80:
                index, position = decode_integer(data, position, 7)
                header = self._entry(index)
            elif first & 0x40 or not first & 0x20:
                indexing = bool(first & 0x40)
                never = not indexing and bool(first & 0x10)
                index, position = decode_integer(data, position, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, position = decode_string(data, position)
                value, position = decode_string(data, position)
                header = (name, value)
                if indexing:
                    self._add(name, value)
            else:  # dynamic table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, position = decode_integer(data, position, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            inflated += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if inflated > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received")
            if never:  # an intermediary forwards it never indexed too (RFC 7541 7.1.3)
                headers.append(NeverIndexedHeaderTuple(header[0], header[1]))
            else:
                headers.append(header)
        if self.max_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if not raw:
            try:
                return [(name.decode("utf-8"), value.decode("utf-8")) for name, value in headers]
            except UnicodeDecodeError as error:
                raise HPACKDecodingError("Unable to decode headers as UTF-8") from error
        return headers


def decode_integer(data: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at `position` (RFC 7541 5.1) and the position after it."""
    mask = (1 << prefix_bits) - 1
    value = data[position] & mask
    position += 1
    if value < mask:
        return value, position
    shift = 0
    end = len(data)
    while True:
        if position >= end:
            raise HPACKDecodingError("Truncated integer in header block")
        if shift >= 7 * MAX_INTEGER_BYTES:
            raise HPACKDecodingError("Integer too large in header block")
        byte = data[position]
        position += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def decode_string(data: bytes, position: int) -> tuple[bytes, int]:
    if position >= len(data):
        raise HPACKDecodingError("Truncated header block")
    huffman = bool(data[position] & 0x80)
    length, position = decode_integer(data, position, 7)
    end = position + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    text = data[position:end]
    if not huffman:
        return text, end
    decoded = DECODED.get(text)
    if decoded is None:
        decoded = _remember(DECODED, text, huffman_decode(text))
    return decoded, end
