"""The HTTP/2 codec alone (sans-IO): request events independent of read boundaries, per-stream flow control both
ways, trailers, resets and a graceful GOAWAY, between two codecs in memory or against h2 as the peer."""

from __future__ import annotations

import random

import h2.config
import h2.connection

from meshproxy.http2.codec import CallbackEvents, H2Codec, H2Settings

Event = tuple[str, int, object]


def recorder() -> tuple[list[Event], CallbackEvents]:
    events: list[Event] = []
    return events, CallbackEvents(lambda kind, stream, value: events.append((kind, stream, value)))


def summary(events: list[Event]) -> list[tuple[str, int, object]]:
    """Request heads as their fields, adjacent data joined; flow control signals left out."""
    out: list[tuple[str, int, object]] = []
    for kind, stream, value in events:
        if kind == "request":
            head, end = value  # type: ignore[misc]
            value = (head.method, head.path, head.query, head.authority, head.content_length, head.chunked, end)
        elif kind == "data" and out and out[-1][0] == "data" and out[-1][1] == stream:
            out[-1] = ("data", stream, out[-1][2] + value)  # type: ignore[operator]
            continue
        elif kind in ("blocked", "writable", "capacity"):
            continue
        out.append((kind, stream, value))
    return out


def client_bytes() -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"),
                          (b":path", b"/a/./b?x=1"), (b"cookie", b"a=1"), (b"cookie", b"b=2")], end_stream=True)
    conn.send_headers(3, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
                          (b":path", b"/up")])
    conn.send_data(3, b"x" * 5000)
    conn.send_headers(3, [(b"x-sum", b"9")], end_stream=True)
    return conn.data_to_send()


def test_request_events_do_not_depend_on_read_boundaries() -> None:
    data = client_bytes()
    whole_events, handler = recorder()
    H2Codec(False, handler).feed(data)
    whole = summary(whole_events)
    assert whole == [("request", 1, (b"GET", b"/a/b", b"x=1", b"svc", None, False, True)),
                     ("request", 3, (b"POST", b"/up", b"", b"svc", None, True, False)),
                     ("data", 3, b"x" * 5000), ("trailers", 3, [(b"x-sum", b"9")])]
    rng = random.Random(5)
    for _ in range(100):
        events, handler = recorder()
        codec = H2Codec(False, handler)
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(1, 12)))
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            codec.feed(data[a:b])
        assert summary(events) == whole


def test_cookie_crumbs_are_joined_for_http1() -> None:
    events, handler = recorder()
    H2Codec(False, handler).feed(client_bytes())
    head = next(value for kind, _, value in events if kind == "request")[0]  # type: ignore[index]
    assert head.header(b"cookie") == b"a=1; b=2"


def pump(a: H2Codec, b: H2Codec) -> None:
    """Move bytes both ways until neither side has any to send."""
    for _ in range(10_000):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return
        if out_a:
            b.feed(out_a)
        if out_b:
            a.feed(out_b)
    raise AssertionError("the codecs never settled")


SMALL = H2Settings(max_concurrent_streams=10, initial_stream_window=65535, connection_window=4 << 20)


def connected() -> tuple[H2Codec, list[Event], H2Codec, list[Event], CallbackEvents]:
    client_events, client_handler = recorder()
    server_events, server_handler = recorder()
    client = H2Codec(True, client_handler, SMALL)
    server = H2Codec(False, server_handler, SMALL)
    client.initiate()
    server.initiate()
    pump(client, server)
    return client, client_events, server, server_events, client_handler


def request(client: H2Codec, handler: CallbackEvents, events: list[Event], path: bytes, end: bool = False):  # noqa: ANN201
    stream = client.open_stream(handler)
    stream.events = CallbackEvents(handler.record, stream.id)
    client.send_headers(stream, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
                                 (b":path", path)], end)
    return stream


def server_stream(server: H2Codec, stream_id: int):  # noqa: ANN201
    return server.streams[stream_id]


def received(events: list[Event], stream_id: int) -> int:
    return sum(len(v) for k, s, v in events if k == "data" and s == stream_id)  # type: ignore[arg-type]


def test_a_paused_stream_stops_its_sender_and_not_its_neighbour() -> None:
    client, client_events, server, server_events, handler = connected()
    slow = request(client, handler, client_events, b"/slow")
    fast = request(client, handler, client_events, b"/fast")
    pump(client, server)
    server.pause(server_stream(server, slow.id))  # its consumer stopped taking data
    body = b"b" * (1 << 20)
    client.send_data(slow, body)
    client.send_data(fast, body)
    client.end_stream(fast)
    pump(client, server)
    assert received(server_events, fast.id) == len(body)  # the neighbour got all of it
    assert received(server_events, slow.id) <= 65535  # one stream window, no more
    assert ("blocked", slow.id, None) in client_events  # the sender's producer was told to pause
    assert slow.out_size >= len(body) - 65535  # the rest waits in the sender's queue, not in the receiver
    server.resume(server_stream(server, slow.id))
    client.end_stream(slow)
    pump(client, server)
    assert received(server_events, slow.id) == len(body)
    assert ("writable", slow.id, None) in client_events
    assert ("end", slow.id, None) in server_events


def test_response_trailers_reset_and_graceful_goaway() -> None:
    client, client_events, server, server_events, handler = connected()
    first = request(client, handler, client_events, b"/one", end=True)
    second = request(client, handler, client_events, b"/two", end=True)
    pump(client, server)
    one = server_stream(server, first.id)
    server.send_headers(one, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    server.send_data(one, b"\0\0\0\0\2hi")
    server.goaway()  # graceful: the streams already open go on
    server.end_stream(one, [(b"grpc-status", b"0")])
    client.reset(second)
    pump(client, server)
    assert summary(client_events) == [
        ("response", first.id, (200, [(b"content-type", b"application/grpc")], False)),
        ("data", first.id, b"\0\0\0\0\2hi"), ("trailers", first.id, [(b"grpc-status", b"0")]),
        ("goaway", 0, (second.id, 0)),  # written after what h2 had queued
    ]
    assert ("reset", second.id, (8, True)) in server_events  # CANCEL, from the peer
    late = request(client, handler, client_events, b"/late", end=True)  # above the GOAWAY's last stream id
    pump(client, server)
    assert ("reset", late.id, (7, True)) in client_events  # REFUSED_STREAM: never processed, retriable


def headers_frame(stream_id: int, block: bytes) -> bytes:
    import hyperframe.frame

    frame = hyperframe.frame.HeadersFrame(stream_id, block)
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    return frame.serialize()


def test_a_repeated_block_is_decoded_once_and_again_after_the_table_changes() -> None:
    """A block seen before that read dynamic entries decodes from the kept fields only while the decoder's table
    is as it was: the same octets after the table changed mean other fields (indexes move). A block that read no
    dynamic entry is kept whatever the table, and adds its entries again. Checked against hpack's own decoder,
    table included."""
    import hpack

    encoder, reference = hpack.Encoder(), hpack.Decoder()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    events, handler = recorder()
    codec = H2Codec(False, handler)
    codec.feed(conn.data_to_send())

    def fields(tag: bytes) -> list[tuple[bytes, ...]]:
        # all but x-tag from the static table or never indexed: x-tag's entries are the whole dynamic table
        return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc", True), (b":path", b"/"),
                (b"x-tag", tag)]

    def send(stream_id: int, block: bytes) -> tuple[object, ...]:
        expected = [(n, v) for n, v in reference.decode(block, raw=True) if not n.startswith(b":")]
        codec.feed(headers_frame(stream_id, block))
        head = next(value for kind, s, value in events if kind == "request" and s == stream_id)[0]  # type: ignore[index]
        assert head.headers == expected
        assert codec.decoder.table() == list(reference.header_table.dynamic_entries)
        return tuple(head.headers)

    literal = encoder.encode(fields(b"first"))  # static indexes and literals: x-tag added to the table
    send(1, literal)
    assert set(codec.known_blocks) == {literal}
    indexed = encoder.encode(fields(b"first"))  # every field indexed now: the same octets each time
    assert send(3, indexed) == ((b"x-tag", b"first"),)
    assert set(codec.known_blocks) == {literal, indexed}
    assert send(5, indexed) == ((b"x-tag", b"first"),)  # from the kept fields
    send(7, encoder.encode(fields(b"second")))  # a new entry: every dynamic index moves by one
    assert send(9, indexed) == ((b"x-tag", b"second"),)  # the same octets, decoded again in the new table
    for stream_id in (11, 13):  # kept: the same fields, and x-tag: first added again each time
        assert send(stream_id, literal) == ((b"x-tag", b"first"),)
    assert codec.decoder.table()[:2] == [(b"x-tag", b"first")] * 2


def test_heads_are_encoded_from_their_parts_with_http2s_field_rules() -> None:
    """send_request_head: the pseudo-header fields, the forwarded fields less those skipped and the
    connection-specific ones, `te` cut to `trailers` (as Envoy sanitizes it) or dropped, the proxy's blocks,
    content-length. send_response_head: `:status`, the fields, the blocks, `date` only when none came."""
    from meshproxy.messages import HeaderTemplate

    client, client_events, server, server_events, handler = connected()
    stream = client.open_stream(handler)
    stream.events = CallbackEvents(handler.record, stream.id)
    credentials = [(b"authorization", b"Bearer t"), (b"cookie", b"a=1"), (b"cookie", b"long=" + b"x" * 20)]
    forwarded = [(b"x-kept", b"1"), (b"x-skipped", b"2"), (b"connection", b"keep-alive"),
                 (b"te", b"trailers, deflate"), (b"X-Upper", b"3"), *credentials]
    added = [(HeaderTemplate((b"x-added", b"upgrade")), (b"4", b"websocket"))]
    # `te` among the names skipped (HTTP/1.1's `connection: te`): kept as `trailers` all the same, as Envoy does
    client.send_request_head(stream, b"POST", b"svc", b"/p", forwarded, frozenset({b"x-skipped", b"te"}), added, 2,
                             False)
    client.send_data(stream, b"ok")
    client.end_stream(stream)
    pump(client, server)
    head = next(value for kind, _, value in server_events if kind == "request")[0]  # type: ignore[index]
    assert (head.method, head.authority, head.path, head.content_length) == (b"POST", b"svc", b"/p", 2)
    assert head.headers == [(b"x-kept", b"1"), (b"te", b"trailers"), (b"x-upper", b"3"),
                            (b"authorization", b"Bearer t"), (b"x-added", b"4"), (b"content-length", b"2"),
                            (b"cookie", b"a=1; long=" + b"x" * 20)]
    # credentials and short cookies go never indexed (h2's rule): not in the decoder's table
    assert [entry for entry in server.decoder.table() if entry in credentials] == [credentials[2]]

    stream2 = client.open_stream(handler)
    stream2.events = CallbackEvents(handler.record, stream2.id)
    client.send_request_head(stream2, b"GET", b"svc", b"/", [(b"te", b"gzip")], frozenset(), [], -1, True)
    pump(client, server)
    head = [value for kind, _, value in server_events if kind == "request"][1][0]  # type: ignore[index]
    assert head.headers == []

    served = server.streams[stream.id]
    server.send_response_head(served, b"200", [(b"x-a", b"1"), (b"transfer-encoding", b"chunked")],
                              [(HeaderTemplate((b"x-b",)), (b"2",))], b"Sun, 06 Dec 2026 18:00:00 GMT", False)
    server.send_response_head(server.streams[stream2.id], b"204", [(b"date", b"Mon, 07 Dec 2026 00:00:00 GMT")],
                              [], b"Sun, 06 Dec 2026 18:00:00 GMT", True)
    pump(client, server)
    responses = {s: value for kind, s, value in client_events if kind == "response"}
    assert responses[stream.id] == (200, [(b"x-a", b"1"), (b"x-b", b"2"),
                                          (b"date", b"Sun, 06 Dec 2026 18:00:00 GMT")], False)
    assert responses[stream2.id] == (204, [(b"date", b"Mon, 07 Dec 2026 00:00:00 GMT")], True)
