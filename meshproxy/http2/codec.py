"""The HTTP/2 codec, sans-IO, compiled with mypyc: bytes in, per-stream events out; per-stream sends out as bytes.

`H2Codec` is one connection, either side. `feed(data)` reads the peer's frames (frames.py) and reports what they
mean: on a server, each new stream as `ConnectionEvents.on_request(stream, head, end_stream)` with a validated
`RequestHead` (http2/head.py), then the stream's own `StreamEvents` (body chunks, trailers, the end, a reset); on a
client, the response head, body, trailers and end of each stream it opened. `data_to_send()` is what to write.
HPACK is hpack_codec.py. The `h2` library did all of this before; its state machine and per-header generators cost
most of a small request's time (benchmarks/README.md, "HTTP/2 and gRPC"), so the frame layer is ours, checked against h2 as
the peer (tests/unit/test_http2_codec.py, test_http2_frames.py) and curl, h2load, grpcio, hypercorn
(tests/integration/test_http2_*.py, test_grpc.py).

What the peer must respect, or the connection ends with a GOAWAY naming its error (RFC 9113): the preface, a
SETTINGS first; frame sizes (FRAME_SIZE_ERROR); the stream ids and states (PROTOCOL_ERROR, STREAM_CLOSED on a
half-closed stream as a stream error); header blocks as one HEADERS and its CONTINUATIONs with nothing between;
padding; HPACK (COMPRESSION_ERROR); header fields as h2 validates them (frames.field_problem: PROTOCOL_ERROR);
windows both ways (FLOW_CONTROL_ERROR). PRIORITY is read and ignored; PUSH_PROMISE is refused (push is off); a
stream beyond our SETTINGS_MAX_CONCURRENT_STREAMS is refused with REFUSED_STREAM; a request whose DATA does not
add up to its content-length is reset with PROTOCOL_ERROR before any byte too many is passed on (RFC 9113 8.1.1).

Flow control, per stream, both ways (Envoy's SETTINGS: 1024 concurrent streams, 16 MiB stream windows, a 24 MiB
connection window):
- Received data is credited back as soon as it is delivered, unless the stream's consumer paused it (`pause`): then
  the credit is held until `resume`, so a slow consumer stops its own sender after one stream window, and the
  others go on. Credit goes out in a WINDOW_UPDATE once half a window has gathered (not one per DATA frame), or
  as soon as the window is shut (paused streams may hold most of the connection's: the others must go on), as h2's
  window manager does.
- Sent data waits in the stream's queue until the peer's stream and connection windows let it go, in frames of the
  peer's maximum size; nothing is buffered whole. Above SEND_HIGH_WATER queued bytes the stream hears
  `on_write_blocked` (its producer should pause), below SEND_LOW_WATER `on_writable`. While the transport's own
  buffer is full (`pause_writing`), nothing more is framed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

from hpack.exceptions import HPACKError, OversizedHeaderListError
from mypy_extensions import trait

from ..http1.errors import ProtocolError
from ..http1.head import DEFAULT_POLICY, HeadPolicy
from ..messages import HeaderBlock, RequestHead
from .frames import (
    ACK,
    COMPRESSION_ERROR,
    CONNECTION_HEADERS,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_HEAD,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_MAX_FRAME_SIZE,
    MAX_WINDOW,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    REQUEST_FIELDS,
    RESPONSE_FIELDS,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    STREAM_CLOSED,
    TRAILER_FIELDS,
    WINDOW_UPDATE,
    decimal,
    field_problem,
    frame_head,
    frame_prefix,
    goaway_frame,
    read_u32,
    rst_stream_frame,
    settings_frame,
    u32,
    window_update_frame,
)
from .frames import PREFACE as PREFACE
from .frames import SPEC_WINDOW as SPEC_WINDOW
from .head import build_request_head
from .hpack_codec import DEFAULT_TABLE_SIZE, Decoder, Encoder, Pair

MAX_CONCURRENT_STREAMS: Final = 1024  # Envoy's http2_protocol_options defaults
INITIAL_STREAM_WINDOW: Final = 16 * 1024 * 1024
INITIAL_CONNECTION_WINDOW: Final = 24 * 1024 * 1024
SEND_HIGH_WATER: Final = 256 * 1024  # queued bytes of one stream above which its producer is paused
SEND_LOW_WATER: Final = 64 * 1024
MAX_HEADER_LIST_SIZE: Final = 1 << 16  # decoded; what h2 allowed (the head policy's own limits are lower)
MAX_HEADER_BLOCK: Final = 1 << 17  # encoded, HEADERS and CONTINUATIONs together: beyond it, ENHANCE_YOUR_CALM
# Floods, bounded as Envoy bounds them (its http2_protocol_options defaults): answers to the peer's frames (PING and
# SETTINGS acks, RST_STREAM) queued while the transport's buffer is full (a peer that sends and never reads) end the
# connection past max_outbound_control_frames; and a peer that resets at least half of its streams before their
# response ends, once it opened premature_reset_total_stream_count of them (HTTP/2 rapid reset, CVE-2023-44487).
MAX_QUEUED_CONTROL_FRAMES: Final = 1000
PREMATURE_RESET_STREAMS: Final = 500

# What _add_fields does with a field by its (lower-case) name: one dict lookup per field, its hash kept by the name.
FORWARD: Final = 0
LEAVE_OUT: Final = 1  # connection-specific (RFC 9113 8.2.2)
TE_FIELD: Final = 2  # sent only as `trailers`
DATE_FIELD: Final = 3  # noted: the response then gets no `date` of the proxy's
CREDENTIALS: Final = 4  # never indexed (RFC 7541 7.1.3), as h2 sends them
COOKIE: Final = 5  # never indexed when short (under 20 octets: h2's rule)
NAME_KINDS: Final[dict[bytes, int]] = {
    **{name: LEAVE_OUT for name in CONNECTION_HEADERS}, b"te": TE_FIELD, b"date": DATE_FIELD,
    b"authorization": CREDENTIALS, b"proxy-authorization": CREDENTIALS, b"cookie": COOKIE}
NAME_KINDS_MAX: Final = 1024  # names sent found lower-case are added as FORWARD up to this many (values never)
KNOWN_BLOCKS_MAX: Final = 16  # header blocks kept per connection (_decode), then the cache starts over
KNOWN_BLOCK_MAX_SIZE: Final = 512  # octets: a larger block is decoded each time (and costs no memory kept)
TE: Final = b"te"
TRAILERS: Final = b"trailers"
DATE: Final = b"date"
NO_NAMES: Final[frozenset[bytes]] = frozenset()

NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
REFUSED_STREAM: Final = 7
CANCEL: Final = 8


class H2Error(Exception):
    """The peer broke the protocol: the connection is over (a GOAWAY is queued in data_to_send)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class H2Settings:
    """What this side announces (Envoy's defaults unless a DestinationRule says otherwise)."""

    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    initial_stream_window: int = INITIAL_STREAM_WINDOW
    connection_window: int = INITIAL_CONNECTION_WINDOW


DEFAULT_SETTINGS: Final = H2Settings()


@trait
class StreamEvents:
    """One stream's events, as its codec reports them; the sender's flow control signals too."""

    __slots__ = ()

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        raise NotImplementedError  # client side only

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError  # the end of the stream follows (on_end is not called after trailers)

    def on_end(self) -> None:
        raise NotImplementedError

    def on_reset(self, error_code: int, remote: bool) -> None:
        """RST_STREAM from the peer (`remote`), or the connection went away under the stream."""
        raise NotImplementedError

    def on_write_blocked(self) -> None:
        raise NotImplementedError

    def on_writable(self) -> None:
        raise NotImplementedError


@trait
class ConnectionEvents:
    """What concerns the connection rather than one stream."""

    __slots__ = ()

    def on_request(self, stream: H2Stream, head: RequestHead, end_stream: bool) -> None:
        raise NotImplementedError  # server side only; sets stream.events

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        raise NotImplementedError

    def on_capacity(self, max_streams: int) -> None:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (a client pool's limit per connection)."""
        raise NotImplementedError


class H2Stream:
    """One stream's state in the codec: who hears it, what waits to be sent, the windows both ways."""

    __slots__ = ("id", "events", "out", "offset", "out_size", "end_queued", "trailers", "out_done", "in_done",
                 "unacked", "paused", "blocked", "closed", "send_window", "recv_window", "credit", "head_done",
                 "expected", "received", "wire_id")

    def __init__(self, stream_id: int, send_window: int = SPEC_WINDOW, recv_window: int = SPEC_WINDOW) -> None:
        self.id = stream_id
        self.wire_id = u32(stream_id)  # the last four bytes of each of its frames' heads
        self.events: StreamEvents | None = None
        # body chunks not yet framed (the first from `offset`); made when a chunk must wait (most never do)
        self.out: deque[bytes] | None = None
        self.offset = 0
        self.out_size = 0
        self.end_queued = False  # the sender ended the stream: END_STREAM goes after the queue
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent after the queue, with END_STREAM
        self.out_done = False  # END_STREAM sent
        self.in_done = False  # END_STREAM received
        self.unacked = 0  # received bytes whose credit is held (the consumer paused the stream)
        self.paused = False
        self.blocked = False  # on_write_blocked reported, on_writable not yet
        self.closed = False  # reset, or both sides ended: forgotten by the codec
        self.send_window = send_window  # what the peer lets this side send on the stream
        self.recv_window = recv_window  # what the peer may still send on it before a WINDOW_UPDATE
        self.credit = 0  # received and delivered, not yet handed back in a WINDOW_UPDATE
        self.head_done = False  # client side: the final response head arrived (what follows is trailers)
        self.expected = -1  # the peer's content-length (-1: none): its DATA must add up to it (RFC 9113 8.1.1)
        self.received = 0


class KnownBlock:
    """A header block decoded before: its fields, how they hold again, the kinds they were valid as."""

    __slots__ = ("fields", "changes", "added", "valid")

    def __init__(self, fields: list[tuple[bytes, bytes]], changes: int, added: list[Pair] | None) -> None:
        self.fields = fields
        # A block that read no dynamic entry holds whatever the table: `added`, the entries it adds, go in again.
        # Else it holds while the table is as it was: the decoder's `changes` then (the block changed nothing).
        self.added = added
        self.changes = changes
        self.valid = 0  # bit 1 << kind (REQUEST_FIELDS...): field_problem found nothing for that kind


class H2Codec:
    """One HTTP/2 connection (see the module docstring). Calls `handler` for connection events and each stream's
    `events` for its own."""

    __slots__ = ("handler", "client", "streams", "write_paused", "policy", "goaway_sent", "last_stream_id",
                 "settings", "pending_out", "out", "inbuf", "encoder", "decoder", "preface_left", "settings_seen",
                 "failed", "next_stream_id", "send_window", "recv_window", "conn_credit", "peer_initial_window",
                 "recv_initial_window", "settings_acked", "peer_max_frame", "block_stream", "block_end_stream",
                 "block_parts", "block_size", "control_queued", "streams_opened", "premature_resets",
                 "known_blocks", "current")

    def __init__(self, client: bool, handler: ConnectionEvents, settings: H2Settings = DEFAULT_SETTINGS,
                 policy: HeadPolicy = DEFAULT_POLICY) -> None:
        self.handler = handler
        self.client = client
        self.settings = settings
        self.policy = policy
        self.streams: dict[int, H2Stream] = {}
        self.write_paused = False
        self.goaway_sent = False
        self.last_stream_id = 0  # the highest stream the peer opened (server side), for GOAWAY
        self.pending_out = b""  # a graceful GOAWAY, written after the frames queued before it
        self.out: list[bytes] = []
        self.inbuf = b""
        self.encoder = Encoder()
        self.decoder = Decoder(MAX_HEADER_LIST_SIZE)
        self.decoder.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.preface_left = 0 if client else len(PREFACE)
        self.settings_seen = False  # the peer's first frame must be SETTINGS (RFC 9113 3.4)
        self.failed = False
        self.next_stream_id = 1
        self.send_window = SPEC_WINDOW  # the connection's, toward the peer
        self.recv_window = SPEC_WINDOW  # the connection's, from the peer
        self.conn_credit = 0
        self.peer_initial_window = SPEC_WINDOW
        # New streams' receive window: until the peer acknowledges our SETTINGS it may still count from 65,535
        self.recv_initial_window = max(SPEC_WINDOW, settings.initial_stream_window)
        self.settings_acked = False
        self.peer_max_frame = DEFAULT_MAX_FRAME_SIZE
        self.block_stream = 0  # a header block in progress: the stream whose CONTINUATIONs must follow
        self.block_end_stream = False
        self.block_parts: list[bytes] = []
        self.block_size = 0
        self.control_queued = 0  # answers queued while the transport is paused (see MAX_QUEUED_CONTROL_FRAMES)
        self.streams_opened = 0  # by the peer (server side), and how many of them it reset before their end
        self.premature_resets = 0
        self.known_blocks: dict[bytes, KnownBlock] = {}  # see _decode
        self.current: KnownBlock | None = None  # the kept block the fields being handled came from

    def initiate(self) -> None:
        """The connection preface (a client's magic, both sides' SETTINGS) and the connection window."""
        if self.client:
            self.out.append(PREFACE)
        self.out.append(settings_frame([
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_MAX_CONCURRENT_STREAMS, self.settings.max_concurrent_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, self.settings.initial_stream_window),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
        ]))
        if self.settings.connection_window > SPEC_WINDOW:
            self.out.append(window_update_frame(0, self.settings.connection_window - SPEC_WINDOW))
            self.recv_window = self.settings.connection_window

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            data = b""
        elif len(out) == 1:
            data = out[0]
            out.clear()
        else:
            data = b"".join(out)
            out.clear()
        if self.pending_out:
            data, self.pending_out = data + self.pending_out, b""
        return data

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # ---- bytes in

    def feed(self, data: bytes) -> None:
        """The peer's bytes: report their events; raises H2Error when the connection must end."""
        if self.failed:
            return
        buffer = self.inbuf + data if self.inbuf else data
        position = 0
        end = len(buffer)
        if self.preface_left:
            start = len(PREFACE) - self.preface_left
            taken = min(self.preface_left, end)
            if buffer[:taken] != PREFACE[start:start + taken]:
                self.inbuf = b""
                self._fail(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
            self.preface_left -= taken
            position = taken
        max_frame = DEFAULT_MAX_FRAME_SIZE
        while end - position >= FRAME_HEAD:
            length = (buffer[position] << 16) | (buffer[position + 1] << 8) | buffer[position + 2]
            if length > max_frame:
                self.inbuf = b""
                self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if end - position - FRAME_HEAD < length:
                break
            kind = buffer[position + 3]
            flags = buffer[position + 4]
            stream_id = read_u32(buffer, position + 5) & MAX_WINDOW
            start = position + FRAME_HEAD
            position = start + length
            payload = buffer[start:position]
            try:
                self._frame(kind, flags, stream_id, payload)
            except H2Error:
                self.inbuf = b""
                raise
            if self.failed:
                return
        self.inbuf = buffer[position:] if position < end else b""

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.block_stream and kind != CONTINUATION:
            self._fail(PROTOCOL_ERROR, "a frame inside a header block")
        if not self.settings_seen:
            if kind != SETTINGS or flags & ACK:
                self._fail(PROTOCOL_ERROR, "the preface's SETTINGS missing")
            self.settings_seen = True
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif kind == PING:
            if stream_id:
                self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                self._fail(FRAME_SIZE_ERROR, "PING not 8 bytes")
            if not flags & ACK:
                self._answer(frame_head(8, PING, ACK, 0) + payload)
        elif kind == GOAWAY:
            if stream_id:
                self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                self._fail(FRAME_SIZE_ERROR, "GOAWAY under 8 bytes")
            self.handler.on_goaway(read_u32(payload, 0) & MAX_WINDOW, read_u32(payload, 4))
        elif kind == PRIORITY:
            if not stream_id:
                self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:  # a stream error (RFC 9113 6.3); otherwise ignored (RFC 9113 5.3.2)
                self._stream_error(stream_id, FRAME_SIZE_ERROR)
        elif kind == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "PUSH_PROMISE, push is disabled")
        # other types: ignored (RFC 9113 5.5)

    def _answer(self, frame: bytes) -> None:
        """Queue a frame that answers the peer's: bounded while the peer does not read (see MAX_QUEUED_...)."""
        self.out.append(frame)
        if self.write_paused:
            self.control_queued += 1
            if self.control_queued > MAX_QUEUED_CONTROL_FRAMES:
                self._fail(ENHANCE_YOUR_CALM, "too many frames queued for a peer that does not read (flood)")

    def _fail(self, error_code: int, detail: str) -> NoReturn:
        """A connection error: GOAWAY with its code, and nothing more is read."""
        self.failed = True
        if not self.goaway_sent:
            self.goaway_sent = True
            self.out.append(goaway_frame(self.last_stream_id, error_code))
        raise H2Error(f"http2.protocol_error: {detail}")

    def _idle(self, stream_id: int) -> bool:
        """Never opened: above what the peer opened (server) or what this side opened (client)."""
        if stream_id % 2 == 0:
            return True  # no side opens even streams: there is no push
        return stream_id >= self.next_stream_id if self.client else stream_id > self.last_stream_id

    def _stream_error(self, stream_id: int, error_code: int) -> None:
        self._answer(rst_stream_frame(stream_id, error_code))
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.closed:
            stream.closed = True
            stream.out = None
            if stream.events is not None:
                stream.events.on_reset(error_code, False)

    # ---- DATA and flow control of what is received

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding counts against the windows too
        body = payload
        if flags & PADDED:
            if not size or payload[0] >= size:
                self._fail(PROTOCOL_ERROR, "padding longer than the frame")
            body = payload[1:size - payload[0]]
        if size > self.recv_window:
            self._fail(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= size
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                self._fail(PROTOCOL_ERROR, "DATA on an idle stream")
            self._credit_connection(size)  # a stream this side closed or reset: dropped, its credit returned
            return
        if stream.in_done or (self.client and not stream.head_done):
            self._credit_connection(size)
            self._stream_error(stream_id, STREAM_CLOSED if stream.in_done else PROTOCOL_ERROR)
            return
        if size > stream.recv_window:
            self._fail(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        stream.recv_window -= size
        end = bool(flags & END_STREAM)
        if stream.expected >= 0:
            stream.received += len(body)
            if stream.received > stream.expected or (end and not self._length_complete(stream)):
                self._credit_connection(size)
                self._stream_error(stream_id, PROTOCOL_ERROR)  # malformed: never passed on short or long
                return
        if stream.paused:
            stream.unacked += size
        elif size:
            self._credit(stream, size, end)
        if body and stream.events is not None:
            stream.events.on_data(body)
        if end and not stream.closed:  # (not reset meanwhile by the consumer)
            stream.in_done = True
            self._maybe_forget(stream)
            if stream.events is not None:
                stream.events.on_end()

    def _length_complete(self, stream: H2Stream) -> bool:
        """At the end of a stream: its DATA added up to its content-length. A request's must; a response's may be
        shorter (a response to HEAD, a 304), as h2 allows."""
        return stream.received == stream.expected or self.client

    def _credit_connection(self, size: int) -> None:
        if not size:
            return
        self.conn_credit += size
        if self.conn_credit >= self.settings.connection_window >> 1 or (
                self.recv_window <= 0 and self.conn_credit > min(1024, self.settings.connection_window >> 2)):
            self.out.append(window_update_frame(0, self.conn_credit))
            self.recv_window += self.conn_credit
            self.conn_credit = 0

    def _credit(self, stream: H2Stream, size: int, ending: bool) -> None:
        """Delivered bytes: their credit back to the peer, in WINDOW_UPDATEs of at least half a window."""
        self._credit_connection(size)
        if ending or stream.in_done or stream.closed:
            return
        stream.credit += size
        if stream.credit >= self.settings.initial_stream_window >> 1 or (
                stream.recv_window <= 0 and stream.credit > min(1024, self.settings.initial_stream_window >> 2)):
            self.out.append(window_update_frame(stream.id, stream.credit))
            stream.recv_window += stream.credit
            stream.credit = 0

    # ---- header blocks

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & PADDED:
            if not end:
                self._fail(PROTOCOL_ERROR, "padding longer than the frame")
            end -= payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            self._fail(PROTOCOL_ERROR, "padding longer than the frame")
        block = payload[start:end]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, bool(flags & END_STREAM), block)
            return
        self.block_stream = stream_id
        self.block_end_stream = bool(flags & END_STREAM)
        self.block_parts = [block]
        self.block_size = len(block)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not self.block_stream or stream_id != self.block_stream:
            self._fail(PROTOCOL_ERROR, "CONTINUATION outside a header block")
        self.block_parts.append(payload)
        self.block_size += len(payload)
        if self.block_size > MAX_HEADER_BLOCK:
            self._fail(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block = b"".join(self.block_parts)
            self.block_stream = 0
            self.block_parts = []
            self._on_header_block(stream_id, self.block_end_stream, block)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's fields. A peer repeats its blocks (the same call again), so they are kept, by the block's
        octets, with the checks they passed, and most blocks cost one lookup, not a decoding and a validation:
        - a block that read no dynamic entry (static indexes and literals: nginx's way) decodes to the same
          fields whatever the table holds; the entries it added go in again;
        - any other block that left the table as it was (every field indexed, or literals not added to it)
          decodes alike while the table has not changed since.
        Never mutated by the caller."""
        decoder = self.decoder
        changes = decoder.changes
        known = self.known_blocks.get(block)
        if known is not None:
            added = known.added
            if added is not None:
                if added:
                    try:
                        decoder.replay(added)
                    except HPACKError as error:
                        self._fail(COMPRESSION_ERROR, f"HPACK: {error}")
                self.current = known
                return known.fields
            if known.changes == changes:
                self.current = known
                return known.fields
        try:
            headers: list[tuple[bytes, bytes]] = decoder.decode(block, True)
        except OversizedHeaderListError:
            self._fail(ENHANCE_YOUR_CALM, "header list too large")
        except HPACKError as error:
            self._fail(COMPRESSION_ERROR, f"HPACK: {error}")
        kept: KnownBlock | None = None
        if len(block) <= KNOWN_BLOCK_MAX_SIZE:
            count = decoder.added
            if count >= 0:
                entries = decoder.entries
                kept = KnownBlock(headers, changes, entries[len(entries) - count:])
            elif decoder.changes == changes:
                kept = KnownBlock(headers, changes, None)
            if kept is not None:
                if len(self.known_blocks) >= KNOWN_BLOCKS_MAX:
                    self.known_blocks.clear()
                self.known_blocks[block] = kept
        self.current = kept
        return headers

    def _check_fields(self, headers: list[tuple[bytes, bytes]], kind: int) -> None:
        """A malformed field list is a connection error (h2's); a kept block is checked once per kind."""
        known = self.current
        if known is not None and known.valid & (1 << kind):
            return
        problem = field_problem(headers, kind)
        if problem:
            self._fail(PROTOCOL_ERROR, problem)
        if known is not None:
            known.valid |= 1 << kind

    def _on_header_block(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        headers = self._decode(block)  # always, even for a stream that is gone: the HPACK state must follow
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id % 2 == 0 or self.client:
                if stream_id % 2 == 0:
                    self._fail(PROTOCOL_ERROR, "HEADERS on an even stream")
                if self._idle(stream_id):
                    self._fail(PROTOCOL_ERROR, "HEADERS on an idle stream")
                return  # a stream this side reset: what follows is dropped
            if stream_id <= self.last_stream_id:  # a stream that is over (reset, refused, done)
                self.out.append(rst_stream_frame(stream_id, STREAM_CLOSED))
                return
            self._on_request(stream_id, headers, end_stream)
            return
        if stream.in_done:
            self._stream_error(stream_id, STREAM_CLOSED)
            return
        if self.client and not stream.head_done:
            self._on_response(stream, headers, end_stream)
            return
        if not end_stream:
            self._fail(PROTOCOL_ERROR, "trailers without END_STREAM")
        self._check_fields(headers, TRAILER_FIELDS)
        if stream.expected >= 0 and not self._length_complete(stream):
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        stream.in_done = True
        self._maybe_forget(stream)
        if stream.events is not None:
            stream.events.on_trailers(headers[:])  # a copy: the decoded list may be a kept block's

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.last_stream_id = stream_id
        self._check_fields(headers, REQUEST_FIELDS)
        if self.goaway_sent or len(self.streams) >= self.settings.max_concurrent_streams:
            self._answer(rst_stream_frame(stream_id, REFUSED_STREAM))  # never processed: the client may retry
            return
        self.streams_opened += 1
        stream = H2Stream(stream_id, self.peer_initial_window, self.recv_initial_window)
        stream.in_done = end_stream
        try:
            head = build_request_head(headers, end_stream, self.policy)
        except ProtocolError as error:  # refused as the HTTP/1.1 codec refuses it (400, 413, 431...), this stream only
            self._send_block(u32(stream_id), self._fields_block([(b":status", b"%d" % error.status),
                                                                 (b"content-length", b"0")]), True)
            if not end_stream:
                self.out.append(rst_stream_frame(stream_id, NO_ERROR))  # the rest of its body is not wanted
            return
        if head.content_length is not None:
            if end_stream and head.content_length:
                self._stream_error(stream_id, PROTOCOL_ERROR)  # a length promised, and no body
                return
            stream.expected = head.content_length
        self.streams[stream_id] = stream
        self.handler.on_request(stream, head, end_stream)

    def _on_response(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self._check_fields(headers, RESPONSE_FIELDS)
        # field_problem saw :status first and the only pseudo-header field: the rest is a slice (no copies)
        value = headers[0][1]
        status = decimal(value) if len(value) == 3 else -1
        if status < 0:
            self._fail(PROTOCOL_ERROR, "malformed :status")
        fields = headers[1:]
        expected = -1
        for name, value in fields:
            if name == b"content-length":
                expected = decimal(value)  # -1 (none) when not digits
        if status < 200:
            if end_stream:
                self._fail(PROTOCOL_ERROR, "an informational response ends its stream")
            return  # 1xx: dropped, as the HTTP/1.1 codec drops them
        stream.head_done = True
        stream.expected = expected
        events = stream.events
        if events is not None:
            events.on_response_head(status, fields, end_stream)
        if end_stream and not stream.closed:
            stream.in_done = True
            self._maybe_forget(stream)
            if stream.events is not None:
                stream.events.on_end()

    # ---- SETTINGS, WINDOW_UPDATE, RST_STREAM

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self.settings_acked:  # the peer now counts our windows from our SETTINGS
                self.settings_acked = True
                delta = self.settings.initial_stream_window - self.recv_initial_window
                self.recv_initial_window = self.settings.initial_stream_window
                if delta:
                    for stream in self.streams.values():
                        stream.recv_window += delta
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        window_changed = False
        capacity = -1
        for at in range(0, len(payload), 6):
            ident = (payload[at] << 8) | payload[at + 1]
            value = read_u32(payload, at + 2)
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = min(value, DEFAULT_TABLE_SIZE)
            elif ident == SETTINGS_ENABLE_PUSH:
                if value > 1 or (self.client and value):
                    self._fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH")
            elif ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                capacity = value
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta:
                    window_changed = True
                    for stream in self.streams.values():
                        stream.send_window += delta
                        if stream.send_window > MAX_WINDOW:
                            self._fail(FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if value < DEFAULT_MAX_FRAME_SIZE or value > MAX_MAX_FRAME_SIZE:
                    self._fail(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            # SETTINGS_MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored (RFC 9113 6.5.2)
        self._answer(frame_head(0, SETTINGS, ACK, 0))
        if window_changed:
            self.pump_all()
        if capacity >= 0:
            self.handler.on_capacity(capacity)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = read_u32(payload, 0) & MAX_WINDOW
        if not stream_id:
            if not increment:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.pump_all()
            return
        if self._idle(stream_id):
            self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # closed: allowed (RFC 9113 6.9)
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR)
            return
        self._pump(stream)

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if self._idle(stream_id):
            self._fail(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.closed:
            stream.closed = True
            stream.out = None
            if stream.events is not None:
                stream.events.on_reset(read_u32(payload, 0), True)
            if not self.client:
                self.premature_resets += 1  # reset by the client before its response ended
                opened = self.streams_opened
                if opened >= PREMATURE_RESET_STREAMS and self.premature_resets * 2 >= opened:
                    self._fail(ENHANCE_YOUR_CALM, "too many streams reset by the client before their end (rapid reset)")

    # ---- receiving: the consumer's pace

    def pause(self, stream: H2Stream) -> None:
        """Hold back the credit of data received from now on: the peer stops after the stream window."""
        stream.paused = True

    def resume(self, stream: H2Stream) -> None:
        stream.paused = False
        if stream.unacked:
            size, stream.unacked = stream.unacked, 0
            self._credit(stream, size, False)

    # ---- sending

    def open_stream(self, events: StreamEvents) -> H2Stream:
        """A new client stream (send its head with send_headers)."""
        stream = H2Stream(self.next_stream_id, self.peer_initial_window, self.recv_initial_window)
        self.next_stream_id += 2
        stream.events = events
        self.streams[stream.id] = stream
        return stream

    def _add_fields(self, parts: list[bytes], headers: list[tuple[bytes, bytes]], skip: frozenset[bytes]) -> bool:
        """Encode `headers` but those named in `skip`: names lower-cased, connection-specific fields left out, `te`
        only as `trailers`, credentials never indexed, as h2 normalized them. True when a `date` was among them.
        Read in place: a block made of copies would box a new tuple per field (compiled)."""
        encoder = self.encoder
        dated = False
        for name, value in headers:
            kind = NAME_KINDS.get(name, -1)
            if kind < 0:  # a name not seen yet (or one with upper case: lower() then, each time)
                if not name.islower():  # upper case in it (or no letter at all: lower() changes nothing then)
                    name = name.lower()
                    kind = NAME_KINDS.get(name, FORWARD)
                else:
                    kind = FORWARD
                    if len(NAME_KINDS) < NAME_KINDS_MAX:
                        NAME_KINDS[name] = FORWARD
            if kind == TE_FIELD:  # the one `te` HTTP/2 allows (gRPC needs it), kept even when `connection` named
                if value == TRAILERS or value.lower().find(TRAILERS) >= 0:  # it, as Envoy does; `in`: http1/head.py
                    encoder.add(TE, TRAILERS, False, parts)
                continue
            if kind == LEAVE_OUT or (skip and name in skip):
                continue
            if kind == DATE_FIELD:
                dated = True
            encoder.add(name, value, kind == CREDENTIALS or (kind == COOKIE and len(value) < 20), parts)
        return dated

    def _add_blocks(self, parts: list[bytes], blocks: list[HeaderBlock]) -> None:
        """Encode the proxy's own added headers (templates and this message's values), connection-specific ones
        (a WebSocket upgrade's, say) left out: HTTP/2 has none (RFC 9113 8.2.2)."""
        encoder = self.encoder
        for template, values in blocks:
            names = template.names
            if template.fixed:
                values = template.fixed
            for i in range(len(names)):
                name = names[i]
                if name not in CONNECTION_HEADERS:
                    encoder.add(name, values[i], False, parts)

    def _send_block(self, wire_id: bytes, parts: list[bytes], end_stream: bool) -> None:
        """One encoded header block: HEADERS, then CONTINUATIONs when it is larger than the peer's frame size. A
        block in one frame goes out as its parts, joined once with everything else by data_to_send."""
        size = 0
        for part in parts:
            size += len(part)
        limit = self.peer_max_frame
        flags = END_STREAM if end_stream else 0
        out = self.out
        if size <= limit:
            out.append(frame_prefix(size, HEADERS, flags | END_HEADERS))
            out.append(wire_id)
            out.extend(parts)
            return
        block = b"".join(parts)
        out.append(frame_prefix(limit, HEADERS, flags))
        out.append(wire_id)
        out.append(block[:limit])
        at = limit
        while at < size:
            piece = block[at:at + limit]
            at += len(piece)
            out.append(frame_prefix(len(piece), CONTINUATION, END_HEADERS if at >= size else 0))
            out.append(wire_id)
            out.append(piece)

    def _block_parts(self) -> list[bytes]:
        parts: list[bytes] = []
        self.encoder.start_block(parts)
        return parts

    def _fields_block(self, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        """A header block of `headers` alone (trailers, a refusal's head), encoded."""
        parts = self._block_parts()
        self._add_fields(parts, headers, NO_NAMES)
        return parts

    def _headers_sent(self, stream: H2Stream, parts: list[bytes], end_stream: bool) -> None:
        self._send_block(stream.wire_id, parts, end_stream)
        if end_stream:
            stream.end_queued = stream.out_done = True
            self._maybe_forget(stream)

    def send_request_head(self, stream: H2Stream, method: bytes, authority: bytes, path: bytes,
                          headers: list[tuple[bytes, bytes]], skip: frozenset[bytes], extra: list[HeaderBlock],
                          content_length: int, end_stream: bool) -> None:
        """A request's HEADERS: the pseudo-header fields, `headers` but those in `skip`, the proxy's `extra`, and
        `content-length` unless it is -1. Nothing is copied into a block first (see _add_fields)."""
        if stream.closed:
            return
        parts = self._block_parts()
        encoder = self.encoder
        encoder.add(b":method", method, False, parts)
        encoder.add(b":scheme", b"http", False, parts)
        encoder.add(b":authority", authority, False, parts)
        encoder.add(b":path", path, False, parts)
        self._add_fields(parts, headers, skip)
        self._add_blocks(parts, extra)
        if content_length >= 0:
            encoder.add(b"content-length", b"%d" % content_length, False, parts)
        self._headers_sent(stream, parts, end_stream)

    def send_response_head(self, stream: H2Stream, status: bytes, headers: list[tuple[bytes, bytes]],
                           extra: list[HeaderBlock], date: bytes, end_stream: bool) -> None:
        """A response's HEADERS: `:status`, `headers`, the proxy's `extra`, and `date` unless `headers` had one."""
        if stream.closed:
            return
        parts = self._block_parts()
        self.encoder.add(b":status", status, False, parts)
        dated = self._add_fields(parts, headers, NO_NAMES)
        self._add_blocks(parts, extra)
        if not dated:
            self.encoder.add(DATE, date, False, parts)
        self._headers_sent(stream, parts, end_stream)

    def send_headers(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if stream.closed:
            return
        self._headers_sent(stream, self._fields_block(headers), end_stream)

    def send_data(self, stream: H2Stream, data: bytes) -> None:
        if stream.closed or stream.end_queued or not data:
            return
        out = stream.out
        size = len(data)
        if not out and not self.write_paused and size <= stream.send_window and size <= self.send_window and (
                size <= self.peer_max_frame):  # the common case: framed at once, nothing queued
            self.out.append(frame_prefix(size, DATA, 0))
            self.out.append(stream.wire_id)
            self.out.append(data)
            stream.send_window -= size
            self.send_window -= size
            return
        if out is None:
            out = stream.out = deque()
        out.append(data)
        stream.out_size += size
        self._pump(stream)
        if stream.out_size > SEND_HIGH_WATER and not stream.blocked and not stream.closed:
            stream.blocked = True
            if stream.events is not None:
                stream.events.on_write_blocked()

    def end_stream(self, stream: H2Stream, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """END_STREAM after what is queued (on a trailers HEADERS frame when there are trailers)."""
        if stream.closed or stream.end_queued:
            return
        stream.end_queued = True
        stream.trailers = trailers
        self._pump(stream)

    def reset(self, stream: H2Stream, error_code: int = CANCEL) -> None:
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.id, None)
        stream.out = None
        self.out.append(rst_stream_frame(stream.id, error_code))

    def goaway(self, error_code: int = NO_ERROR) -> None:
        """A graceful GOAWAY with the last stream id this side has seen: streams above it were never processed (and
        are refused), those below go on. Written after the frames already queued."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.pending_out += goaway_frame(self.last_stream_id, error_code)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.control_queued = 0
        self.pump_all()

    def pump_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out or (stream.end_queued and not stream.out_done):
                self._pump(stream)

    def _pump(self, stream: H2Stream) -> None:
        """Frame what the windows allow, END_STREAM (or trailers) once the queue is empty."""
        if self.write_paused or stream.closed:
            return
        out = stream.out
        frames = self.out
        wire_id = stream.wire_id
        frame_size = self.peer_max_frame
        while out is not None and out:
            window = min(stream.send_window, self.send_window)
            if window <= 0:
                break
            data = out[0]
            offset = stream.offset
            size = min(window, frame_size)
            left = len(data) - offset
            if left <= size:
                out.popleft()
                stream.offset = 0
                piece = data[offset:] if offset else data
                last = not out and stream.end_queued and stream.trailers is None
                frames.append(frame_prefix(left, DATA, END_STREAM if last else 0))
                frames.append(wire_id)
                frames.append(piece)
                stream.send_window -= left
                self.send_window -= left
                stream.out_size -= left
                if last:
                    stream.out_done = True
            else:
                frames.append(frame_prefix(size, DATA, 0))
                frames.append(wire_id)
                frames.append(data[offset:offset + size])
                stream.offset = offset + size
                stream.send_window -= size
                self.send_window -= size
                stream.out_size -= size
        if not out and stream.end_queued and not stream.out_done:
            stream.out_done = True
            if stream.trailers is not None:
                self._send_block(wire_id, self._fields_block(stream.trailers), True)
            else:
                frames.append(frame_prefix(0, DATA, END_STREAM))
                frames.append(wire_id)
        if stream.out_done:
            self._maybe_forget(stream)
        if stream.blocked and stream.out_size < SEND_LOW_WATER:
            stream.blocked = False
            if stream.events is not None:
                stream.events.on_writable()

    def _maybe_forget(self, stream: H2Stream) -> None:
        if stream.in_done and stream.out_done and not stream.closed:
            stream.closed = True
            streams = self.streams
            if stream.id in streams:  # `in` and `del` compile to calls of their own; `pop` is a method lookup
                del streams[stream.id]

    def fail_all(self, error_code: int) -> None:
        """The connection is gone: every open stream hears a (local) reset."""
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if not stream.closed:
                stream.closed = True
                if stream.events is not None:
                    stream.events.on_reset(error_code, False)


class CallbackEvents(ConnectionEvents, StreamEvents):
    """Connection and stream events to one plain callable, `record(kind, stream_id, value)`, for code outside the
    compiled hot path (a tool, a test): an interpreted class cannot inherit a compiled trait. As a connection's
    handler it makes every new server stream report to itself too."""

    __slots__ = ("record", "stream_id")

    def __init__(self, record: Callable[[str, int, object], None], stream_id: int = 0) -> None:
        self.record = record
        self.stream_id = stream_id

    def on_request(self, stream: H2Stream, head: RequestHead, end_stream: bool) -> None:
        stream.events = CallbackEvents(self.record, stream.id)
        self.record("request", stream.id, (head, end_stream))

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        self.record("goaway", 0, (last_stream_id, error_code))

    def on_capacity(self, max_streams: int) -> None:
        self.record("capacity", 0, max_streams)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.record("response", self.stream_id, (status, headers, end_stream))

    def on_data(self, data: bytes) -> None:
        self.record("data", self.stream_id, data)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.record("trailers", self.stream_id, headers)

    def on_end(self) -> None:
        self.record("end", self.stream_id, None)

    def on_reset(self, error_code: int, remote: bool) -> None:
        self.record("reset", self.stream_id, (error_code, remote))

    def on_write_blocked(self) -> None:
        self.record("blocked", self.stream_id, None)

    def on_writable(self) -> None:
        self.record("writable", self.stream_id, None)
