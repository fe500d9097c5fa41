"""Trace context on the wire: B3 (multi and single header), W3C traceparent/tracestate, x-request-id.

Pure functions over bytes (no asyncio, no OpenTelemetry): the data path reads the incoming headers once,
`extract` turns the ones it found into an `Incoming` context, and `inject` writes the outgoing headers of
this proxy's own span. Randomness is passed in.

What is read (the B3 and W3C specs, Envoy's Zipkin extractor where they leave room):
- `b3` (single header) takes precedence over the `x-b3-*` headers, which take precedence over `traceparent`
  (Envoy's Zipkin tracer with W3C fallback). The first value of a header wins.
- B3 trace ids are 16 or 32 hex digits, span ids 16; upper case is accepted and written back in lower case.
  An all-zero id is invalid. A bad span id keeps a valid trace id (this span then has no remote parent); a
  bad trace id starts a new trace. A bad sampling field is ignored (the decision is made here). A `b3` value
  that is neither a sampling state alone nor `trace-span[-state[-parent]]` is ignored as a whole.
- `x-b3-sampled`: `1`/`true` accept, `0`/`false` deny; `x-b3-flags: 1` and `b3` state `d` mean debug
  (accept, always). Absent: this proxy decides.
- `traceparent` strictly as W3C: `version-traceid-parentid-flags`, lower-case hex, version `ff` invalid,
  version `00` exactly 55 characters, later versions parsed by their first four fields; any fault ignores
  the header (and `tracestate` with it). Flag bit 0x01 is the sampling decision.
- `tracestate` is passed on unchanged when the trace continues from that `traceparent`'s trace id.

What is written for every request (Envoy's `shared_span_context: false`: each proxy hop is its own span,
child of the incoming one): `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid` (when there is a parent),
`x-b3-sampled: 1|0` or, for debug, `x-b3-flags: 1` alone (the B3 spec: debug implies accept); `b3` when the
request came with one; `traceparent` (64-bit trace ids left-padded to 128 bits) and `tracestate`.
The trace id keeps its incoming width in B3 headers.
"""

from __future__ import annotations

from binascii import hexlify
from collections.abc import Callable, Iterable
from typing import Final

TRACE_ID: Final = b"x-b3-traceid"
SPAN_ID: Final = b"x-b3-spanid"
PARENT_SPAN_ID: Final = b"x-b3-parentspanid"
SAMPLED: Final = b"x-b3-sampled"
FLAGS: Final = b"x-b3-flags"
B3: Final = b"b3"
TRACEPARENT: Final = b"traceparent"
TRACESTATE: Final = b"tracestate"
REQUEST_ID: Final = b"x-request-id"

# Every trace header this proxy rewrites: none of them is forwarded as received.
TRACE_HEADERS: Final = frozenset({TRACE_ID, SPAN_ID, PARENT_SPAN_ID, SAMPLED, FLAGS, B3, TRACEPARENT, TRACESTATE})

HEX_DIGITS: Final = b"0123456789abcdef"
ZERO_PAD: Final = b"0" * 16
ACCEPT: Final = frozenset({b"1", b"true"})
DENY: Final = frozenset({b"0", b"false"})
TRACESTATE_MAX: Final = 8192  # longer values are dropped rather than forwarded (W3C: propagate at least 512)


class Incoming:
    """What the request brought: a trace to continue (or not) and a sampling decision (or not)."""

    __slots__ = ("trace_id", "parent_id", "sampled", "debug", "tracestate", "b3_single")

    def __init__(self, trace_id: bytes | None = None, parent_id: bytes | None = None, sampled: bool | None = None,
                 debug: bool = False, tracestate: bytes | None = None, b3_single: bool = False) -> None:
        self.trace_id = trace_id  # lower hex, 16 or 32 digits; None: start a new trace
        self.parent_id = parent_id  # the caller's span id, lower hex 16; None: no remote parent
        self.sampled = sampled  # None: no decision came with the request
        self.debug = debug
        self.tracestate = tracestate
        self.b3_single = b3_single  # the request used the single `b3` header: write it back in that form

    def __repr__(self) -> str:
        return (f"Incoming(trace_id={self.trace_id!r}, parent_id={self.parent_id!r}, sampled={self.sampled!r}, "
                f"debug={self.debug!r}, tracestate={self.tracestate!r}, b3_single={self.b3_single!r})")


def first_values(headers: Iterable[tuple[bytes, bytes]], names: frozenset[bytes] = TRACE_HEADERS | {REQUEST_ID},
                 ) -> dict[bytes, bytes]:
    """The first value of each watched header (names lower-case), as the data path collects them."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in names and name not in found:
            found[name] = value
    return found


def _hex_id(value: bytes | None, long: bool) -> bytes | None:
    """A B3 id: 16 (or, with `long`, 32) hex digits, not all zero; lower-cased. None when malformed."""
    if value is None:
        return None
    value = value.strip().lower()
    if not (len(value) == 16 or (long and len(value) == 32)):
        return None
    if value.strip(HEX_DIGITS) or not value.strip(b"0"):
        return None
    return value


def _w3c_hex(value: bytes, length: int) -> bool:
    return len(value) == length and not value.strip(HEX_DIGITS)


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """`version-traceid-parentid-flags` -> (trace id, parent id, sampled), or None when invalid."""
    value = value.strip(b" \t")
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if not _w3c_hex(version, 2) or version == b"ff":
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_w3c_hex(trace_id, 32) and _w3c_hex(parent_id, 16) and _w3c_hex(flags, 2)):
        return None
    if not trace_id.strip(b"0") or not parent_id.strip(b"0"):
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def parse_b3_single(value: bytes) -> tuple[bytes | None, bytes | None, bool | None, bool] | None:
    """`b3` -> (trace id, span id, sampled, debug); None when the header is malformed as a whole."""
    value = value.strip().lower()
    if len(value) == 1:
        return _b3_state(value)
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace_id = _hex_id(parts[0], long=True)
    if trace_id is None:
        return None
    span_id = _hex_id(parts[1], long=False)  # a bad span id keeps the trace id
    if len(parts) >= 3:
        _, _, sampled, debug = _b3_state(parts[2]) or (None, None, None, False)  # bad state: decide here
    else:
        sampled, debug = None, False
    return trace_id, span_id, sampled, debug


def _b3_state(value: bytes) -> tuple[None, None, bool | None, bool] | None:
    if value == b"1":
        return None, None, True, False
    if value == b"0":
        return None, None, False, False
    if value == b"d":
        return None, None, True, True
    return None


def extract(found: dict[bytes, bytes]) -> Incoming:
    """The incoming context from the first values of the trace headers; never raises."""
    get = found.get
    incoming = Incoming()
    single = get(B3)
    if single is not None:
        parsed = parse_b3_single(single)
        if parsed is not None:
            trace_id, span_id, sampled, debug = parsed
            incoming.trace_id = trace_id
            incoming.parent_id = span_id if trace_id is not None else None
            incoming.sampled, incoming.debug = sampled, debug
            incoming.b3_single = True
    if incoming.trace_id is None:
        trace_id = _hex_id(get(TRACE_ID), long=True)
        if trace_id is not None:
            incoming.trace_id = trace_id
            incoming.parent_id = _hex_id(get(SPAN_ID), long=False)
    if incoming.sampled is None:
        flags = get(FLAGS)
        if flags is not None and flags.strip() == b"1":
            incoming.sampled, incoming.debug = True, True
        else:
            sampled_value = get(SAMPLED)
            if sampled_value is not None:
                sampled_value = sampled_value.strip().lower()
                if sampled_value in ACCEPT:
                    incoming.sampled = True
                elif sampled_value in DENY:
                    incoming.sampled = False
    parent = get(TRACEPARENT)
    if parent is not None:
        parsed_w3c = parse_traceparent(parent)
        if parsed_w3c is not None:
            trace_id, parent_id, sampled = parsed_w3c
            if incoming.trace_id is None:
                incoming.trace_id, incoming.parent_id = trace_id, parent_id
                if incoming.sampled is None:
                    incoming.sampled = sampled
            if widen(incoming.trace_id) == trace_id:
                state = get(TRACESTATE)
                if state is not None and 0 < len(state) <= TRACESTATE_MAX:
                    incoming.tracestate = state
    return incoming


def widen(trace_id: bytes) -> bytes:
    """A trace id as W3C writes it: 32 hex digits (64-bit B3 ids left-padded with zeros)."""
    return trace_id if len(trace_id) == 32 else ZERO_PAD + trace_id


def new_trace_id(randbits: Callable[[int], int]) -> bytes:
    return (randbits(128) or 1).to_bytes(16, "big").hex().encode()


def new_span_id(randbits: Callable[[int], int]) -> bytes:
    return (randbits(64) or 1).to_bytes(8, "big").hex().encode()


REQUEST_IDS_PER_DRAW: Final = 64
UUID_LENGTH: Final = 36
UUID_DASHES: Final = (8, 13, 18, 23)  # the 8-4-4-4-12 form's
UUID_VERSION: Final = 14  # its `4`
UUID_VARIANT: Final = 19  # 8, 9, a or b: two random bits (RFC 4122)
_VARIANT: Final = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")


class RequestIds:
    """RFC 4122 version-4 UUIDs (Envoy's x-request-id), 64 from each random draw, each id one slice of their
    texts (Envoy's generator also buffers its randomness)."""

    __slots__ = ("randbits", "texts", "at")

    def __init__(self, randbits: Callable[[int], int]) -> None:
        self.randbits = randbits
        self.texts = b""
        self.at = 0

    def next(self) -> bytes:
        at = self.at
        if at >= len(self.texts):
            self.texts = uuid_texts(self.randbits(4 * UUID_LENGTH * REQUEST_IDS_PER_DRAW), REQUEST_IDS_PER_DRAW)
            at = 0
        self.at = at + UUID_LENGTH
        return self.texts[at:at + UUID_LENGTH]


def uuid_texts(bits: int, count: int) -> bytes:
    """`count` version-4 UUIDs' texts, one after the other, from `count` x 144 random bits: 36 random hex digits
    each, then the dashes, the version and the variant written over their columns (a handful of strided
    copies for them all, not a formatting per id; 122 random bits are left in each, as RFC 4122 has it)."""
    texts = bytearray(hexlify(bits.to_bytes(UUID_LENGTH * count // 2, "big")))
    for place in UUID_DASHES:
        texts[place::UUID_LENGTH] = b"-" * count
    texts[UUID_VERSION::UUID_LENGTH] = b"4" * count
    texts[UUID_VARIANT::UUID_LENGTH] = bytes(texts[UUID_VARIANT::UUID_LENGTH]).translate(_VARIANT)
    return bytes(texts)


def uuid_text(h: bytes) -> bytes:
    """32 hex digits -> the 8-4-4-4-12 form (a literal %-format of slices: compiled, one allocation for the result)."""
    return b"%b-%b-%b-%b-%b" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:32])


def request_id_dice(request_id: bytes) -> int | None:
    """Envoy's UUID request-id extension: the first 8 hex digits mod 10000, so every proxy of a request
    rolls the same number; None when the id does not start with 8 hex digits."""
    head = request_id[:8]
    if len(head) != 8 or head.lower().strip(HEX_DIGITS):
        return None
    return int(head, 16) % 10000


def inject(out: list[tuple[bytes, bytes]], trace_id: bytes, span_id: bytes, parent_id: bytes | None,
           sampled: bool, debug: bool, tracestate: bytes | None, b3_single: bool) -> None:
    """Append this hop's trace headers to `out`."""
    out.append((TRACE_ID, trace_id))
    out.append((SPAN_ID, span_id))
    if parent_id is not None:
        out.append((PARENT_SPAN_ID, parent_id))
    if debug:
        out.append((FLAGS, b"1"))
    else:
        out.append((SAMPLED, b"1" if sampled else b"0"))
    if b3_single:
        state = b"d" if debug else b"1" if sampled else b"0"
        out.append((B3, b"-".join((trace_id, span_id, state, parent_id) if parent_id else (trace_id, span_id, state))))
    out.append((TRACEPARENT, b"00-" + widen(trace_id) + b"-" + span_id + (b"-01" if sampled else b"-00")))
    if tracestate is not None:
        out.append((TRACESTATE, tracestate))
