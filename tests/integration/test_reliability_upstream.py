"""R6: a fault-injecting upstream, one mode per host, and Envoy's answer for each.

refuse -> 503 UF; reset or close before the response -> 503 UC; hang -> 504 UT at the route
timeout (504 SI at the stream idle timeout without one); malformed status line or framing ->
502 UPE; body cut short (reset, close, chunked without its last chunk) -> the client is reset,
never handed a response that looks complete; bytes after a complete response -> the response is
delivered, the upstream connection is discarded (the next request is not desynchronised).
Afterwards the proxy's connections and file descriptors are back to their baseline.

MESHPROXY_SOAK=1 sends 200 requests per mode instead of a few.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator

import h11
import psutil
import pytest

from harness import ProxyProcess, free_port, service_entry, write_config

SOAK = os.environ.get("MESHPROXY_SOAK") == "1"
PER_MODE = 200 if SOAK else 4

OK_BODY = b"hello"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"

# mode -> bytes sent after the request head arrived (None: special handling in FaultServer)
REPLIES: dict[str, bytes | None] = {
    "ok": OK,
    "close_before": b"",
    "reset_before": None,
    "hang": None,
    "bad_status": b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n",
    "not_http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "cl_and_te": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "dup_cl": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    "short_body": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly-ten!!",
    "reset_mid_body": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly-ten!!",
    "chunked_cut": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "trailing": OK + b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nsmuggl",
}
CLOSE_AFTER = {"close_before", "short_body", "chunked_cut", "bad_status", "not_http", "cl_and_te", "dup_cl"}
RESET_AFTER = {"reset_before", "reset_mid_body"}


class FaultServer:
    """One loopback port per mode; each accepted connection misbehaves as its mode says, every time."""

    def __init__(self, modes: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {}
        self.accepted: dict[str, int] = {m: 0 for m in modes}
        self.requests: dict[str, int] = {m: 0 for m in modes}
        self.writers: set[asyncio.StreamWriter] = set()
        self._modes = modes
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.servers = [self.loop.run_until_complete(self._start(m)) for m in self._modes]
        self._ready.set()
        self.loop.run_forever()

    async def _start(self, mode: str) -> asyncio.Server:
        server = await asyncio.start_server(lambda r, w: self._serve(mode, r, w), "127.0.0.1", 0)
        self.ports[mode] = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted[mode] += 1
        self.writers.add(writer)
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")  # the proxy's GETs carry no body
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests[mode] += 1
                if mode == "hang":
                    await asyncio.sleep(3600)
                reply = REPLIES[mode]
                if reply:
                    writer.write(reply)
                    await writer.drain()
                if mode in RESET_AFTER:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode in CLOSE_AFTER:
                    return
        except asyncio.CancelledError:
            return
        finally:
            self.writers.discard(writer)
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def fetch(port: int, host: str, timeout: float = 10.0) -> tuple[int | None, bytes, str]:
    """One GET on a fresh connection -> (status, body, how it ended): 'complete', 'reset' or 'truncated'."""
    client = h11.Connection(h11.CLIENT)
    status: int | None = None
    body = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(client.send(h11.Request(method="GET", target="/", headers=[("host", host)]))
                     + client.send(h11.EndOfMessage()))
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                return status, body, "truncated"
            if event is h11.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    return status, body, "reset"
                try:
                    client.receive_data(data)
                except h11.RemoteProtocolError:
                    return status, body, "truncated"
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, body, "complete"
            elif isinstance(event, h11.ConnectionClosed):
                return status, body, "truncated"


def stats(proxy: ProxyProcess) -> dict[str, float]:
    text = urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("meshproxy_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


MODES = list(REPLIES)


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    server = FaultServer(MODES)
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, faults: FaultServer) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("faults")
    docs = [service_entry("refuse", [(free_port(), {})], port=80)]
    docs += [service_entry(mode.replace("_", "-"), [(port, {})], port=80) for mode, port in faults.ports.items()]
    docs.append(service_entry("hang-no-timeout", [(faults.ports["hang"], {})], port=80))
    for mode in ["refuse", *MODES]:
        host = mode.replace("_", "-")
        timeout = "timeout: 0.5s\n    " if mode == "hang" else ""
        docs.append(f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
  - {timeout}route: [{{destination: {{host: {host}}}}}]
""")
    docs.append("""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hang-no-timeout}
spec:
  hosts: [hang-no-timeout]
  http: [{route: [{destination: {host: hang-no-timeout}}]}]
""")
    p = ProxyProcess(write_config(folder, "c.yaml", *docs),
                     args=["--stream-idle-timeout", "1", "--upstream-idle-timeout", "0.5"])
    yield p
    assert p.stop() == 0, p.log


@pytest.fixture(scope="module")
def baseline(proxy: ProxyProcess) -> int:
    assert fetch(proxy.port, "ok")[0] == 200  # warm: lazy imports, first connection
    proxy.access_entries(1)
    return settle_fds(proxy, None)


def tasks(proxy: ProxyProcess) -> int:
    """asyncio tasks alive in the proxy (admin gauge meshproxy_event_loop_tasks)."""
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5) as resp:
        text = resp.read().decode()
    return int(float(re.search(r"^meshproxy_event_loop_tasks ([0-9.e+]+)$", text, re.M).group(1)))


@pytest.fixture(scope="module")
def baseline_tasks(proxy: ProxyProcess, baseline: int) -> int:
    return tasks(proxy)


def settle_fds(proxy: ProxyProcess, baseline: int | None, timeout: float = 5.0) -> int:
    """The proxy's open file descriptors once idle upstream connections have expired."""
    process = psutil.Process(proxy.proc.pid)
    deadline = time.monotonic() + timeout
    fds = process.num_fds()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = process.num_fds()
        if baseline is None and now == fds:
            return now
        if baseline is not None and now <= baseline + 2:
            return now
        fds = now
    return fds


@pytest.mark.parametrize(
    ("mode", "status", "flag", "ending"),
    [
        ("refuse", 503, "UF", "complete"),
        ("close_before", 503, "UC", "complete"),
        ("reset_before", 503, "UC", "complete"),
        ("bad_status", 502, "UPE", "complete"),
        ("not_http", 502, "UPE", "complete"),
        ("cl_and_te", 502, "UPE", "complete"),
        ("dup_cl", 502, "UPE", "complete"),
        ("hang", 504, "UT", "complete"),
    ],
)
def test_failure_before_the_response_gets_envoys_answer(proxy: ProxyProcess, faults: FaultServer, baseline: int,
                                                        baseline_tasks: int,  # measured before any fault
                                                        mode: str, status: int, flag: str, ending: str) -> None:
    host = mode.replace("_", "-")
    count = PER_MODE if mode != "hang" else min(PER_MODE, 4)
    for _ in range(count):
        got, body, how = fetch(proxy.port, host)
        assert (got, how) == (status, ending), body
    flags = [e["response_flags"] for e in proxy.access_entries(count)]
    assert all(flag in f.split(",") for f in flags), flags
    assert settle_fds(proxy, baseline) <= baseline + 2


def test_hang_without_a_route_timeout_ends_at_the_stream_idle_timeout(proxy: ProxyProcess, baseline: int) -> None:
    started = time.monotonic()
    got, body, how = fetch(proxy.port, "hang-no-timeout")
    assert (got, body, how) == (504, b"stream timeout", "complete")
    assert 0.8 < time.monotonic() - started < 8  # the 1 s stream idle timeout, late on a loaded machine at worst
    assert proxy.access_entries(1)[0]["response_flags"] == "SI"
    assert settle_fds(proxy, baseline) <= baseline + 2


@pytest.mark.parametrize("mode", ["short_body", "reset_mid_body", "chunked_cut"])
def test_body_cut_short_resets_the_client(proxy: ProxyProcess, baseline: int, mode: str) -> None:
    for _ in range(PER_MODE):
        got, body, how = fetch(proxy.port, mode.replace("_", "-"))
        assert got == 200 and how in ("reset", "truncated"), (how, body)  # never "complete"
    flags = [e["response_flags"] for e in proxy.access_entries(PER_MODE)]
    assert all(f in ("UC", "UPE") for f in flags), flags
    assert settle_fds(proxy, baseline) <= baseline + 2


def test_bytes_after_a_response_discard_the_upstream_connection(proxy: ProxyProcess, faults: FaultServer,
                                                                baseline: int) -> None:
    before = faults.accepted["trailing"]
    for _ in range(PER_MODE):
        got, body, how = fetch(proxy.port, "trailing")
        assert (got, body, how) == (200, OK_BODY, "complete")  # never the smuggled second response
        time.sleep(0.05)
    # every request needed a new upstream connection: the poisoned one was never reused
    assert faults.accepted["trailing"] - before == PER_MODE
    proxy.access_entries(PER_MODE)
    assert settle_fds(proxy, baseline) <= baseline + 2


def test_a_response_before_the_request_body_ended_discards_both_connections(proxy: ProxyProcess,
                                                                            faults: FaultServer) -> None:
    """The upstream answers as soon as the head arrives, half the body still to come. That connection owes the
    rest of a request: never reused. The client's connection closes after the answer (Envoy's HTTP/1 codec)."""
    assert fetch(proxy.port, "ok")[:2] == (200, OK_BODY)  # an idle connection to "ok" in the pool
    before = faults.accepted["ok"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(b"POST /up HTTP/1.1\r\nHost: ok\r\ncontent-length: 10\r\n\r\nhalf.")
        reply = b""
        while not reply.endswith(OK_BODY):
            data = client.recv(65536)
            assert data, reply
            reply += data
        assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in reply.lower()
        client.settimeout(5)
        assert client.recv(65536) == b""  # closed by the proxy: the rest of the body is not read
    assert faults.accepted["ok"] == before  # the POST went on the pooled connection...
    assert fetch(proxy.port, "ok")[:2] == (200, OK_BODY)
    assert faults.accepted["ok"] - before == 1  # the GET took a new connection: the POST's one was discarded


def test_good_upstream_connection_is_reused_and_everything_returns_to_baseline(proxy: ProxyProcess,
                                                                               faults: FaultServer,
                                                                               baseline: int,
                                                                               baseline_tasks: int) -> None:
    before = faults.accepted["ok"]
    for _ in range(10):
        assert fetch(proxy.port, "ok")[:2] == (200, OK_BODY)
    assert faults.accepted["ok"] - before <= 2  # keep-alive reuse still works next to the faults
    proxy.access_entries(10)
    assert settle_fds(proxy, baseline) <= baseline + 2
    figures = stats(proxy)
    assert figures.get('meshproxy_upstream_connections{state="active"}') == 0
    assert all(v == 0 for k, v in figures.items() if k.startswith("meshproxy_downstream_connections")), figures
    assert "Traceback" not in proxy.log, proxy.log
    assert tasks(proxy) <= baseline_tasks  # no exchange task left behind by any fault mode
