"""R4, R5, R12 over real sockets: request limits and timeouts set from the command line, slow clients,
and the downstream connection cap. (The exact boundaries are unit-tested in tests/unit/test_http1_*.)"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import BACKEND_VS, ProxyProcess, Upstream, service_entry, write_config
from waiting import wait_until

SOAK = os.environ.get("MESHPROXY_SOAK") == "1"
VS = BACKEND_VS
# Upper bounds on "closed by a 1-1.5 s timeout": far above the timeout (a loaded two-core machine may run the
# proxy's timer seconds late), far below what the client would otherwise wait (READ), so a missing timeout fails.
LATE = 10.0
READ = 20.0


def config(folder: Path, upstream: Upstream) -> Path:
    return write_config(folder, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80), VS)


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[Upstream]:
    server = Upstream("backend")
    yield server
    server.close()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, module_upstream: Upstream) -> Iterator[ProxyProcess]:
    p = ProxyProcess(config(tmp_path_factory.mktemp("limited"), module_upstream),
                     args=["--request-headers-timeout", "1", "--idle-timeout", "1.5", "--max-request-body", "1000",
                           "--headers-with-underscores", "drop", "--max-request-headers-count", "20",
                           "--max-request-headers-kb", "8"])
    yield p
    assert p.stop() == 0, p.log


def read_all(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until the peer closes -> (bytes, 'close' | 'reset' | 'timeout')."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return data, "timeout"
        except ConnectionResetError:
            return data, "reset"
        if not piece:
            return data, "close"
        data += piece


def get(port: int, path: str = "/echo", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": "backend", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_options_reach_the_listener(limited: ProxyProcess, module_upstream: Upstream) -> None:
    status, body = get(limited.port, headers={"X_User": "admin", "X-Ok": "1"})
    assert status == 200
    names = [n.lower() for n, _ in json.loads(body)["headers"]]
    assert "x_user" not in names and "x-ok" in names  # --headers-with-underscores drop
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(20))
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n" + many + b"\r\n")
        data, how = read_all(sock, 5)
    assert data.startswith(b"HTTP/1.1 431") and how == "close"
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n")
        assert read_all(sock, 5)[0].startswith(b"HTTP/1.1 431")


def test_body_limit_413_declared_and_streamed(limited: ProxyProcess, module_upstream: Upstream) -> None:
    before = len(module_upstream.requests)
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: backend\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        data, how = read_all(sock, 5)
    assert data.startswith(b"HTTP/1.1 413") and b"connection: close" in data and how == "close"
    assert len(module_upstream.requests) == before  # a declared length over the limit never leaves the proxy
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            sock.sendall(b"190\r\n" + b"y" * 400 + b"\r\n")  # 1600 bytes in all: over the 1000 limit
        data, how = read_all(sock, 5)
    assert data.startswith(b"HTTP/1.1 413") and how == "close", data  # streamed: cut off at the limit
    assert get(limited.port, "/echo")[0] == 200


def test_request_headers_timeout_408_then_close(limited: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: back")
        data, how = read_all(sock, READ)
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408") and how == "close"
    assert 0.8 < elapsed < LATE
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:  # sends nothing at all
        started = time.monotonic()
        data, how = read_all(sock, READ)
    assert (data, how) == (b"", "close") and 0.8 < time.monotonic() - started < LATE


def test_idle_keep_alive_connection_closes(limited: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: backend\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        data, how = read_all(sock, READ)
    assert how == "close" and not data.startswith(b"HTTP")  # closed without a reply
    assert 1.0 < time.monotonic() - started < LATE


def test_slow_header_clients_are_cut_off_and_others_are_served(limited: ProxyProcess) -> None:
    """R5 (short): slow-header connections dribbling bytes are closed by the header timeout (408),
    while a normal client keeps getting answers; the proxy's memory stays bounded."""
    count = 500 if SOAK else 50
    rss = psutil.Process(limited.proc.pid)
    get(limited.port)
    base = rss.memory_info().rss
    socks = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(count)]
    outcomes: list[tuple[bytes, str, float]] = []
    lock = threading.Lock()

    def dribble(sock: socket.socket) -> None:
        started = time.monotonic()
        try:
            for byte in b"GET / HTTP/1.1\r\nHost: backend\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
        except OSError:
            pass
        data, how = read_all(sock, READ)
        with lock:
            outcomes.append((data, how, time.monotonic() - started))

    threads = [threading.Thread(target=dribble, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    errors = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # a normal client meanwhile
        try:
            errors += get(limited.port)[0] != 200
        except OSError:
            errors += 1
    for t in threads:
        t.join(60)
    for s in socks:
        s.close()
    assert errors == 0
    assert len(outcomes) == count
    assert all(data.startswith(b"HTTP/1.1 408") for data, _, _ in outcomes), outcomes[:3]
    assert all(how in ("close", "reset") for _, how, _ in outcomes)  # reset: the client kept writing
    # cut off by the 1 s header timeout, long before the ~30 s the dribbled head would take to finish
    assert max(elapsed for _, _, elapsed in outcomes) < LATE
    assert rss.memory_info().rss - base < 50 * 1024 * 1024


def test_connection_cap_closes_the_excess_at_accept(tmp_path: Path, module_upstream: Upstream) -> None:
    """R12: N open connections; more are closed at once; the open ones keep working."""
    cap = 20
    p = ProxyProcess(config(tmp_path, module_upstream), args=["--max-connections", str(cap)])
    try:
        held = []
        for _ in range(cap - 1):  # the harness's readiness check does not hold a connection
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            conn.request("GET", "/echo", headers={"Host": "backend"})
            assert conn.getresponse().read()
            held.append(conn)
        last = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        last.request("GET", "/echo", headers={"Host": "backend"})
        assert last.getresponse().read()
        held.append(last)
        refused = 0
        for _ in range(cap + 10):
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
                try:
                    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: backend\r\n\r\n")
                except OSError:
                    pass
                data, how = read_all(sock, 5)
                refused += data == b"" and how in ("close", "reset")
        assert refused == cap + 10
        for conn in held:  # the connections already open are not touched
            conn.request("GET", "/echo", headers={"Host": "backend"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
        for conn in held[:5]:
            conn.close()
        def room_again() -> bool:  # once the proxy has seen the five closes
            try:
                return get(p.port)[0] == 200
            except OSError:  # still full: closed at accept
                return False
        wait_until(room_again, what="a connection accepted again after five closed", interval=0.1)
        for conn in held[5:]:
            conn.close()
    finally:
        assert p.stop() == 0, p.log
