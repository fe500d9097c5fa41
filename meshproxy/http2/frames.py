"""HTTP/2 frames (RFC 9113 section 4 and 6): types, flags, error codes, the bytes of each frame this side sends, and
the rules a received header field list must follow (section 8.2 and 8.3), checked as the `h2` library checks them.

Compiled with mypyc (meshproxy/hot_path.py): the codec (codec.py) calls these per frame and per header.
"""

from __future__ import annotations

from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEAD: Final = 9

DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_MAX_FRAME_SIZE: Final = 16384  # until the peer's SETTINGS says more; what this side accepts, always
MAX_MAX_FRAME_SIZE: Final = (1 << 24) - 1
MAX_WINDOW: Final = (1 << 31) - 1
MAX_STREAM_ID: Final = (1 << 31) - 1
SPEC_WINDOW: Final = 65535  # every window's size before SETTINGS and WINDOW_UPDATE (RFC 9113 6.9.2)

# Connection-specific fields (RFC 9113 8.2.2): refused when received, left out when sent, as h2 does both.
CONNECTION_HEADERS: Final = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                       b"upgrade"})
METHOD: Final = 1
SCHEME: Final = 2
AUTHORITY: Final = 4
PATH: Final = 8
PROTOCOL: Final = 16
STATUS: Final = 32
PSEUDO_BITS: Final = {b":method": METHOD, b":scheme": SCHEME, b":authority": AUTHORITY, b":path": PATH,
                      b":protocol": PROTOCOL, b":status": STATUS}

# What a header list is: field_problem's `kind`.
REQUEST_FIELDS: Final = 0
RESPONSE_FIELDS: Final = 1
TRAILER_FIELDS: Final = 2


_PREFIXES: Final[dict[int, bytes]] = {}  # (length, type, flags) -> a frame head's first five bytes
PREFIXES_MAX: Final = 4096  # then the cache starts over
# The frames of every request, DATA (END_STREAM or not) and HEADERS (END_HEADERS, END_STREAM or not) shorter than
# SHORT_FRAME octets: their prefixes in a list, by (kind, END_STREAM, length). A list item by a native index, where
# the dict's key is a new int object each time (lengths from 1 on put it above the small ints CPython keeps).
SHORT_FRAME: Final = 1024
_SHORT_PREFIXES: Final[list[bytes | None]] = [None] * (4 * SHORT_FRAME)


def frame_prefix(length: int, kind: int, flags: int) -> bytes:
    """A frame head's first five bytes. They repeat (like messages have like sizes), so they are kept: a lookup
    is a third of the instructions of int.to_bytes, compiled (callgrind; Struct.pack is no cheaper)."""
    if kind <= HEADERS and flags & ~END_STREAM == kind * END_HEADERS and length < SHORT_FRAME:
        index = (((kind << 1) | (flags & END_STREAM)) * SHORT_FRAME) + length
        short = _SHORT_PREFIXES[index]
        if short is None:
            short = _SHORT_PREFIXES[index] = ((length << 16) | (kind << 8) | flags).to_bytes(5, "big")
        return short
    key = (length << 16) | (kind << 8) | flags
    prefix = _PREFIXES.get(key)
    if prefix is None:
        prefix = key.to_bytes(5, "big")
        if len(_PREFIXES) >= PREFIXES_MAX:
            _PREFIXES.clear()
        _PREFIXES[key] = prefix
    return prefix


def decimal(value: bytes) -> int:
    """A field value of ASCII digits as an int, -1 when it is anything else. Compiled, a loop over native ints: a
    tenth of `int(bytes)`, a generic call (callgrind)."""
    if len(value) > 18:  # beyond a native int: the slow way
        return int(value) if value.isdigit() else -1
    if not value:
        return -1
    number = 0
    for char in value:
        if char < 0x30 or char > 0x39:
            return -1
        number = number * 10 + (char - 0x30)
    return number


def frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """A whole frame head; a stream's frames use frame_prefix and the stream's own `wire_id` instead."""
    return frame_prefix(length, kind, flags) + u32(stream_id & MAX_STREAM_ID)


def u32(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "big")


def settings_frame(values: list[tuple[int, int]]) -> bytes:
    body = b"".join(bytes((ident >> 8, ident & 0xFF)) + u32(value) for ident, value in values)
    return frame_head(len(body), SETTINGS, 0, 0) + body


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame_head(4, WINDOW_UPDATE, 0, stream_id) + u32(increment)


def rst_stream_frame(stream_id: int, error_code: int) -> bytes:
    return frame_head(4, RST_STREAM, 0, stream_id) + u32(error_code)


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    return frame_head(8, GOAWAY, 0, 0) + u32(last_stream_id) + u32(error_code)


def read_u32(data: bytes, at: int) -> int:
    return (data[at] << 24) | (data[at + 1] << 16) | (data[at + 2] << 8) | data[at + 3]


GOOD_NAMES: Final[set[bytes]] = set()  # names already found valid (they repeat): not checked again
GOOD_NAMES_MAX: Final = 1024  # then the set starts over


def _name_problem(name: bytes) -> str:
    """RFC 9113 8.2.1: no character in 0x00-0x20, 0x41-0x5a (upper case), 0x7f-0xff; a colon only first."""
    if name in GOOD_NAMES:
        return ""
    if not name:
        return "empty header name"
    first = True
    for char in name:
        if char <= 0x20 or 0x41 <= char <= 0x5A or char >= 0x7F or (char == 0x3A and not first):
            return f"illegal character in header name {name!r}"
        first = False
    if len(GOOD_NAMES) >= GOOD_NAMES_MAX:
        GOOD_NAMES.clear()
    GOOD_NAMES.add(name)
    return ""


GOOD_VALUES: Final[set[bytes]] = set()  # short values already found valid (most repeat): one set lookup, not three scans
GOOD_VALUE_MAX_LENGTH: Final = 128
GOOD_VALUES_MAX: Final = 4096  # then the set starts over


def _value_problem(value: bytes) -> str:
    """RFC 9113 8.2.1: no NUL, CR or LF; no whitespace first or last."""
    if not value or value in GOOD_VALUES:
        return ""
    # Each an int: memchr. (A bytes needle would cost a TypeError raised and cleared inside bytes.__contains__.)
    if 0x0A in value or 0x0D in value or 0x00 in value:
        return "illegal character in a header value"
    first, last = value[0], value[-1]
    if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
        return "header value surrounded by whitespace"
    if len(value) <= GOOD_VALUE_MAX_LENGTH:
        if len(GOOD_VALUES) >= GOOD_VALUES_MAX:
            GOOD_VALUES.clear()
        GOOD_VALUES.add(value)
    return ""


def field_problem(headers: list[tuple[bytes, bytes]], kind: int) -> str:
    """What makes a received field list malformed (RFC 9113 8.2, 8.3), "" when nothing: the checks of h2's
    validate_headers (names, values, `te`, connection-specific fields, pseudo-header fields first, once each, the
    ones the message needs and no other, Host and :authority)."""
    seen_regular = False
    pseudo = 0  # PSEUDO_BITS of those seen
    method = b""
    path = b""
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        problem = _name_problem(name)
        if not problem:
            problem = _value_problem(value)
        if problem:
            return problem
        if name[0] == 0x3A:  # ':'
            if seen_regular:
                return f"pseudo-header field {name!r} after a regular field"
            if kind == TRAILER_FIELDS:
                return f"pseudo-header field {name!r} in trailers"
            bit = PSEUDO_BITS.get(name, 0)
            if kind == RESPONSE_FIELDS:
                if bit != STATUS:
                    return f"pseudo-header field {name!r} in a response"
            elif not bit or bit == STATUS:
                return f"pseudo-header field {name!r} in a request"
            if pseudo & bit:
                return f"duplicate pseudo-header field {name!r}"
            pseudo |= bit
            if bit == METHOD:
                method = value
            elif bit == PATH:
                path = value
            elif bit == AUTHORITY:
                authority = value
            continue
        seen_regular = True
        if name in CONNECTION_HEADERS:
            return f"connection-specific header field {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return "te other than trailers"
        if name == b"host" and kind == REQUEST_FIELDS:
            if host is not None:
                return "several host fields"
            host = value
    if kind == RESPONSE_FIELDS:
        return "" if pseudo & STATUS else "no :status"
    if kind == REQUEST_FIELDS:
        if not pseudo & METHOD:
            return "no :method"
        if method == b"CONNECT" and not pseudo & PROTOCOL:
            if pseudo & (SCHEME | PATH):
                return "CONNECT with :scheme or :path"
        else:
            if pseudo & (SCHEME | PATH) != SCHEME | PATH:
                return "no :scheme or :path"
            if not path:
                return "empty :path"
            if pseudo & PROTOCOL and method != b"CONNECT":
                return ":protocol outside CONNECT"
        if authority is None and host is None:
            return "neither :authority nor host"
        if authority is not None and host is not None and authority != host:
            return ":authority and host differ"
    return ""
