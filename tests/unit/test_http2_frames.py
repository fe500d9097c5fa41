"""The HTTP/2 frame layer (meshproxy/http2/codec.py, frames.py) against the `h2` library as the peer: SETTINGS and
PING answered, CONTINUATION and padding read, CONTINUATION and the peer's frame size used when sending, windows
respected both ways, and each protocol error answered with the GOAWAY code RFC 9113 gives it. The frames a
well-behaved peer never sends are built with hyperframe (h2's own frame library) and hpack, then broken."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshproxy.http2.codec import CallbackEvents, H2Codec, H2Error, H2Settings

Event = tuple[str, int, object]
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/p")]
SMALL = H2Settings(max_concurrent_streams=2, initial_stream_window=65535, connection_window=1 << 20)


def recorder() -> tuple[list[Event], CallbackEvents]:
    events: list[Event] = []
    return events, CallbackEvents(lambda kind, stream, value: events.append((kind, stream, value)))


def h2_client(**settings: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0,
                          **{getattr(h2.settings.SettingCodes, k): v for k, v in settings.items()}})
    return conn


def frames_of(data: bytes) -> list[Frame]:
    frames, at = [], 0
    while at < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[at:at + 9]))
        frame.parse_body(memoryview(data[at + 9:at + 9 + length]))
        frames.append(frame)
        at += 9 + length
    return frames


def server(settings: H2Settings = SMALL) -> tuple[H2Codec, list[Event]]:
    events, handler = recorder()
    codec = H2Codec(False, handler, settings)
    codec.initiate()
    return codec, events


def exchange(client: h2.connection.H2Connection, codec: H2Codec) -> list[h2.events.Event]:
    """Bytes both ways until both sides are quiet; h2's events."""
    seen: list[h2.events.Event] = []
    for _ in range(1000):
        out = client.data_to_send()
        if out:
            codec.feed(out)
        back = codec.data_to_send()
        if back:
            seen += client.receive_data(back)
        if not out and not back:
            return seen
    raise AssertionError("never settled")


def stream_of(codec: H2Codec, stream_id: int):  # noqa: ANN201
    return codec.streams[stream_id]


def test_settings_acknowledged_ping_answered_priority_ignored() -> None:
    codec, events = server()
    client = h2_client()
    seen = exchange(client, codec)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in seen)
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in seen)
    client.ping(b"12345678")
    client.prioritize(1, weight=16)
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in exchange(client, codec))


def test_continuation_and_padding_are_read_and_continuation_is_sent() -> None:
    codec, events = server(H2Settings())
    client = h2_client()
    exchange(client, codec)
    big = b"v" * 20_000  # over one 16 KiB frame: HEADERS + CONTINUATION from h2
    client.send_headers(1, [*REQUEST, (b"x-big", big)])
    client.send_data(1, b"abc", pad_length=40)
    client.end_stream(1)
    exchange(client, codec)
    request = next(value for kind, _, value in events if kind == "request")
    assert request[0].header(b"x-big") == big  # type: ignore[index]
    assert [v for k, _, v in events if k == "data"] == [b"abc"]
    assert ("end", 1, None) in events
    stream = stream_of(codec, 1)
    codec.send_headers(stream, [(b":status", b"200"), (b"x-large", b"w" * 40_000)], True)
    seen = exchange(client, codec)
    response = next(e for e in seen if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers)[b"x-large"] == b"w" * 40_000
    assert any(isinstance(e, h2.events.StreamEnded) for e in seen)


def test_padded_headers_with_priority_are_read() -> None:
    codec, events = server()
    client = h2_client()
    exchange(client, codec)
    frame = HeadersFrame(1)
    frame.data = hpack.Encoder().encode(REQUEST)
    frame.pad_length = 9
    frame.depends_on, frame.stream_weight = 0, 15
    for flag in ("END_HEADERS", "END_STREAM", "PADDED", "PRIORITY"):
        frame.flags.add(flag)
    codec.feed(frame.serialize())
    assert [kind for kind, _, _ in events if kind != "capacity"] == ["request"]


def test_sends_respect_the_peers_frame_size_and_windows() -> None:
    codec, _ = server(H2Settings())
    client = h2_client(MAX_FRAME_SIZE=32768, INITIAL_WINDOW_SIZE=50_000)
    exchange(client, codec)
    client.send_headers(1, REQUEST, end_stream=True)
    exchange(client, codec)
    stream = stream_of(codec, 1)
    codec.send_headers(stream, [(b":status", b"200")], False)
    codec.send_data(stream, b"d" * 200_000)
    codec.end_stream(stream)
    sizes, body, ended = [], 0, False
    for _ in range(100):
        out = codec.data_to_send()
        sizes += [len(f.data) for f in frames_of(out) if isinstance(f, DataFrame) and f.data]
        for event in client.receive_data(out):  # h2 raises FlowControlError if a window is overrun
            if isinstance(event, h2.events.DataReceived):
                body += len(event.data)
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        back = client.data_to_send()
        if back:
            codec.feed(back)
        if ended:
            break
    assert body == 200_000 and ended
    assert max(sizes) == 32768  # the peer's SETTINGS_MAX_FRAME_SIZE, not the default 16384
    assert sum(sizes[:3]) <= 50_000 + 32768  # held at the stream window until h2 handed credit back


def test_a_stream_beyond_max_concurrent_streams_is_refused() -> None:
    codec, events = server()  # 2 streams at most
    client = h2_client()
    exchange(client, codec)
    encoder = hpack.Encoder()
    for stream_id in (1, 3, 5):
        frame = HeadersFrame(stream_id)
        frame.data = encoder.encode(REQUEST)
        frame.flags.add("END_HEADERS")
        codec.feed(frame.serialize())
    resets = [f for f in frames_of(codec.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [stream for kind, stream, _ in events if kind == "request"] == [1, 3]
    assert [(f.stream_id, f.error_code) for f in resets] == [(5, 7)]  # REFUSED_STREAM: the client may retry it
    assert 5 not in codec.streams


def test_data_on_a_half_closed_stream_is_a_stream_error() -> None:
    codec, events = server()
    client = h2_client()
    exchange(client, codec)
    client.send_headers(1, REQUEST, end_stream=True)
    exchange(client, codec)
    late = DataFrame(1, b"late")
    codec.feed(late.serialize())
    assert [(type(f), f.error_code) for f in frames_of(codec.data_to_send())] == [(RstStreamFrame, 5)]  # STREAM_CLOSED
    assert ("reset", 1, (5, False)) in events


def test_a_peer_that_overruns_a_paused_streams_window_is_a_flow_control_error() -> None:
    codec, _ = server()
    client = h2_client()
    exchange(client, codec)
    codec.feed(headers_frame(1, REQUEST))
    codec.pause(stream_of(codec, 1))  # its credit is held: 65,535 bytes and no more
    with pytest.raises(H2Error):
        codec.feed(b"".join(DataFrame(1, b"x" * 16_000).serialize() for _ in range(5)))
    terminated = [e for e in client.receive_data(codec.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [3]  # FLOW_CONTROL_ERROR


@pytest.mark.parametrize(("declared", "sent"), [(b"5", [b"abc"]), (b"2", [b"abc"]), (b"4", [b"ab", b"cd", b"e"])])
def test_a_body_that_does_not_add_up_to_its_content_length_is_reset(declared: bytes, sent: list[bytes]) -> None:
    """RFC 9113 8.1.1: malformed, a stream error; never passed on (an HTTP/1.1 upstream would read it framed by
    the content-length: a request smuggled behind it)."""
    codec, events = server()
    client = h2_client()
    exchange(client, codec)
    codec.feed(headers_frame(1, [*REQUEST, (b"content-length", declared)]))
    frames = [DataFrame(1, chunk) for chunk in sent]
    frames[-1].flags.add("END_STREAM")
    codec.feed(b"".join(frame.serialize() for frame in frames))
    delivered = b"".join(v for k, _, v in events if k == "data")  # type: ignore[misc]
    assert len(delivered) <= int(declared)
    assert ("reset", 1, (1, False)) in events and ("end", 1, None) not in events
    assert [(type(f), f.error_code) for f in frames_of(codec.data_to_send())] == [(RstStreamFrame, 1)]


def test_streams_paused_on_most_of_the_connection_window_do_not_stall_the_others() -> None:
    """Two streams hold their credit (paused consumers) on three quarters of the connection window: a third
    stream still gets all its data, its credit handed back once the connection window is shut."""
    settings = H2Settings(max_concurrent_streams=10, initial_stream_window=65535, connection_window=3 * 65535 // 2)
    codec, events = server(settings)
    client = h2_client()
    exchange(client, codec)
    client.increment_flow_control_window(1 << 20)
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, REQUEST)
    exchange(client, codec)
    codec.pause(stream_of(codec, 1))
    codec.pause(stream_of(codec, 3))
    for stream_id in (1, 3):
        for _ in range(4):
            client.send_data(stream_id, b"h" * 10_000)
    exchange(client, codec)
    body = b"f" * 150_000
    sent = 0
    for _ in range(200):  # as much as h2 lets the client send, each time the windows open
        room = min(client.local_flow_control_window(5), len(body) - sent, 16384)
        if room > 0:
            client.send_data(5, body[sent:sent + room])
            sent += room
        exchange(client, codec)
        if sent == len(body):
            break
    assert received_on(events, 5) == len(body)
    assert received_on(events, 1) == received_on(events, 3) == 40_000


def received_on(events: list[Event], stream_id: int) -> int:
    return sum(len(v) for k, s, v in events if k == "data" and s == stream_id)  # type: ignore[arg-type]


def headers_frame(stream_id: int, headers: list[tuple[bytes, bytes]], *flags: str) -> bytes:
    frame = HeadersFrame(stream_id)
    frame.data = hpack.Encoder().encode(headers)
    for flag in flags or ("END_HEADERS",):
        frame.flags.add(flag)
    return frame.serialize()


def with_length(frame: Frame, length: int) -> bytes:
    """A frame whose header claims `length` and whose payload is cut or padded with zeros to match."""
    data = frame.serialize()
    body = data[9:][:length].ljust(length, b"\0")
    return length.to_bytes(3, "big") + data[3:9] + body


def window_update(stream_id: int, increment: int) -> bytes:
    frame = WindowUpdateFrame(stream_id)
    frame.window_increment = 1
    data = bytearray(frame.serialize())
    data[9:13] = increment.to_bytes(4, "big")
    return bytes(data)


def settings_frame(setting: int, value: int) -> bytes:
    frame = SettingsFrame(0)
    frame.settings = {setting: value}
    return frame.serialize()


def push_promise() -> bytes:
    frame = PushPromiseFrame(1)
    frame.promised_stream_id = 2
    frame.data = hpack.Encoder().encode([(b":status", b"200")])
    frame.flags.add("END_HEADERS")
    return frame.serialize()


def padded_too_long() -> bytes:
    frame = DataFrame(1, b"x")
    frame.pad_length = 3
    frame.flags.add("PADDED")
    data = bytearray(frame.serialize())
    data[9] = 200  # a pad length beyond the frame
    return headers_frame(1, REQUEST) + bytes(data)


ERRORS: dict[str, tuple[Callable[[], bytes], int]] = {
    "frame over 16 KiB": (lambda: headers_frame(1, REQUEST) + DataFrame(1, b"x" * 20_000).serialize(), 6),
    "PING of 7 bytes": (lambda: with_length(PingFrame(0, b"12345678"), 7), 6),
    "SETTINGS of 5 bytes": (lambda: with_length(SettingsFrame(0, {4: 1}), 5), 6),
    "SETTINGS_MAX_FRAME_SIZE 100": (lambda: settings_frame(5, 100), 1),
    "SETTINGS_INITIAL_WINDOW_SIZE 2^31": (lambda: settings_frame(4, 1 << 31), 3),
    "DATA on an idle stream": (lambda: DataFrame(1, b"x").serialize(), 1),
    "broken HPACK": (lambda: HeadersFrame(1, b"\xff\xff\xff\xff\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize(), 9),
    "upper-case header name": (lambda: headers_frame(1, [*REQUEST, (b"X-Up", b"1")]), 1),
    "connection header": (lambda: headers_frame(1, [*REQUEST, (b"connection", b"close")]), 1),
    "te other than trailers": (lambda: headers_frame(1, [*REQUEST, (b"te", b"gzip")]), 1),
    "pseudo-header after a field": (lambda: headers_frame(1, [*REQUEST[:3], (b"x", b"1"), REQUEST[3]]), 1),
    "no :path": (lambda: headers_frame(1, REQUEST[:3]), 1),
    "CONTINUATION alone": (lambda: ContinuationFrame(1, b"", flags=["END_HEADERS"]).serialize(), 1),
    "a frame inside a header block": (
        lambda: headers_frame(1, REQUEST, "END_STREAM") + PingFrame(0, b"12345678").serialize(), 1),
    "WINDOW_UPDATE of 0": (lambda: window_update(0, 0), 1),
    "connection window over 2^31-1": (lambda: window_update(0, (1 << 31) - 1), 3),
    "padding beyond the frame": (padded_too_long, 1),
    "PUSH_PROMISE to a server": (push_promise, 1),
    "even stream id": (lambda: headers_frame(2, REQUEST), 1),
    "PRIORITY on stream 0": (lambda: PriorityFrame(1).serialize()[:5] + bytes(4) + PriorityFrame(1).serialize()[9:], 1),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_protocol_errors_end_the_connection_with_their_goaway_code(case: str) -> None:
    make, code = ERRORS[case]
    codec, _ = server()
    client = h2_client()
    exchange(client, codec)
    with pytest.raises(H2Error):
        codec.feed(make())
    terminated = [e for e in client.receive_data(codec.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [code]
    codec.feed(PingFrame(0, b"12345678").serialize())  # nothing more is read
    assert codec.data_to_send() == b""


def test_a_preface_that_is_not_http2_or_no_settings_first() -> None:
    codec, _ = server()
    with pytest.raises(H2Error):
        codec.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec, _ = server()
    with pytest.raises(H2Error):
        codec.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + PingFrame(0, b"12345678").serialize())


def test_client_side_against_an_h2_server_with_informational_and_trailers() -> None:
    events, handler = recorder()
    codec = H2Codec(True, handler)
    codec.initiate()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    stream = codec.open_stream(handler)
    stream.events = CallbackEvents(handler.record, stream.id)
    codec.send_headers(stream, REQUEST, False)
    codec.send_data(stream, b"ping")
    codec.end_stream(stream, [(b"x-request-trailer", b"1")])
    received = peer.receive_data(codec.data_to_send())
    assert [type(e).__name__ for e in received if not isinstance(e, (h2.events.RemoteSettingsChanged,
                                                                     h2.events.WindowUpdated))] == [
        "RequestReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    peer.send_headers(1, [(b":status", b"100")])
    peer.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    peer.send_data(1, b"pong")
    peer.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    codec.feed(peer.data_to_send())
    assert [(k, v) for k, _, v in events if k in ("response", "data", "trailers", "end")] == [
        ("response", (200, [(b"content-type", b"application/grpc")], False)), ("data", b"pong"),
        ("trailers", [(b"grpc-status", b"0")])]
    assert codec.open_streams == 0


def test_mutated_input_raises_nothing_but_h2error() -> None:
    """Real frames from h2, mutated at random (seeded): the codec reads them or ends the connection with H2Error,
    never another exception (the integration test checks the same through the proxy, fewer cases)."""
    import random

    client = h2_client()
    client.send_headers(1, [*REQUEST, (b"content-length", b"6"), (b"cookie", b"a=1")])
    client.send_data(1, b"abc", pad_length=5)
    client.send_data(1, b"def")
    client.send_headers(1, [(b"x-t", b"1")], end_stream=True)
    client.send_headers(3, REQUEST, end_stream=True)
    client.ping(b"abcdefgh")
    client.increment_flow_control_window(1000)
    client.reset_stream(3)
    base = client.data_to_send()
    rng = random.Random(77)
    for _ in range(1500):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(24, len(data))
            choice = rng.randrange(3)
            if choice == 0:
                data[at] = rng.randrange(256)
            elif choice == 1:
                del data[at:at + rng.randrange(1, 12)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        codec, _ = server()
        cut = rng.randrange(1, len(data))
        try:
            codec.feed(bytes(data[:cut]))
            codec.feed(bytes(data[cut:]))
        except H2Error:
            pass
        codec.data_to_send()


def test_a_peer_that_floods_pings_and_never_reads_is_cut_off() -> None:
    """PING acks queued while the transport is paused (the peer does not read) are bounded: past Envoy's
    max_outbound_control_frames (1000) the connection ends with ENHANCE_YOUR_CALM; with the transport writable
    the same PINGs are simply answered."""
    codec, _ = server()
    client = h2_client()
    exchange(client, codec)
    ping = PingFrame(0, b"12345678").serialize()
    codec.feed(ping * 2000)  # writable: every one answered
    assert len(codec.data_to_send()) == 2000 * 17
    codec.pause_writing()
    codec.feed(ping * 1000)
    with pytest.raises(H2Error, match="flood"):
        codec.feed(ping)
    terminated = [e for e in client.receive_data(codec.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [11]  # ENHANCE_YOUR_CALM
    codec, _ = server()  # the count starts again each time the transport drains
    exchange(h2_client(), codec)
    for _ in range(3):
        codec.pause_writing()
        codec.feed(ping * 1000)
        codec.resume_writing()
    assert not codec.failed


def test_rapid_reset_ends_the_connection_once_half_of_500_streams_were_reset() -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset by the client before their response ends. As
    Envoy's premature-reset check: once 500 streams were opened, resets of at least half of them end the connection
    with ENHANCE_YOUR_CALM; a client whose streams end normally is never cut off."""
    settings = H2Settings(max_concurrent_streams=1024, initial_stream_window=65535, connection_window=1 << 20)
    codec, events = server(settings)
    client = h2_client()
    exchange(client, codec)
    stream_id = 0
    with pytest.raises(H2Error, match="rapid reset"):
        for stream_id in range(1, 2001, 2):
            client.send_headers(stream_id, REQUEST)
            client.reset_stream(stream_id)
            codec.feed(client.data_to_send())
    assert stream_id == 999  # the 500th stream's reset
    assert sum(1 for kind, _, _ in events if kind == "request") == 500
    terminated = [e for e in client.receive_data(codec.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)]
    assert [t.error_code for t in terminated] == [11]
    codec, events = server(settings)  # 600 streams answered whole and reset by the client after: not premature
    client = h2_client()
    exchange(client, codec)
    for stream_id in range(1, 1201, 2):
        client.send_headers(stream_id, REQUEST, end_stream=True)
        codec.feed(client.data_to_send())
        stream = codec.streams[stream_id]
        codec.send_headers(stream, [(b":status", b"200")], True)
        client.receive_data(codec.data_to_send())
    assert not codec.failed and not codec.streams


def test_frame_heads_and_decimals_match_the_reference() -> None:
    """frame_prefix's kept prefixes and a stream's id bytes make the frame head hyperframe reads; the cache stays
    bounded. decimal() reads what bytes.isdigit() and int() read, -1 for anything else."""
    from meshproxy.http2 import frames

    cases = [(0, 0, 1, 1), (8, 1, 5, 3), (16_384, 0, 0, 2**31 - 1), (2**24 - 1, 9, 4, 7)]
    # the short frames' list (DATA and HEADERS, END_STREAM or not, to 1,023 octets) at its edges, and beside it
    cases += [(length, kind, flags, 5) for length in (1, 255, 1023, 1024) for kind, flags in
              [(0, 0), (0, 1), (1, 4), (1, 5), (0, 8), (1, 0), (1, 0x24), (2, 0), (8, 0), (9, 5)]]
    for length, kind, flags, stream_id in cases * 2:  # made, then kept
        head = frames.frame_prefix(length, kind, flags) + frames.u32(stream_id)
        parsed, parsed_length = Frame.parse_frame_header(memoryview(head))
        assert (parsed_length, parsed.type, parsed.stream_id, head[4]) == (length, kind, stream_id, flags)
    for length in range(frames.PREFIXES_MAX + 10):
        frames.frame_prefix(length, 0, 0)
    assert len(frames._PREFIXES) <= frames.PREFIXES_MAX
    for text in [b"0", b"7", b"200", b"18446744073709551616", b"9" * 18, b"9" * 30]:
        assert frames.decimal(text) == int(text)
    for text in [b"", b"-1", b"+1", b" 1", b"1 ", b"1a", b"\xd9\xa1", b"1" * 20 + b"x"]:
        assert frames.decimal(text) == -1
