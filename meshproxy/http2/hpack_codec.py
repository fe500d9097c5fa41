"""HPACK (RFC 7541), compiled with mypyc: the `hpack` package's Encoder and Decoder, same interface, same errors.

h2 spends most of a small request's time in the pure-Python `hpack` package (a search per header, a bit-level
Huffman decoder, debug logging per header). H2Codec hands h2 these instead (`conn.encoder`, `conn.decoder`);
h2 keeps everything else (frames, states, validation). The tables (static table, Huffman code) are the `hpack`
package's own; what is ours is the code that runs per header:

- Encoder: a header found whole in the static or dynamic table is sent as its index; else a literal with
  incremental indexing (never indexed when the header is a `NeverIndexedHeaderTuple` or a sensitive 3-tuple, as
  h2 marks authorization and short cookies; without indexing for fields whose values rarely repeat, x-request-id
  among them), its name indexed when the name is known, its strings Huffman-coded when that is shorter. Table
  size changes from the peer's SETTINGS go out at the start of the next block. The tables are searched by name,
  then value (`Field`): bytes keys, whose hash the object keeps, and no tuple built per header.
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
# A field as `Pair`, not tuple[bytes, bytes]: mypyc keeps a fixed-size tuple unboxed (a C struct) and boxes it into
# a new tuple object each time it goes into a list; a variable-size tuple type stays the object it is.
Pair = tuple[bytes, ...]
STATIC: Final[tuple[Pair, ...]] = tuple(HeaderTable.STATIC_TABLE)
STATIC_LENGTH: Final = len(STATIC)  # 61


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


def huffman_chunks(data: bytes, chunks: list[bytes]) -> int:
    """`data` Huffman-coded (RFC 7541 5.2, EOS's 1s as padding) into `chunks`; returns its length in octets.

    The bits gather in a native i64 and go out a few octets at a time (one to_bytes for up to 7 octets), so a
    36-character request id costs four or five byte strings, not one per octet."""
    codes, lengths = HUFFMAN_CODES, HUFFMAN_LENGTHS
    buffered: i64 = 0  # the last `count` bits, not yet out
    count: i64 = 0
    size: i64 = 0
    for at in range(len(data)):
        byte = data[at]
        length = i64(lengths[byte])
        if count + length > 63:  # no room (codes are at most 30 bits): out with the whole octets
            rest = count & 7
            chunks.append(int(buffered >> rest).to_bytes(int(count >> 3), "big"))
            size += count >> 3
            buffered &= (i64(1) << rest) - 1
            count = rest
        buffered = (buffered << length) | i64(codes[byte])
        count += length
    pad = -count & 7  # EOS's 1s to the octet's end
    if count + pad > 63:
        rest = count & 7
        chunks.append(int(buffered >> rest).to_bytes(int(count >> 3), "big"))
        size += count >> 3
        buffered &= (i64(1) << rest) - 1
        count = rest
    if count:
        buffered = (buffered << pad) | ((i64(1) << pad) - 1)
        count += pad
        chunks.append(int(buffered).to_bytes(int(count >> 3), "big"))
        size += count >> 3
    return int(size)


def huffman_encode(data: bytes) -> bytes:
    chunks: list[bytes] = []
    huffman_chunks(data, chunks)
    return b"".join(chunks)


# The encoder writes a block as a list of byte strings joined once: list.append is cheap compiled, where each
# bytearray.append is a method call with a boxed int.
SINGLE: Final = tuple(bytes((octet,)) for octet in range(256))
# Strings repeat (header values, names): their encoded form is kept, and Huffman-coded strings' decoded form.
# Final: compiled code reaches them directly, not through the module's globals dict.
CACHED_STRING_MAX: Final = 128  # longer strings are coded each time
CACHE_ENTRIES: Final = 2048  # then the cache starts over
ENCODED: Final[dict[bytes, bytes]] = {}
DECODED: Final[dict[bytes, bytes]] = {}


def encode_prefixed(value: int, limit: int, first: int, out: list[bytes]) -> None:
    """`value` with a prefix of `limit` (2^N - 1 for an N-bit prefix), the first octet's other bits from `first`
    (RFC 7541 5.1). Every octet is one of SINGLE's: nothing allocated."""
    if value < limit:
        out.append(SINGLE[first | value])
        return
    out.append(SINGLE[first | limit])
    value -= limit
    while value >= 128:
        out.append(SINGLE[(value & 0x7F) | 0x80])
        value >>= 7
    out.append(SINGLE[value])


def encode_literal(data: bytes, out: list[bytes]) -> None:
    """A string literal (RFC 7541 5.2) into `out`: Huffman-coded when that is shorter."""
    chunks: list[bytes] = []
    size = huffman_chunks(data, chunks)
    if size < len(data):
        encode_prefixed(size, 0x7F, 0x80, out)
        out.extend(chunks)
    else:
        encode_prefixed(len(data), 0x7F, 0, out)
        out.append(data)


def encoded_string(data: bytes) -> bytes:
    parts: list[bytes] = []
    encode_literal(data, parts)
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


# How a field that is not in a table goes out (Field.literal).
INDEXED: Final = 0  # literal with incremental indexing
UNINDEXED: Final = 1  # literal without indexing, its value through the string cache
FRESH: Final = 2  # literal without indexing, its value coded anew (it never repeats: kept out of the cache)
# Fields whose values rarely repeat, sent without indexing so they do not push out the ones that do: nghttp2's list
# (its hd_deflate should_indexing), and the request id every request gets anew (RFC 7541 6.2.2).
REQUEST_ID: Final = b"x-request-id"
UNINDEXED_NAMES: Final = (b":path", b"age", b"content-length", b"etag", b"if-modified-since", b"if-none-match",
                          b"location", b"set-cookie")


class Field:
    """What an encoder knows of one field name: its static table index (0: not there), how a literal of it goes
    out, its newest dynamic entry (0: none) and how many it has, and its values found in a table: value -> minus
    the static index, or the dynamic entry's number. Keyed by bytes (their hash is kept on the object), so an
    indexed field costs two dict lookups and no tuple; one when its value is the very object last found (values
    repeat as the same object: a decoder's table entries, the string caches, constants)."""

    def __init__(self, static_index: int, literal: int, values: dict[bytes, int], shared: bool) -> None:
        self.static_index = static_index
        self.literal = literal
        self.values = values
        self.newest = 0
        self.count = 0
        self.shared = shared  # STATIC_FIELDS' own (every encoder's): copied before an entry is added
        # The value last found and its code; a dynamic entry's number holds while the entry is in the table.
        # A shared field only ever remembers static codes (the only ones it has), good for every encoder.
        self.last_value: bytes | None = None
        self.last_code = 0

    def copy(self) -> Field:
        return Field(self.static_index, self.literal, dict(self.values), False)


def _static_fields() -> dict[bytes, Field]:
    fields: dict[bytes, Field] = {}
    for index, (name, value) in enumerate(STATIC, start=1):
        field = fields.get(name)
        if field is None:
            field = fields[name] = Field(index, INDEXED, {}, True)
        field.values.setdefault(value, -index)
    for name in UNINDEXED_NAMES:
        fields.setdefault(name, Field(0, UNINDEXED, {}, True)).literal = UNINDEXED
    fields[REQUEST_ID] = Field(0, FRESH, {}, True)
    return fields


STATIC_FIELDS: Final = _static_fields()
NEW_NAME: Final = Field(0, INDEXED, {}, True)  # a name in no table


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


class Encoder:
    """`hpack.Encoder`'s interface: `encode(headers)`, `header_table_size` (the peer's SETTINGS_HEADER_TABLE_SIZE).

    The dynamic table is `entries[oldest:]`, oldest first, numbered on: the newest has number `inserted` (index
    62). Eviction moves `oldest` on; the list is cut when the evicted part is its larger half."""

    def __init__(self) -> None:
        self.max_size = DEFAULT_TABLE_SIZE
        self.size = 0
        self.inserted = 0  # entries ever added: the newest one's number
        self.entries: list[tuple[bytes, bytes]] = []
        self.oldest = 0  # entries[oldest] is the oldest entry still in the table
        # The names seen: STATIC_FIELDS' own field until the name has a dynamic entry, then a copy with them.
        # Bounded: a name goes when its last entry does, and names in no table are not kept.
        self.fields: dict[bytes, Field] = {}
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

    def table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest first (index 62 on)."""
        return self.entries[self.oldest:][::-1]

    def _evict(self, room: int) -> None:
        entries = self.entries
        oldest = self.oldest
        end = len(entries)
        while oldest < end and self.size + room > self.max_size:
            name, value = entries[oldest]
            number = self.inserted - (end - 1 - oldest)
            oldest += 1
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD
            field = self.fields[name]
            if field.values.get(value, 0) == number:
                del field.values[value]
            field.count -= 1
            if not field.count:  # its newest entry went too
                del self.fields[name]  # (a static name comes back as STATIC_FIELDS' at its next use)
        if oldest * 2 > end:
            del entries[:oldest]
            oldest = 0
        self.oldest = oldest

    def _add(self, name: bytes, value: bytes) -> None:
        entry_size = len(name) + len(value) + ENTRY_OVERHEAD
        if entry_size > self.max_size:  # RFC 7541 4.4: the table is emptied, nothing added
            self._evict(self.max_size + 1)
            return
        self._evict(entry_size)
        field = self.fields.get(name)  # after the eviction, which may have dropped it
        if field is None:
            field = STATIC_FIELDS.get(name, NEW_NAME)
        if field.shared:
            field = field.copy()
            self.fields[name] = field
        number = self.inserted + 1
        self.inserted = number
        self.entries.append((name, value))
        self.size += entry_size
        field.values[value] = number
        field.newest = number
        field.count += 1

    def start_block(self, out: list[bytes]) -> None:
        """A header block's beginning: the table size changes since the last one (RFC 7541 4.2)."""
        if self.size_changes:
            for size in self.size_changes:
                encode_prefixed(size, 0x1F, 0x20, out)
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
        field = self.fields.get(name)
        if field is None:
            field = STATIC_FIELDS.get(name)
            if field is None:
                field = NEW_NAME
            else:
                self.fields[name] = field  # one lookup from now on
        last = field.last_code
        # static, or a dynamic entry still in the table (the live ones are numbered above inserted - live count)
        if value is field.last_value and (last < 0 or last > self.inserted - len(self.entries) + self.oldest):
            code = last
        else:
            code = field.values.get(value, 0)
            if code:
                field.last_value = value
                field.last_code = code
        if code:  # the whole field is in a table: its index
            index = -code if code < 0 else STATIC_LENGTH + 1 + self.inserted - code
            if index < 0x7F:
                out.append(SINGLE[0x80 | index])
            else:
                encode_prefixed(index, 0x7F, 0x80, out)
            return
        name_index = field.static_index
        if not name_index and field.newest:
            name_index = STATIC_LENGTH + 1 + self.inserted - field.newest
        literal = field.literal
        if sensitive:
            encode_prefixed(name_index, 0x0F, 0x10, out)  # never indexed (RFC 7541 6.2.3)
        elif literal != INDEXED:
            encode_prefixed(name_index, 0x0F, 0, out)  # without indexing
        else:
            encode_prefixed(name_index, 0x3F, 0x40, out)
        if not name_index:
            encode_string(name, out)
        if literal == FRESH:
            encode_literal(value, out)
        else:
            encode_string(value, out)
        if not sensitive and literal == INDEXED:
            self._add(name, value)


class LastLiteral:
    """A literal field's value octets as they came (length prefix included: it carries the Huffman flag) and the
    field they decoded to."""

    def __init__(self, octets: bytes, header: Pair) -> None:
        self.octets = octets
        self.header = header


class Decoder:
    """`hpack.Decoder`'s interface: `decode(block, raw=True)`, `max_header_list_size`, `max_allowed_table_size`,
    `header_table_size`; the same exceptions (h2 turns them into a connection error).

    The dynamic table is `entries[oldest:]`, oldest first, as in the encoder; an entry is the very tuple the
    decoded list got."""

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.max_size = DEFAULT_TABLE_SIZE
        self.size = 0
        self.entries: list[Pair] = []
        self.oldest = 0
        self.last_literals: dict[int, LastLiteral] = {}  # by static name index (bounded: 61 at most)
        self.changes = 0  # counts every change to the table: a block that changes nothing decodes alike while equal
        # The last block's entries added, counted when it read no dynamic entry (-1 otherwise): such a block
        # decodes alike whatever the table holds, and does to it what `replay(entries)` does.
        self.added = -1

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.max_size = value
        self.changes += 1
        self._evict(0)

    def table(self) -> list[Pair]:
        """The dynamic table, newest first (index 62 on)."""
        return self.entries[self.oldest:][::-1]

    def _evict(self, room: int) -> None:
        entries = self.entries
        oldest = self.oldest
        end = len(entries)
        while oldest < end and self.size + room > self.max_size:
            name, value = entries[oldest]
            oldest += 1
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD
        if oldest * 2 > end:
            del entries[:oldest]
            oldest = 0
        self.oldest = oldest

    def _add(self, header: Pair) -> None:
        self.changes += 1
        entry_size = len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        if entry_size > self.max_size:  # RFC 7541 4.4: the table is emptied, nothing added
            self.entries.clear()
            self.oldest = 0
            self.size = 0
            return
        if self.size + entry_size > self.max_size:
            self._evict(entry_size)
        self.entries.append(header)
        self.size += entry_size

    def replay(self, added: list[Pair]) -> None:
        """What a block that read no dynamic entry does to the table again: `added`, its entries, in order. At once
        when they fit the table together (as they did when the block came): the oldest entries go until they all
        fit, what adding them one by one leaves too."""
        size = 0
        for header in added:
            size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        if size <= self.max_size:
            self.changes += 1
            if self.size + size > self.max_size:
                self._evict(size)
            self.entries.extend(added)
            self.size += size
        else:
            for header in added:
                self._add(header)
        if self.max_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")

    def _entry(self, index: int) -> Pair:
        if 0 < index <= STATIC_LENGTH:
            return STATIC[index - 1]
        position = len(self.entries) - (index - STATIC_LENGTH)
        if index <= 0 or position < self.oldest:
            raise InvalidTableIndexError(f"Invalid table index {index}")
        return self.entries[position]

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        if not isinstance(data, bytes):  # a memoryview or bytearray: bytes() of bytes would cost a call
            data = bytes(data)
        headers: list[Any] = []  # Any, not a tuple type: mypyc would rebuild a NeverIndexedHeaderTuple as a tuple
        end = len(data)
        position = 0
        inflated = 0
        added = 0
        independent = True  # no dynamic entry read, no size update
        while position < end:
            first = data[position]
            never = False
            if first & 0x80:  # indexed (6.1)
                index = first & 0x7F
                if index < 0x7F:
                    position += 1
                else:
                    index, position = decode_integer(data, position, 7)
                if 0 < index <= STATIC_LENGTH:
                    header: Pair = STATIC[index - 1]
                else:
                    header = self._entry(index)
                    independent = False
            elif first & 0x40 or not first & 0x20:  # a literal (6.2)
                indexing = bool(first & 0x40)
                if indexing:
                    index = first & 0x3F
                    if index < 0x3F:
                        position += 1
                    else:
                        index, position = decode_integer(data, position, 6)
                else:
                    never = bool(first & 0x10)
                    index = first & 0x0F
                    if index < 0x0F:
                        position += 1
                    else:
                        index, position = decode_integer(data, position, 4)
                if index <= STATIC_LENGTH and index and position < end and data[position] & 0x80:
                    # A static name and a Huffman-coded value: the same octets as this name's last such value
                    # are the same field (a compare instead of the decoded-string cache's hash and lookup).
                    start = position
                    position = string_bounds(data, position)[1]
                    octets = data[start:position]
                    last = self.last_literals.get(index)
                    if last is not None and octets == last.octets:
                        header = last.header
                    else:
                        header = (STATIC[index - 1][0], decode_string(data, start)[0])
                        if len(octets) <= CACHED_STRING_MAX:  # a peer cannot make a connection keep large ones
                            self.last_literals[index] = LastLiteral(octets, header)
                else:
                    if index <= STATIC_LENGTH and index:
                        name = STATIC[index - 1][0]
                    elif index:
                        name = self._entry(index)[0]
                        independent = False
                    else:
                        name, position = decode_string(data, position)
                    value, position = decode_string(data, position)
                    header = (name, value)
                if indexing:
                    self._add(header)
                    added += 1
            else:  # dynamic table size update (6.3)
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, position = decode_integer(data, position, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                independent = False
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
        # (an entry too large for the table empties it: then fewer than `added` are there, and none is replayed)
        self.added = added if independent and len(self.entries) - self.oldest >= added else -1
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


def string_bounds(data: bytes, position: int) -> tuple[int, int]:
    """Where the octets of the string literal at `position` begin, after its length prefix, and end."""
    if position >= len(data):
        raise HPACKDecodingError("Truncated header block")
    length = data[position] & 0x7F
    if length < 0x7F:
        position += 1
    else:
        length, position = decode_integer(data, position, 7)
    end = position + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    return position, end


def decode_string(data: bytes, position: int) -> tuple[bytes, int]:
    start, end = string_bounds(data, position)
    text = data[start:end]
    if not data[position] & 0x80:  # not Huffman-coded
        return text, end
    decoded = DECODED.get(text)
    if decoded is None:
        decoded = _remember(DECODED, text, huffman_decode(text))
    return decoded, end
