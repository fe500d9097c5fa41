"""The HTTP/2 codec, sans-IO, on the `h2` library: bytes in, per-stream events out; per-stream sends out as bytes.

`H2Codec` is one connection, either side. `feed(data)` hands the peer's frames to h2 and reports what they mean:
on a server, each new stream as `ConnectionEvents.on_request(stream, head, end_stream)` with a validated
`RequestHead` (http2/head.py), then the stream's own `StreamEvents` (body chunks, trailers, the end, a reset); on a
client, the response head, body, trailers and end of each stream it opened. `data_to_send()` is what to write.

Flow control, per stream, both ways (Envoy's SETTINGS: 1024 concurrent streams, 16 MiB stream windows, a 24 MiB
connection window):
- Received data is acknowledged (its window credit handed back) as soon as it is delivered, unless the stream's
  consumer paused it (`pause`): then the credit is held until `resume`, so a slow consumer stops its own sender
  after one stream window, and the others go on.
- Sent data waits in the stream's queue until the peer's stream and connection windows let it go, in frames of the
  peer's maximum size; nothing is buffered whole. Above SEND_HIGH_WATER queued bytes the stream hears
  `on_write_blocked` (its producer should pause), below SEND_LOW_WATER `on_writable`. While the transport's own
  buffer is full (`pause_writing`), nothing more is framed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame
from mypy_extensions import trait

from ..http1.errors import ProtocolError
from ..http1.head import DEFAULT_POLICY, HeadPolicy
from ..messages import RequestHead
from .head import build_request_head
from .hpack_codec import Decoder, Encoder

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS: Final = 1024  # Envoy's http2_protocol_options defaults
INITIAL_STREAM_WINDOW: Final = 16 * 1024 * 1024
INITIAL_CONNECTION_WINDOW: Final = 24 * 1024 * 1024
SPEC_WINDOW: Final = 65535  # every window's size before SETTINGS and WINDOW_UPDATE (RFC 9113 6.9.2)
SEND_HIGH_WATER: Final = 256 * 1024  # queued bytes of one stream above which its producer is paused
SEND_LOW_WATER: Final = 64 * 1024

NO_ERROR: Final = 0
PROTOCOL_ERROR: Final = 1
INTERNAL_ERROR: Final = 2
REFUSED_STREAM: Final = 7
CANCEL: Final = 8

_DataReceived = h2.events.DataReceived
_RequestReceived = h2.events.RequestReceived
_ResponseReceived = h2.events.ResponseReceived
_TrailersReceived = h2.events.TrailersReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_RemoteSettingsChanged = h2.events.RemoteSettingsChanged
_ConnectionTerminated = h2.events.ConnectionTerminated
_InformationalResponseReceived = h2.events.InformationalResponseReceived
OPEN_STATE: Final = {True: h2.connection.ConnectionState.CLIENT_OPEN, False: h2.connection.ConnectionState.SERVER_OPEN}


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
    """One stream's state in the codec: who hears it, what waits to be sent, what credit is held back."""

    __slots__ = ("id", "events", "out", "offset", "out_size", "end_queued", "trailers", "out_done", "in_done",
                 "unacked", "paused", "blocked", "closed")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.events: StreamEvents | None = None
        self.out: deque[bytes] = deque()  # body chunks not yet framed (the first from `offset`)
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


class H2Codec:
    """One HTTP/2 connection (see the module docstring). Calls `handler` for connection events and each stream's
    `events` for its own."""

    __slots__ = ("conn", "handler", "client", "streams", "write_paused", "policy", "goaway_sent", "last_stream_id",
                 "settings", "pending_out")

    def __init__(self, client: bool, handler: ConnectionEvents, settings: H2Settings = DEFAULT_SETTINGS,
                 policy: HeadPolicy = DEFAULT_POLICY) -> None:
        config = h2.config.H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=True,
                                           validate_outbound_headers=True, normalize_inbound_headers=True)
        conn = h2.connection.H2Connection(config=config)
        # HPACK compiled with mypyc in place of the pure-Python `hpack` package h2 made (same interface and errors;
        # hpack_codec.py): most of a small request's codec time went there
        decoder = Decoder(conn.decoder.max_header_list_size)
        decoder.max_allowed_table_size = conn.decoder.max_allowed_table_size
        conn.decoder = decoder  # type: ignore[assignment]
        conn.encoder = Encoder()  # type: ignore[assignment]
        self.conn = conn
        self.handler = handler
        self.client = client
        self.settings = settings
        self.policy = policy
        self.streams: dict[int, H2Stream] = {}
        self.write_paused = False
        self.goaway_sent = False
        self.last_stream_id = 0  # the highest stream the peer opened (server side), for GOAWAY
        self.pending_out = b""  # a graceful GOAWAY, written after h2's frames

    def initiate(self) -> None:
        """The connection preface (a client's magic, both sides' SETTINGS) and the connection window."""
        conn = self.conn
        conn.local_settings = h2.settings.Settings(client=self.client, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.settings.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.settings.initial_stream_window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        conn.initiate_connection()
        if self.settings.connection_window > SPEC_WINDOW:
            conn.increment_flow_control_window(self.settings.connection_window - SPEC_WINDOW)

    def data_to_send(self) -> bytes:
        data: bytes = self.conn.data_to_send()
        if self.pending_out:
            data, self.pending_out = data + self.pending_out, b""
        return data

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # ---- bytes in

    def feed(self, data: bytes) -> None:
        """The peer's bytes: report their events; raises H2Error when the connection must end."""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise H2Error(f"http2.protocol_error: {exc}") from None
        for event in events:
            kind = type(event)
            if kind is _DataReceived:
                self._on_data(event)  # type: ignore[arg-type]
            elif kind is _RequestReceived:
                self._on_request(event)  # type: ignore[arg-type]
            elif kind is _ResponseReceived:
                self._on_response(event)  # type: ignore[arg-type]
            elif kind is _StreamEnded:
                stream = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None and not stream.in_done:
                    stream.in_done = True
                    self._maybe_forget(stream)
                    if stream.events is not None:
                        stream.events.on_end()
            elif kind is _TrailersReceived:
                self._on_trailers(event)  # type: ignore[arg-type]
            elif kind is _WindowUpdated:
                stream_id: int = event.stream_id  # type: ignore[attr-defined]
                if stream_id:
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        self._pump(stream)
                else:
                    self.pump_all()
            elif kind is _StreamReset:
                stream = self.streams.pop(event.stream_id, None)  # type: ignore[attr-defined]
                if stream is not None and not stream.closed:
                    stream.closed = True
                    if stream.events is not None:
                        stream.events.on_reset(int(event.error_code or 0), True)  # type: ignore[attr-defined]
            elif kind is _RemoteSettingsChanged:
                changed = event.changed_settings  # type: ignore[attr-defined]
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                    self.pump_all()
                limit = changed.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if limit is not None:
                    self.handler.on_capacity(int(limit.new_value))
            elif kind is _ConnectionTerminated:
                code = int(event.error_code or 0)  # type: ignore[attr-defined]
                if code == NO_ERROR:
                    # A graceful GOAWAY: the streams up to its last id go on (RFC 9113 6.8), but h2 closes its state
                    # machine on any GOAWAY; reopened, no new stream is started here (the handler stops that).
                    self.conn.state_machine.state = OPEN_STATE[self.client]
                self.handler.on_goaway(int(event.last_stream_id or 0), code)  # type: ignore[attr-defined]
            elif kind is _InformationalResponseReceived:
                pass  # 1xx: dropped, as the HTTP/1.1 codec drops them

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if stream_id > self.last_stream_id:
            self.last_stream_id = stream_id
        if self.goaway_sent:
            self.conn.reset_stream(stream_id, REFUSED_STREAM)  # above our GOAWAY's last stream id: never processed
            return
        stream = H2Stream(stream_id)
        end_stream = event.stream_ended is not None
        stream.in_done = end_stream
        try:
            head = build_request_head(event.headers, end_stream, self.policy)  # type: ignore[arg-type]
        except ProtocolError as error:  # refused as the HTTP/1.1 codec refuses it (400, 413, 431...), this stream only
            self.conn.send_headers(stream_id, [(b":status", b"%d" % error.status), (b"content-length", b"0")],
                                   end_stream=True)
            if not end_stream:
                self.conn.reset_stream(stream_id, NO_ERROR)  # the rest of its body is not wanted
            return
        self.streams[stream_id] = stream
        self.handler.on_request(stream, head, end_stream)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        for name, value in event.headers:  # type: ignore[union-attr]
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                headers.append((name, value))  # type: ignore[arg-type]
        end_stream = event.stream_ended is not None  # StreamEnded follows: on_end then
        if stream.events is not None:
            stream.events.on_response_head(status, headers, end_stream)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size: int = event.flow_controlled_length or 0
        stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
        if stream is None or stream.closed:
            if size:
                self.conn.acknowledge_received_data(size, event.stream_id)
            return
        if stream.paused:
            stream.unacked += size
        elif size:
            self.conn.acknowledge_received_data(size, stream.id)
        if event.data and stream.events is not None:
            stream.events.on_data(event.data)  # type: ignore[arg-type]

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
        if stream is None:
            return
        stream.in_done = True
        self._maybe_forget(stream)
        if stream.events is not None:
            stream.events.on_trailers([(n, v) for n, v in event.headers])  # type: ignore[misc,union-attr]

    # ---- receiving: the consumer's pace

    def pause(self, stream: H2Stream) -> None:
        """Hold back the credit of data received from now on: the peer stops after the stream window."""
        stream.paused = True

    def resume(self, stream: H2Stream) -> None:
        stream.paused = False
        if stream.unacked:
            size, stream.unacked = stream.unacked, 0
            self.conn.acknowledge_received_data(size, stream.id)

    # ---- sending

    def open_stream(self, events: StreamEvents) -> H2Stream:
        """A new client stream (send its head with send_headers)."""
        stream = H2Stream(self.conn.get_next_available_stream_id())
        stream.events = events
        self.streams[stream.id] = stream
        return stream

    def send_headers(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.conn.send_headers(stream.id, headers, end_stream=end_stream)
        if end_stream:
            stream.end_queued = stream.out_done = True
            self._maybe_forget(stream)

    def send_data(self, stream: H2Stream, data: bytes) -> None:
        if stream.closed or stream.end_queued or not data:
            return
        stream.out.append(data)
        stream.out_size += len(data)
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
        stream.out.clear()
        try:
            self.conn.reset_stream(stream.id, error_code)
        except h2.exceptions.StreamClosedError:
            pass  # h2 had already closed it

    def goaway(self, error_code: int = NO_ERROR) -> None:
        """A graceful GOAWAY with the last stream id this side has seen: streams above it were never processed (and
        are refused), those below go on. Framed here: h2's close_connection would also stop the streams in flight."""
        if not self.goaway_sent:
            self.goaway_sent = True
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.last_stream_id
            frame.error_code = error_code
            self.pending_out += frame.serialize()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pump_all()

    def pump_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out or (stream.end_queued and not stream.out_done):
                self._pump(stream)

    def _pump(self, stream: H2Stream) -> None:
        """Frame what the windows allow, END_STREAM (or trailers) once the queue is empty."""
        if self.write_paused or stream.closed:
            return
        conn = self.conn
        out = stream.out
        stream_id = stream.id
        frame_size: int = conn.max_outbound_frame_size
        while out:
            window = conn.local_flow_control_window(stream_id)
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
                conn.send_data(stream_id, piece, end_stream=last)
                stream.out_size -= left
                if last:
                    stream.out_done = True
            else:
                conn.send_data(stream_id, data[offset:offset + size])
                stream.offset = offset + size
                stream.out_size -= size
        if not out and stream.end_queued and not stream.out_done:
            stream.out_done = True
            if stream.trailers is not None:
                conn.send_headers(stream_id, stream.trailers, end_stream=True)
            else:
                conn.end_stream(stream_id)
        if stream.out_done:
            self._maybe_forget(stream)
        if stream.blocked and stream.out_size < SEND_LOW_WATER:
            stream.blocked = False
            if stream.events is not None:
                stream.events.on_writable()

    def _maybe_forget(self, stream: H2Stream) -> None:
        if stream.in_done and stream.out_done and not stream.closed:
            stream.closed = True
            self.streams.pop(stream.id, None)

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
