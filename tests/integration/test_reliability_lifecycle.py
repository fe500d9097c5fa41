"""R8-R11 under load: reloads (good and bad) fail no request; SIGTERM fails no in-flight request;
memory stays bounded through a long transfer to a slow reader, from a slow upstream reader, and
through a soak of keep-alive requests.

Short in CI; MESHPROXY_SOAK=1 runs the long versions (100 reloads, 1 GiB transfers, a minute of load).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from aiohttp import web

from harness import PeakRss, ProxyProcess, Upstream, service_entry, virtual_service, write_config

SOAK = os.environ.get("MESHPROXY_SOAK") == "1"
pytestmark = pytest.mark.timeout(3600 if SOAK else 120)
RELOADS = 100 if SOAK else 12
TRANSFER = (1 << 30) if SOAK else 64 * (1 << 20)
TRANSFER_RSS_BOUND = 16 * (1 << 20)
SOAK_SECONDS = 60.0 if SOAK else 4.0
SOAK_RSS_BOUND = 10 * (1 << 20)  # after warm-up


def vs(destination: str) -> str:
    return virtual_service("backend", destination=destination)


class Load:
    """Client threads sending keep-alive GETs until stopped; every outcome is recorded."""

    def __init__(self, port: int, threads: int = 4, path: str = "/echo") -> None:
        self.port = port
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self.upstreams: set[str] = set()
        self.completed_ids: set[str] = set()
        self.connection_errors: list[str] = []  # failures with no response byte (allowed only where said)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counter = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return str(self._counter)

    def _run(self, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            rid = self._next_id()
            try:
                conn.request("GET", f"{self.path}{'&' if '?' in self.path else '?'}id={rid}",
                             headers={"Host": "backend"})
                resp = conn.getresponse()
                body = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, OSError) as exc:
                with self._lock:
                    self.connection_errors.append(f"{rid}: {exc!r}")
                conn.close()
                conn = None
                time.sleep(0.01)  # e.g. refused while the proxy drains: do not spin
                continue
            except http.client.IncompleteRead as exc:
                with self._lock:
                    self.failures.append(f"{rid}: truncated {exc!r}")
                conn.close()
                conn = None
                continue
            with self._lock:
                if resp.status == 200:
                    self.ok += 1
                    self.completed_ids.add(rid)
                    self.upstreams.add(resp.getheader("x-upstream") or "")
                else:
                    self.failures.append(f"{rid}: {resp.status} {body[:100]!r}")
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(20)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_reloads_good_and_bad_under_load_fail_no_request(tmp_path: Path) -> None:
    """R9: alternate good (switching the destination) and bad files; every request gets a 200."""
    a, b = Upstream("a"), Upstream("b")
    folder = tmp_path / "cfg"
    write_config(folder, "se.yaml", service_entry("a", [(a.port, {})], port=80),
                 service_entry("b", [(b.port, {})], port=80), service_entry("backend", [(a.port, {})], port=80))
    write_config(folder, "vs.yaml", vs("a"))
    p = ProxyProcess(folder, args=["--watch-interval", "0"])  # reloads by SIGHUP only: counted exactly
    load = Load(p.port)
    try:
        assert wait_for(lambda: load.ok > 20)
        for i in range(RELOADS):
            good = i % 2 == 1
            before = p.log.count("config version") + p.log.count("config rejected")
            write_config(folder, "vs.yaml", vs("b" if i % 4 == 1 else "a") if good else vs("a").replace("http:", "htp:"))
            p.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: p.log.count("config version") + p.log.count("config rejected") > before)
            served = load.ok
            assert wait_for(lambda: load.ok > served + 5)  # traffic flows between reloads
    finally:
        load.stop()
        code = p.stop()
        a.close()
        b.close()
    assert code == 0, p.log
    assert load.failures == [] and load.connection_errors == []
    assert load.upstreams == {"a", "b"}  # the good reloads took effect
    assert p.log.count("config rejected") == RELOADS // 2
    assert p.log.count("loaded (SIGHUP)") == RELOADS // 2


def test_sigterm_under_load_fails_no_in_flight_request(tmp_path: Path) -> None:
    """R8: every request the upstream received is answered 200; the only failures allowed are
    connections the draining proxy refused or closed before reading the request (nothing sent upstream)."""
    upstream = Upstream("backend")
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                  vs("backend")), args=["--drain-time", "5"])
    load = Load(p.port, threads=16, path="/slow?delay=0.3")
    try:
        assert wait_for(lambda: load.ok > 30)
        p.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = p.proc.wait(15)
        stopped_after = time.monotonic() - started
    finally:
        load.stop()
        p.stop()
        upstream.close()
    assert code == 0, p.log
    assert load.failures == []  # no 5xx, nothing truncated
    seen = {json_id(r["path"]) for r in upstream.requests}
    assert seen <= load.completed_ids, sorted(seen - load.completed_ids)[:10]  # in flight => answered
    assert stopped_after < 5 + 5  # within the 5 s drain time (+ a loaded machine's slack), not only at wait()'s 15


def json_id(path: str) -> str:
    return path.rsplit("id=", 1)[1]


def test_rss_is_flat_under_a_soak(tmp_path: Path, upstream: Upstream) -> None:
    """R10 (short in CI): keep-alive load; after a warm-up the proxy's RSS grows less than the bound."""
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                  vs("backend")))
    process = psutil.Process(p.proc.pid)
    load = Load(p.port, threads=4)
    try:
        assert wait_for(lambda: load.ok > 500, 20)  # warm-up: caches, pools, lazy imports
        base = process.memory_info().rss
        fds = process.num_fds()
        time.sleep(SOAK_SECONDS)
        growth = process.memory_info().rss - base
        assert growth < SOAK_RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MiB during the soak"
        assert process.num_fds() <= fds + 4
    finally:
        load.stop()
        assert p.stop() == 0
    assert load.failures == [] and load.connection_errors == []




def test_transfer_to_a_slow_reader_keeps_memory_bounded(tmp_path: Path, upstream: Upstream) -> None:
    """R11: the client reads slowly: backpressure holds the upstream, the proxy holds little."""
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                  vs("backend")))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=60)
        conn.request("GET", "/bytes?size=4000000", headers={"Host": "backend"})  # warm the buffers
        conn.getresponse().read()
        rss = PeakRss(p.proc.pid)
        conn.request("GET", f"/bytes?size={TRANSFER}&chunk=65536", headers={"Host": "backend"})
        resp = conn.getresponse()
        received, reads = 0, 0
        while piece := resp.read(1 << 16):
            received += len(piece)
            reads += 1
            if reads % 4 == 0:
                time.sleep(0.001)  # about 200 MiB/s at most: slower than the upstream writes
        conn.close()
        growth = rss.growth()
    finally:
        assert p.stop() == 0
    assert received == TRANSFER
    assert growth < TRANSFER_RSS_BOUND, f"proxy RSS grew {growth / 2**20:.1f} MiB"


def test_upload_to_a_slow_upstream_keeps_memory_bounded(tmp_path: Path) -> None:
    """R11: the upstream reads slowly: the proxy stops reading the client instead of buffering."""
    async def slow_reader(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for data in request.content.iter_chunked(1 << 16):
            digest.update(data)
            size += len(data)
            if size % (1 << 20) < (1 << 16):
                await asyncio.sleep(0.002)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    upstream = Upstream("slow", slow_reader)
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                  vs("backend")))
    try:
        block = bytes(range(256)) * 256
        expected = hashlib.sha256()
        for _ in range(TRANSFER // len(block)):
            expected.update(block)
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=120)
        conn.request("POST", "/up", body=b"x" * 1_000_000, headers={"Host": "backend"})
        conn.getresponse().read()
        rss = PeakRss(p.proc.pid)
        conn.request("POST", "/up", body=(block for _ in range(TRANSFER // len(block))),
                     headers={"Host": "backend", "Content-Length": str(TRANSFER)})
        result = json.loads(conn.getresponse().read())
        conn.close()
        growth = rss.growth()
    finally:
        assert p.stop() == 0
        upstream.close()
    assert result == {"size": TRANSFER, "sha256": expected.hexdigest()}
    assert growth < TRANSFER_RSS_BOUND, f"proxy RSS grew {growth / 2**20:.1f} MiB"
