"""The HTTP/1.1 codec alone, sans-IO: bytes in, events out, and heads out as bytes; no socket, no event loop."""

from __future__ import annotations

import pytest

from meshproxy.http1.client import CallbackHandler as ClientCallbacks
from meshproxy.http1.client import ClientCodec
from meshproxy.http1.errors import ProtocolError, Upgraded
from meshproxy.http1.head import HeadPolicy
from meshproxy.http1.server import CallbackHandler, ServerCodec
from meshproxy.http1.wire import request_head, response_head
from meshproxy.messages import HeaderTemplate, RequestHead, block_pairs, constant_block, template_of

TWO_REQUESTS = (b"POST /a?x=1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /b HTTP/1.1\r\nhost: svc:80\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")


def server_events(chunks: list[bytes], policy: HeadPolicy = HeadPolicy()) -> list[tuple[str, object]]:
    events: list[tuple[str, object]] = []

    def head(h: RequestHead) -> None:
        events.append(("head", (h.method, h.path, h.query, h.authority, h.content_length, h.chunked)))

    codec = ServerCodec(CallbackHandler(head, lambda data: events.append(("body", data)),
                                        lambda: events.append(("end", None))), policy)
    for chunk in chunks:
        codec.feed(chunk)
    return events


def merged(events: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Adjacent body events joined: how a stream splits its body is not the codec's promise."""
    out: list[tuple[str, object]] = []
    for kind, value in events:
        if kind == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + value)  # type: ignore[operator]
        else:
            out.append((kind, value))
    return out


def test_requests_parse_the_same_whatever_the_reads() -> None:
    whole = merged(server_events([TWO_REQUESTS]))
    assert whole == [("head", (b"POST", b"/a", b"x=1", b"svc", 5, False)), ("body", b"hello"), ("end", None),
                     ("head", (b"GET", b"/b", b"", b"svc:80", None, True)), ("body", b"abc"), ("end", None)]
    for cut in range(1, len(TWO_REQUESTS)):
        assert merged(server_events([TWO_REQUESTS[:cut], TWO_REQUESTS[cut:]])) == whole, cut
    assert merged(server_events([bytes([b]) for b in TWO_REQUESTS])) == whole


MIXED_VERSIONS = (b"GET /a HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\n\r\n"
                  b"POST /c HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\ncontent-length: 18\r\n\r\n"
                  b"GET / HTTP/1.1\r\n\r\n"
                  b"GET http://a/d HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n"
                  b"\r\nGET /e HTTP/1.1\r\nhost: a\r\n\r\n")


def test_each_request_has_its_own_version_whatever_the_reads() -> None:
    """The version is read from the request line when it arrived whole at the start of a read, else from
    httptools: both must agree, for pipelined requests, a body that looks like a request line, an absolute-form
    target and leading empty lines."""
    def versions(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
        seen: list[tuple[bytes, bytes]] = []
        codec = ServerCodec(CallbackHandler(lambda h: seen.append((h.target, h.version)), lambda _: None,
                                            lambda: None), HeadPolicy(accept_http10=True))
        for chunk in chunks:
            codec.feed(chunk)
        return seen

    expected = [(b"/a", b"1.0"), (b"/b", b"1.1"), (b"/c", b"1.0"), (b"http://a/d", b"1.0"), (b"/e", b"1.1")]
    assert versions([MIXED_VERSIONS]) == expected
    requests = MIXED_VERSIONS.split(b"\r\n\r\nGET")
    assert versions([requests[0] + b"\r\n\r\n"] + [b"GET" + r + b"\r\n\r\n" for r in requests[1:-1]]
                    + [b"GET" + requests[-1]]) == expected
    for cut in range(1, len(MIXED_VERSIONS)):
        assert versions([MIXED_VERSIONS[:cut], MIXED_VERSIONS[cut:]]) == expected, cut


@pytest.mark.parametrize(("data", "status", "detail"), [
    (b"GET / HTTP/1.1\r\nhost: a\r\nx: " + b"v" * 70_000 + b"\r\n\r\n", 431, "http1.headers_too_large"),
    (b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n20\r\n" + b"x" * 32 + b"\r\n", 413,
     "request_payload_too_large"),
    (b"GET / HTTP/1.1\r\nhost: a\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n", 403, "upgrade_failed"),
    (b"POST / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", 403, "upgrade_failed"),
    (b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n", 403, "http1.connect_not_supported"),
    (b"GET / HTTP/1.1\r\nhost: \r\n\r\n", 400, "http1.invalid_authority"),
    (b"G\x00T / HTTP/1.1\r\n\r\n", 400, "http1.invalid_method"),
    (b"GET / HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n", 400, "http1.codec_error"),
])
def test_what_is_wrong_is_one_protocol_error_with_envoys_status(data: bytes, status: int, detail: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        server_events([data], HeadPolicy(max_body_bytes=16))
    assert (caught.value.status, caught.value.detail) == (status, detail)


def test_a_bodiless_h2c_upgrade_is_served_as_http11_and_parsing_goes_on() -> None:
    data = (b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n"
            b"http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /y HTTP/1.1\r\nhost: a\r\n\r\n")
    paths = [value[1] for kind, value in server_events([data]) if kind == "head"]  # type: ignore[index]
    assert paths == [b"/x", b"/y"]


def client(data: list[bytes], head_only: bool = False) -> tuple[ClientCodec, list[tuple[str, object]]]:
    events: list[tuple[str, object]] = []

    def head(status: int, headers: list[tuple[bytes, bytes]], length: int | None, end_stream: bool) -> None:
        events.append(("head", (status, dict(headers), length, end_stream)))

    codec = ClientCodec(ClientCallbacks(head, lambda data: events.append(("body", data)),
                                        lambda: events.append(("end", None))))
    codec.expect(head_only)
    for chunk in data:
        codec.feed(chunk)
    return codec, merged(events)


def test_a_response_after_an_interim_one_parses_the_same_whatever_the_reads() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    _, whole = client([data])
    assert whole == [("head", (200, {b"content-type": b"text/plain", b"transfer-encoding": b"chunked"}, None,
                               False)), ("body", b"hello"), ("end", None)]
    for cut in range(1, len(data)):
        assert client([data[:cut], data[cut:]])[1] == whole, cut


def test_head_204_and_close_delimited_bodies_end_where_http_says() -> None:
    codec, events = client([b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"], head_only=True)
    assert events == [("head", (200, {b"content-length": b"99"}, 0, True)), ("end", None)] and codec.keep_alive
    codec, events = client([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert events == [("head", (204, {}, 0, True)), ("end", None)]
    codec, events = client([b"HTTP/1.1 200 OK\r\n\r\nuntil the close"])
    assert events == [("head", (200, {}, None, False)), ("body", b"until the close")] and not codec.keep_alive
    assert codec.close()  # the close ends that body: the response is complete


def test_bytes_nobody_asked_for_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as caught:
        client([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"])
    assert caught.value.status == 502


def test_added_header_blocks_are_written_as_lines_with_any_bytes_in_their_values() -> None:
    """A template is encoded once as a %-format: a `%` in a fixed or a per-request value is written as it is."""
    per_request = HeaderTemplate((b"x-a", b"x-b"))
    fixed = constant_block(((b"x-c", b"100%"), (b"x-d", b"%s%%")))
    blocks = [(per_request, (b"50%", b"%b")), *fixed, (per_request, (b"1", b"2"))]
    out = request_head(b"GET", b"/", b"svc", [], frozenset(), blocks, None, False)
    assert out == (b"GET / HTTP/1.1\r\nhost: svc\r\nx-a: 50%\r\nx-b: %b\r\nx-c: 100%\r\nx-d: %s%%\r\n"
                   b"x-a: 1\r\nx-b: 2\r\n\r\n")
    assert block_pairs(blocks) == [(b"x-a", b"50%"), (b"x-b", b"%b"), (b"x-c", b"100%"), (b"x-d", b"%s%%"),
                                   (b"x-a", b"1"), (b"x-b", b"2")]
    assert template_of((b"x-a", b"x-b")) is template_of((b"x-a", b"x-b"))  # one template per set of names
    assert constant_block(()) == ()


def test_heads_out_drop_hop_by_hop_headers_regenerate_framing_and_add_a_missing_date() -> None:
    out = response_head(200, [(b"connection", b"x"), (b"transfer-encoding", b"chunked"), (b"x-a", b"1")],
                        [(HeaderTemplate((b"x-b",)), (b"2",))], None, True, False)
    lines = out.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and b"x-a: 1" in lines and b"x-b: 2" in lines
    assert b"transfer-encoding: chunked" in lines and b"connection: x" not in lines
    assert sum(line.startswith(b"date: ") for line in lines) == 1 and out.endswith(b"\r\n\r\n")
    dated = response_head(304, [(b"date", b"Tue, 01 Dec 2026 00:00:00 GMT")], [], None, False, True)
    assert dated.count(b"date: ") == 1 and b"connection: close" in dated
    client = [(b"host", b"svc"), (b"x-a", b"1"), (b"connection", b"close"), (b"x-b", b"2")]
    assert request_head(b"GET", b"/p?q", b"svc", client, frozenset({b"host", b"connection"}),
                        [(HeaderTemplate((b"x-c",)), (b"3",))],
                        None, False) == b"GET /p?q HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\nx-b: 2\r\nx-c: 3\r\n\r\n"
    assert request_head(b"POST", b"/", b"svc", [], frozenset(), [], 3, False).endswith(b"content-length: 3\r\n\r\n")
    assert request_head(b"POST", b"/", b"svc", [], frozenset(), [], None, True).endswith(
        b"transfer-encoding: chunked\r\n\r\n")


def test_a_websocket_upgrade_is_reported_then_the_rest_is_the_tunnels() -> None:
    data = (b"GET /chat HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n\x81\x02hi")
    with pytest.raises(Upgraded) as caught:
        server_events([data])
    assert caught.value.rest == b"\x81\x02hi"


def test_a_101_to_an_upgrade_ends_the_head_and_the_codec_hands_over() -> None:
    events: list[tuple[str, object]] = []
    codec = ClientCodec(ClientCallbacks(lambda *head: events.append(("head", head[0])),
                                        lambda data: events.append(("body", data)),
                                        lambda: events.append(("end", None))))
    codec.expect(False)
    with pytest.raises(Upgraded) as caught:
        codec.feed(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x00")
    assert events == [("head", 101)]  # no end: the tunnel ends when the upstream closes
    assert caught.value.rest == b"\x81\x00"
    codec.expect(False)
    codec.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # 100 stays interim
    assert events[1:] == [("head", 200), ("end", None)]
