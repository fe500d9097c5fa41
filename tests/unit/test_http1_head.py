"""Request head validation beyond httptools: table-driven, pure (no sockets)."""

from __future__ import annotations

import random

import pytest

from meshproxy.http1.errors import ProtocolError
from meshproxy.http1.head import (
    ENVOY_CONTROL_HEADERS,
    ENVOY_PREFIX,
    HeadPolicy,
    build_request_head,
    remove_dot_segments,
    split_target,
    valid_authority,
)

HOST = (b"host", b"svc")


def head(*headers: tuple[bytes, bytes], target: bytes = b"/", method: bytes = b"GET", version: str = "1.1",
         policy: HeadPolicy = HeadPolicy()):
    return build_request_head(method, target, list(headers), version, True, policy)


def refused(*headers: tuple[bytes, bytes], **kw) -> tuple[int, str]:
    with pytest.raises(ProtocolError) as info:
        head(*headers, **kw)
    return info.value.status, info.value.detail


# ---- framing: one Content-Length or one final chunked, nothing else


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"content-length", b"5")], (5, False)),
        ([(b"content-length", b"0")], (0, False)),
        ([(b"content-length", b"007")], (7, False)),
        ([(b"content-length", b"5 \t")], (5, False)),  # trailing OWS is not part of the value
        ([(b"transfer-encoding", b"chunked")], (None, True)),
        ([(b"transfer-encoding", b"CHUNKED")], (None, True)),
        ([(b"transfer-encoding", b"chunked ")], (None, True)),
        ([], (None, False)),
    ],
)
def test_accepted_framing_is_reduced_to_two_fields(headers, expected) -> None:
    h = head(HOST, *headers)
    assert (h.content_length, h.chunked) == expected


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"transfer-encoding", b"identity"), (b"transfer-encoding", b"chunked")], 501),
        ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 501),
        ([(b"transfer-encoding", b",chunked")], 501),
        ([(b"transfer-encoding", b"gzip, chunked")], 501),
        ([(b"transfer-encoding", b"chunked, gzip")], 501),
        ([(b"transfer-encoding", b"xchunked")], 501),
        ([(b"transfer-encoding", b"chunked;q=1")], 501),
        ([(b"transfer-encoding", b"")], 501),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], 400),
        ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
        ([(b"content-length", b"3"), (b"content-length", b"3")], 400),
        ([(b"content-length", b"3"), (b"content-length", b"4")], 400),
        ([(b"content-length", b"+3")], 400),
        ([(b"content-length", b"-1")], 400),
        ([(b"content-length", b"0x5")], 400),
        ([(b"content-length", b"")], 400),
        ([(b"content-length", b"1, 1")], 400),
        ([(b"content-length", "\u0663".encode())], 400),  # a non-ASCII digit is no digit here
    ],
)
def test_smuggling_shapes_are_refused(headers, status) -> None:
    assert refused(HOST, *headers)[0] == status


HTTP10 = HeadPolicy(accept_http10=True)


def test_http_1_0_gets_426_unless_accepted_as_istio_default() -> None:
    assert refused(HOST, version="1.0") == (426, "http1.http10_not_supported")
    assert head(HOST, version="1.0", policy=HTTP10).version == b"1.0"


def test_transfer_encoding_on_http_1_0_is_faulty_framing() -> None:
    assert refused(HOST, (b"transfer-encoding", b"chunked"), version="1.0", policy=HTTP10) == \
        (400, "http1.invalid_transfer_encoding")


# ---- request line


@pytest.mark.parametrize(("version", "status"), [("2.0", 505), ("0.9", 400), ("1.2", 400), ("3.0", 400)])
def test_versions_other_than_1_0_and_1_1(version: str, status: int) -> None:
    assert refused(HOST, version=version)[0] == status


def test_http_1_0_without_host_is_accepted_with_an_empty_authority() -> None:
    h = head(version="1.0", policy=HTTP10)
    assert h.authority == b"" and h.version == b"1.0"


def test_asterisk_form_only_for_options() -> None:
    assert head(HOST, target=b"*", method=b"OPTIONS").path == b"*"
    assert refused(HOST, target=b"*")[0] == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a/./b/../c?x=1#frag", (None, b"/a/c", b"x=1")),
        (b"http://Backend:8080/p?q", (b"Backend:8080", b"/p", b"q")),
        (b"http://backend?q", (b"backend", b"/", b"q")),
        (b"HTTP://backend", (b"backend", b"/", b"")),
        (b"/..", (None, b"/", b"")),
    ],
)
def test_split_target(target: bytes, expected) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", [b"https://backend/", b"ftp://x/", b"http://user@backend/", b"http:///x",
                                    b"http://a b/", b"backend:80"])
def test_bad_targets(target: bytes) -> None:
    assert refused(HOST, target=target)[0] == 400


def test_absolute_form_authority_wins_over_host() -> None:
    assert head((b"host", b"ignored"), target=b"http://backend/x").authority == b"backend"


# ---- Host


@pytest.mark.parametrize("value", [b"svc", b"svc:80", b"SVC.default.svc.cluster.local:9080", b"[::1]:80", b"[::1]",
                                   b"10.0.0.1", b"a-b_c~d", b"svc:"])
def test_valid_hosts(value: bytes) -> None:
    assert valid_authority(value)
    assert head((b"host", value)).authority == value


def test_an_empty_host_is_400_beside_an_origin_form_target() -> None:
    """RFC 9112 3.2: an empty Host goes only with a target whose authority is empty; routing an empty name is not
    what the client meant."""
    with pytest.raises(ProtocolError) as caught:
        head((b"host", b""))
    assert (caught.value.status, caught.value.detail) == (400, "http1.invalid_authority")


@pytest.mark.parametrize("value", [b"a b", b"a/b", b"a@b", b"a?b", b"a#b", b"a\\b", b"a:b", b"a:80:80", b"[::1",
                                   b"::1", b"a]", b"\xc3\xa9", b"a:1234567", b"a\tb"])
def test_invalid_hosts_are_400(value: bytes) -> None:
    assert not valid_authority(value)
    assert refused((b"host", value)) == (400, "http1.invalid_authority")


def test_missing_and_duplicate_host() -> None:
    assert refused() == (400, "http1.missing_host_header")
    assert refused(HOST, HOST) == (400, "http1.duplicate_host")
    assert refused(HOST, (b"host", b"other")) == (400, "http1.duplicate_host")


# ---- header names with underscores, edge stripping, values


def test_underscore_actions() -> None:
    line = (b"x_forwarded_user", b"admin")
    assert refused(HOST, line) == (400, "http1.unexpected_underscore")  # the default: Envoy's edge advice
    assert head(HOST, line, policy=HeadPolicy(underscores="allow")).header(b"x_forwarded_user") == b"admin"
    dropped = head(HOST, line, (b"x-ok", b"1"), policy=HeadPolicy(underscores="drop"))
    assert dropped.headers == [HOST, (b"x-ok", b"1")]
    # dropping happens before framing is read: an underscore twin of content-length frames nothing
    assert head(HOST, (b"content_length", b"5"), policy=HeadPolicy(underscores="drop")).content_length is None
    with pytest.raises(ValueError):
        HeadPolicy(underscores="ignore")


def test_inbound_strips_envoy_control_headers_and_keeps_the_rest() -> None:
    policy = HeadPolicy(strip_names=ENVOY_CONTROL_HEADERS)
    h = head(HOST, (b"x-envoy-retry-on", b"5xx"), (b"x-envoy-upstream-rq-timeout-ms", b"1"),
             (b"x-envoy-force-trace", b"1"), (b"x-envoy-attempt-count", b"2"), (b"x-envoy-peer-metadata-id", b"p"),
             policy=policy)
    assert [n for n, _ in h.headers] == [b"host", b"x-envoy-attempt-count", b"x-envoy-peer-metadata-id"]


def test_gateway_strips_every_envoy_header() -> None:
    h = head(HOST, (b"x-envoy-anything", b"1"), (b"x-envoy-peer-metadata", b"m"), (b"x-envoyish", b"kept"),
             policy=HeadPolicy(strip_prefix=ENVOY_PREFIX))
    assert [n for n, _ in h.headers] == [b"host", b"x-envoyish"]


def test_values_are_kept_byte_for_byte_except_trailing_whitespace() -> None:
    h = head(HOST, (b"x-a", b"a\x85b\xa0"), (b"x-b", b"in  side\tkept \t"), (b"x-c", b""))
    assert h.headers[1:] == [(b"x-a", b"a\x85b\xa0"), (b"x-b", b"in  side\tkept"), (b"x-c", b"")]


def test_connection_tokens_and_expect() -> None:
    h = head(HOST, (b"connection", b"keep-alive, X-Private ,"), (b"expect", b"100-Continue"),
             (b"content-length", b"1"))
    assert h.connection_tokens == frozenset({b"keep-alive", b"x-private"})
    assert h.expect_continue


def test_declared_body_over_the_limit_is_413_before_any_byte() -> None:
    policy = HeadPolicy(max_body_bytes=100)
    assert head(HOST, (b"content-length", b"100"), policy=policy).content_length == 100
    assert refused(HOST, (b"content-length", b"101"), policy=policy) == (413, "request_payload_too_large")
    assert head(HOST, (b"transfer-encoding", b"chunked"), policy=policy).chunked  # counted while streaming


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 as written: the input buffer, rules A to E."""
    output = ""
    while path:
        if path.startswith(("../", "./")):
            path = path[path.index("/") + 1:]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3 if path.startswith("/./") else 2:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4 if path.startswith("/../") else 3:]
            output = output[:output.rfind("/")] if "/" in output else ""
        elif path in (".", ".."):
            path = ""
        else:
            end = path.find("/", 1)
            end = len(path) if end < 0 else end
            output, path = output + path[:end], path[end:]
    return output


def test_dot_segments_are_removed_as_rfc3986_says_short_and_long_paths() -> None:
    """Paths around the 64 octets where the scan for "/." changes method, against the RFC's own algorithm."""
    rng = random.Random(3986)
    pieces = ["a", "bc", ".", "..", ".x", "x.", "...", "pkg.Service", "Method"]
    for _ in range(3000):
        path = "/" + "/".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        path = path[:rng.choice([len(path), 63, 64, 65, 66])] or "/"
        assert remove_dot_segments(path.encode()).decode() == rfc3986_remove_dot_segments(path), path
