"""Bodies streamed with flat memory; SIGTERM drains in-flight requests; config hot reload."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import BACKEND_VS, PeakRss, ProxyProcess, Upstream, service_entry, write_config
from waiting import wait_until

VS = BACKEND_VS
BODY = 64 * 1024 * 1024
RSS_BOUND = 24 * 1024 * 1024  # the proxy may not hold the body: growth stays far below 64 MiB


@pytest.fixture
def proxy(tmp_path: Path, upstream: Upstream):
    p = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", service_entry("backend", [(upstream.port, {})], port=80), VS))
    yield p
    assert p.stop() == 0, p.log




def _warm_up(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/upload", body=b"x" * 1_000_000, headers={"Host": "backend"})
    conn.getresponse().read()
    conn.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_64mib_upload_streams_with_flat_memory(proxy: ProxyProcess, chunked: bool) -> None:
    _warm_up(proxy.port)
    block = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256()
    for _ in range(BODY // len(block)):
        expected.update(block)
    rss = PeakRss(proxy.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    headers = {"Host": "backend"}
    if not chunked:
        headers["Content-Length"] = str(BODY)
    conn.request("POST", "/upload", body=(block for _ in range(BODY // len(block))), headers=headers,
                 encode_chunked=chunked)
    resp = conn.getresponse()
    result = json.loads(resp.read())
    conn.close()
    growth = rss.growth()
    assert resp.status == 200
    assert result == {"size": BODY, "sha256": expected.hexdigest()}
    assert growth < RSS_BOUND, f"proxy RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("path", ["/bytes", "/stream"])
def test_64mib_download_streams_with_flat_memory(proxy: ProxyProcess, path: str) -> None:
    _warm_up(proxy.port)
    rss = PeakRss(proxy.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request("GET", f"{path}?size={BODY}", headers={"Host": "backend"})
    resp = conn.getresponse()
    received = 0
    while piece := resp.read(1 << 16):
        received += len(piece)
        if received < 8 * (1 << 20):
            time.sleep(0.0005)  # a slower reader at first: backpressure must hold the upstream back
    conn.close()
    growth = rss.growth()
    assert resp.status == 200 and received == BODY
    assert growth < RSS_BOUND, f"proxy RSS grew by {growth / 2**20:.1f} MiB"


def test_sigterm_lets_in_flight_requests_finish(proxy: ProxyProcess, upstream: Upstream) -> None:
    def slow(i: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
        conn.request("GET", f"/slow?delay=2&i={i}", headers={"Host": "backend"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(slow, i) for i in range(8)]
        wait_until(lambda: sum(r["path"].startswith("/slow") for r in upstream.requests) == 8,
                   what="all eight in flight at the upstream")
        proxy.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert results == [(200, b"slow done")] * 8
    assert proxy.stop() == 0
    assert "draining" in proxy.log


def test_reload_swaps_routes_and_a_bad_file_changes_nothing(tmp_path: Path, upstream: Upstream) -> None:
    other = Upstream("other")
    folder = tmp_path / "cfg"
    write_config(folder, "se.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                 service_entry("other", [(other.port, {})], port=80))
    write_config(folder, "vs.yaml", VS)
    p = ProxyProcess(folder)
    try:
        def upstream_name() -> str:
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            conn.request("GET", "/echo", headers={"Host": "backend"})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.getheader("x-upstream") or ""

        assert upstream_name() == "backend"
        write_config(folder, "vs.yaml", VS.replace("destination: {host: backend}", "destination: {host: other}"))
        deadline = time.monotonic() + 10
        while upstream_name() != "other" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert upstream_name() == "other"
        write_config(folder, "vs.yaml", VS.replace("http:", "htp:"))  # invalid: unknown field
        deadline = time.monotonic() + 10
        while "config rejected" not in p.log and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "vs.yaml:0: spec.htp: unknown field 'htp'" in p.log
        assert upstream_name() == "other"  # the running config stayed
    finally:
        assert p.stop() == 0
        other.close()


def test_a_second_sigterm_while_stopping_still_exits_0(proxy: ProxyProcess, upstream: Upstream) -> None:
    import signal as signals

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    conn.request("GET", "/slow?delay=1", headers={"Host": "backend"})
    wait_until(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), what="the request upstream")
    proxy.proc.send_signal(signals.SIGTERM)
    time.sleep(0.1)
    proxy.proc.send_signal(signals.SIGTERM)  # an orchestrator repeating itself, mid-drain
    assert conn.getresponse().read() == b"slow done"
    conn.close()
    deadline = time.monotonic() + 10
    while proxy.proc.poll() is None and time.monotonic() < deadline:
        try:
            proxy.proc.send_signal(signals.SIGTERM)  # and again while the process is on its way out
        except ProcessLookupError:
            break
        time.sleep(0.01)
    assert proxy.stop() == 0
