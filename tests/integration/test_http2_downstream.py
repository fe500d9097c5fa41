"""HTTP/2 cleartext from clients (prior knowledge) to an HTTP/1.1 upstream: curl, h2load, and an h2-library peer
that steers windows and resets; each stream runs through the unchanged exchange."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from h2peer import H2Peer
from harness import BACKEND_VS, PeakRss, ProxyProcess, Upstream, service_entry, write_config
from waiting import wait_until

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")


@pytest.fixture
def proxy(tmp_path: Path, upstream: Upstream):
    p = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                  BACKEND_VS))
    yield p
    p.stop()


def curl(port: int, path: str, *args: str, out: Path) -> tuple[str, str]:
    result = subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "-o", str(out), "-D", "-",
                             "-w", "%{http_code} %{http_version}", "-H", "host: backend", *args,
                             f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.rsplit("\n", 1)[-1], result.stdout


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_prior_knowledge_get_post_and_a_large_streamed_body(proxy: ProxyProcess, upstream: Upstream,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, head = curl(proxy.port, "/echo", out=out)
    assert status == "200 2"
    assert "x-upstream: backend" in head and "\ndate: " in head and "transfer-encoding" not in head
    body = bytes(range(256)) * 4096  # 1 MiB request body, no content-length known upstream: streamed
    (tmp_path / "in").write_bytes(body)
    status, _ = curl(proxy.port, "/upload", "--data-binary", f"@{tmp_path / 'in'}", out=out)
    assert status == "200 2"
    assert hashlib.sha256(body).hexdigest() in out.read_text()
    status, _ = curl(proxy.port, "/stream?size=20000000&chunk=100000", out=out)  # 20 MB, chunked upstream
    assert status == "200 2" and out.stat().st_size == 20_000_000
    logged = proxy.access_entries(3)
    assert [e["protocol"] for e in logged] == ["HTTP/2"] * 3
    assert [e["response_flags"] for e in logged] == ["-"] * 3
    assert [r["method"] for r in upstream.requests] == ["GET", "POST", "GET"]


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_no_route_is_a_404_on_the_stream(proxy: ProxyProcess, tmp_path: Path) -> None:
    result = subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                             "-H", "host: nowhere", f"http://127.0.0.1:{proxy.port}/"], capture_output=True,
                            text=True, timeout=30)
    assert result.stdout == "404"
    assert proxy.access_entries(1)[0]["response_flags"] == "NR"


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_many_streams_per_connection_all_succeed(proxy: ProxyProcess, upstream: Upstream) -> None:
    result = subprocess.run([H2LOAD, "-n", "400", "-c", "2", "-m", "50", "-H", ":authority: backend",
                             f"http://127.0.0.1:{proxy.port}/echo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", result.stdout)
    assert done is not None, result.stdout
    assert done.groups() == ("400", "400", "400", "400", "0"), result.stdout
    assert "status codes: 400 2xx" in result.stdout
    assert len(upstream.requests) == 400


def test_a_stalled_stream_does_not_stall_its_neighbour(proxy: ProxyProcess) -> None:
    """Stream 1's window is held shut by the client; stream 3 on the same connection completes meanwhile, and
    stream 1 completes once its window opens: per-stream flow control, nothing buffered whole in between."""
    peer = H2Peer(proxy.port, window=65535)
    try:
        peer.held.add(1)
        slow = peer.request("/bytes?size=8000000")
        fast = peer.request("/bytes?size=3000000")
        assert fast == 3 and slow == 1
        done = peer.finished(fast)
        assert done.status == 200 and len(done.body) == 3_000_000
        stalled = peer.streams[slow]
        assert not stalled.ended and len(stalled.body) <= 65535  # one stream window, not more
        peer.release(slow)
        peer.wait(lambda: stalled.ended)
        assert len(stalled.body) == 8_000_000
    finally:
        peer.close()


def test_request_trailers_end_the_request_toward_an_http1_upstream(proxy: ProxyProcess, upstream: Upstream) -> None:
    """HTTP/1.1 upstreams get no trailers (Envoy's default, enable_trailers off); the request still ends."""
    peer = H2Peer(proxy.port)
    try:
        stream = peer.request("/upload", method="POST", body=b"a" * 100_000, trailers=[("x-checksum", "1")])
        got = peer.finished(stream)
        assert got.status == 200 and b'"size": 100000' in bytes(got.body)
    finally:
        peer.close()


def test_client_reset_is_flagged_DR_and_ping_is_answered(proxy: ProxyProcess, upstream: Upstream) -> None:
    peer = H2Peer(proxy.port)
    try:
        peer.ping()
        peer.wait(lambda: peer.pings == 1)
        stream = peer.request("/slow?delay=5")
        wait_until(lambda: len(upstream.requests) == 1, what="the request upstream")
        peer.reset(stream)
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_flags"] == "DR"
        assert entry["response_code"] == 0
        assert entry["response_code_details"] == "http2.remote_reset"
        again = peer.request("/echo")  # the connection serves on
        assert peer.finished(again).status == 200
    finally:
        peer.close()


def test_drain_sends_goaway_with_the_last_stream_and_finishes_it(proxy: ProxyProcess, upstream: Upstream) -> None:
    peer = H2Peer(proxy.port)
    try:
        first = peer.request("/echo")
        peer.finished(first)
        inflight = peer.request("/slow?delay=1")
        wait_until(lambda: len(upstream.requests) == 2, what="the slow request upstream")
        proxy.proc.send_signal(signal.SIGTERM)
        peer.wait(lambda: peer.goaway is not None)
        assert peer.goaway.last_stream_id == inflight
        got = peer.finished(inflight)
        assert got.status == 200 and bytes(got.body) == b"slow done"
    finally:
        peer.close()
    assert proxy.proc.wait(15) == 0


BIG = 128 * 1024 * 1024
RSS_BOUND = 48 * 1024 * 1024  # a 16 MiB stream window and buffers, far below the 128 MiB that flows


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_a_large_http2_upload_to_http1_keeps_memory_flat(proxy: ProxyProcess, tmp_path: Path) -> None:
    source = tmp_path / "big"
    block = bytes(range(256)) * 4096
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for _ in range(BIG // len(block)):
            out.write(block)
            digest.update(block)
    (tmp_path / "warm").write_bytes(b"w" * 1_000_000)
    curl(proxy.port, "/upload", "--data-binary", f"@{tmp_path / 'warm'}", out=tmp_path / "out")  # HTTP/2 code loaded
    rss = PeakRss(proxy.proc.pid)
    status, _ = curl(proxy.port, "/upload", "--data-binary", f"@{source}", out=tmp_path / "out")
    growth = rss.growth()
    assert status == "200 2"
    assert digest.hexdigest() in (tmp_path / "out").read_text()
    assert growth < RSS_BOUND, f"proxy RSS grew by {growth / 2**20:.1f} MiB"


def test_the_stream_idle_timeout_applies_per_stream(tmp_path: Path, upstream: Upstream) -> None:
    """A stream with no byte either way for --stream-idle-timeout gets Envoy's 504 `stream timeout` (SI); a
    neighbour that keeps moving on the same connection is not touched."""
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml",
                                      service_entry("backend", [(upstream.port, {})], port=80), BACKEND_VS),
                         args=["--stream-idle-timeout", "0.5"])
    peer = H2Peer(proxy.port)
    try:
        stuck = peer.request("/slow?delay=5")
        got = peer.finished(stuck)
        assert got.status == 504 and bytes(got.body) == b"stream timeout"
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_flags"] == "SI" and entry["response_code_details"] == "stream_idle_timeout"
        assert peer.finished(peer.request("/echo")).status == 200
    finally:
        peer.close()
        proxy.stop()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_a_streamed_body_over_the_limit_is_413(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml",
                                      service_entry("backend", [(upstream.port, {})], port=80), BACKEND_VS),
                         args=["--max-request-body", "100000"])
    try:
        peer = H2Peer(proxy.port)
        try:
            got = peer.finished(peer.request("/upload", method="POST", body=b"x" * 300_000))
            assert got.status == 413
        finally:
            peer.close()
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_code"] == 413 and entry["response_flags"] == "DPE"
    finally:
        proxy.stop()


def test_a_request_the_head_policy_refuses_gets_its_status_on_that_stream_only(proxy: ProxyProcess) -> None:
    peer = H2Peer(proxy.port)
    try:
        bad = peer.finished(peer.request("/echo", headers=[("x_under", "1")]))  # underscores: rejected by default
        assert bad.status == 400
        assert peer.finished(peer.request("/echo")).status == 200  # the connection serves on
    finally:
        peer.close()
