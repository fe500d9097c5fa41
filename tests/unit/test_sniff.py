"""Protocol detection from first bytes (proxy/sniff.py), against real ClientHellos made by Python's ssl module."""

from __future__ import annotations

import ssl

import pytest

from meshproxy.proxy import sniff


def client_hello(server_name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real TLS client (OpenSSL through ssl.MemoryBIO), never sent anywhere."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(("data", "kind"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", sniff.HTTP1),
    (b"POST /x?y=1 HTTP/1.0\r\n", sniff.HTTP1),
    (b"M-SEARCH * HTTP/1.1\r\n", sniff.HTTP1),
    (b"GET / HTTP/1.1\n", sniff.HTTP1),
    (b"GET / HT", sniff.NEED_MORE),
    (b"GE", sniff.NEED_MORE),
    (sniff.H2_PREFACE + b"\x00\x00", sniff.HTTP2),
    (sniff.H2_PREFACE[:10], sniff.NEED_MORE),
    (b"PRI * HTTP/2.1\r\n", sniff.TCP),  # not the preface, not HTTP/1.x
    (b"\x16\x03\x01\x02\x00", sniff.TLS),
    (b"\x16", sniff.NEED_MORE),
    (b"\x16\x02\x00", sniff.TCP),
    (b"*1\r\n$4\r\nPING\r\n", sniff.TCP),  # Redis
    (b"\x00\x00\x00\x10hello", sniff.TCP),  # a binary protocol
    (b"get / HTTP/1.1\r\n", sniff.TCP),  # methods are upper case
    (b"GET / SMTP/1.0\r\n", sniff.TCP),
    (b"HELLO there, this is not HTTP\r\n", sniff.TCP),
    (b"GET " + b"a" * 9000, sniff.TCP),  # no line end within 8 KiB
])
def test_classify(data: bytes, kind: int) -> None:
    assert sniff.classify(data) == kind


def test_classify_is_independent_of_read_boundaries() -> None:
    data = b"DELETE /items/7 HTTP/1.1\r\nHost: x\r\n\r\n"
    kinds = [sniff.classify(data[:n]) for n in range(1, len(data) + 1)]
    decided = [k for k in kinds if k != sniff.NEED_MORE]
    assert decided and set(decided) == {sniff.HTTP1}


def test_server_name_of_a_real_client_hello() -> None:
    hello = client_hello("Api.Example.COM")
    assert sniff.classify(hello) == sniff.TLS
    assert sniff.client_hello_complete(hello)
    assert sniff.server_name(hello) == "api.example.com"


def test_client_hello_without_sni_and_cut_short() -> None:
    hello = client_hello(None)
    assert sniff.client_hello_complete(hello)
    assert sniff.server_name(hello) == ""
    named = client_hello("db.internal")
    for cut in (5, 40, len(named) - 1):
        assert not sniff.client_hello_complete(named[:cut])
        assert sniff.server_name(named[:cut]) == ""


def test_client_hello_split_over_two_records() -> None:
    """A ClientHello may span TLS records; the handshake bytes are joined before the SNI is read."""
    hello = client_hello("split.example.org")
    body = hello[5:]
    first, second = body[:30], body[30:]
    records = (b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first +
               b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second)
    assert sniff.client_hello_complete(records)
    assert sniff.server_name(records) == "split.example.org"


@pytest.mark.parametrize("seed", range(20))
def test_malformed_hellos_never_raise(seed: int) -> None:
    import random

    rng = random.Random(seed)
    hello = bytearray(client_hello("x.example.com"))
    for _ in range(8):
        hello[rng.randrange(5, len(hello))] = rng.randrange(256)
    assert isinstance(sniff.server_name(bytes(hello)), str)
    assert isinstance(sniff.alpn(bytes(hello)), tuple)


def test_alpn_of_a_real_client_hello() -> None:
    offered = ("istio-peer-exchange", "istio", "istio-h2", "h2")
    hello = client_hello("outbound_.9080_._.reviews.default.svc.cluster.local", offered)
    assert sniff.alpn(hello) == offered
    assert sniff.server_name(hello) == "outbound_.9080_._.reviews.default.svc.cluster.local"
    assert sniff.alpn(client_hello(None)) == ()
    assert sniff.alpn(hello[:-10]) == ()  # incomplete
