"""Invariant under hostile HTTP/2 input: whatever follows the preface (real frames from h2, mutated at random with
a fixed seed), the proxy never logs an error or a traceback, and keeps serving other connections."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import h2.config
import h2.connection

from h2peer import H2Peer
from harness import BACKEND_VS, ProxyProcess, Upstream, service_entry, write_config

CASES = 150


def valid_bytes() -> bytes:
    """A client's preface, SETTINGS, a GET and a POST with a body and trailers, as h2 writes them."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"backend"),
                          (b":path", b"/echo")], end_stream=True)
    conn.send_headers(3, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"backend"),
                          (b":path", b"/upload")])
    conn.send_data(3, b"x" * 3000)
    conn.send_headers(3, [(b"x-t", b"1")], end_stream=True)
    conn.ping(b"abcdefgh")
    conn.reset_stream(1)
    return conn.data_to_send()


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    preface = 24  # the magic stays: mutating it is the HTTP/1.1 codec's business
    for _ in range(rng.randrange(1, 8)):
        if len(out) <= preface + 1:
            break
        choice = rng.randrange(4)
        at = rng.randrange(preface, len(out))
        if choice == 0:
            out[at] = rng.randrange(256)
        elif choice == 1:
            del out[at:at + rng.randrange(1, 20)]
        elif choice == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        else:
            out = out[:at]
    return bytes(out)


def test_mutated_frames_never_break_the_proxy(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml",
                                      service_entry("backend", [(upstream.port, {})], port=80), BACKEND_VS))
    rng = random.Random(1234)
    base = valid_bytes()
    try:
        for _ in range(CASES):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                try:
                    sock.sendall(mutate(base, rng))
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except (ConnectionResetError, BrokenPipeError, TimeoutError):
                    pass
        peer = H2Peer(proxy.port)
        try:
            assert peer.finished(peer.request("/echo")).status == 200
        finally:
            peer.close()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log and " ERROR " not in proxy.log, proxy.log[-3000:]


def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off(tmp_path: Path, upstream: Upstream) -> None:
    """A client that sends PINGs and reads nothing: the proxy's answers fill the socket, then its buffer, then the
    connection ends (Envoy's outbound control-frame bound) instead of the proxy holding every ack; the proxy keeps
    serving. The client's receive buffer is small so that the proxy's side fills after a few thousand acks."""
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml",
                                      service_entry("backend", [(upstream.port, {})], port=80), BACKEND_VS))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    preface = conn.data_to_send()
    conn.ping(b"abcdefgh")
    ping = conn.data_to_send()
    cut = False
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", proxy.port))
            sock.sendall(preface)
            try:  # at most 2,000 x 1,000 PINGs (34 MB of acks unread): the kernel's buffers hold a few MB
                for _ in range(2000):
                    sock.sendall(ping * 1000)
            except (ConnectionResetError, BrokenPipeError):
                cut = True
            while not cut:  # the proxy may still be reading what was sent: its end shows as EOF or a reset
                try:
                    cut = not sock.recv(1 << 20)
                except ConnectionResetError:
                    cut = True
        assert cut, "the proxy never cut off a client that floods PINGs and never reads"
        peer = H2Peer(proxy.port)
        try:
            assert peer.finished(peer.request("/echo")).status == 200
        finally:
            peer.close()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log and " ERROR " not in proxy.log, proxy.log[-3000:]
