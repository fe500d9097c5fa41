"""WebSocket upgrades through the proxy (HTTP/1.1), with the `websockets` package on both sides: routed like any
request, then frames both ways until either side closes; the route timeout stops at the upgrade, the stream idle
timeout does not; CONNECT stays refused."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

websockets = pytest.importorskip("websockets", reason="the websockets package is not installed")
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from harness import ProxyProcess, raw_exchange, service_entry, virtual_service, write_config  # noqa: E402


class WebSocketServer:
    """/echo echoes every message; /bye answers the first message, then closes with 1001; /flood?n sends n
    messages of 64 KiB as fast as the connection takes them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.paths: list[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stopping = asyncio.Event()

        async def main() -> None:
            async with serve(self.handle, "127.0.0.1", 0) as server:
                self.port = server.sockets[0].getsockname()[1]
                self.ready.set()
                await self.stopping.wait()

        self.loop.run_until_complete(main())

    async def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path
        self.paths.append(path)
        if path == "/bye":
            await ws.send("bye: " + str(await ws.recv()))
            await ws.close(1001, "going away")
            return
        if path.startswith("/flood"):
            for _ in range(int(path.split("?")[1])):
                await ws.send(b"f" * 65536)
            await ws.close()
            return
        async for message in ws:
            await ws.send(message)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def ws_server() -> Iterator[WebSocketServer]:
    server = WebSocketServer()
    yield server
    server.close()


def start(tmp_path: Path, server: WebSocketServer, args: tuple[str, ...] = (), timeout: str = "0.3s") -> ProxyProcess:
    routes = f"  - timeout: {timeout}\n    route: [{{destination: {{host: backend}}}}]\n"
    return ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", service_entry("backend", [(server.port, {})], port=80),
                                     virtual_service("backend", http=routes)), args=args)


def client(proxy: ProxyProcess, path: str):  # noqa: ANN201
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    return connect(f"ws://backend{path}", sock=sock, proxy=None, open_timeout=10, close_timeout=5)


def test_messages_both_ways_past_the_route_timeout_then_the_client_closes(tmp_path: Path,
                                                                          ws_server: WebSocketServer) -> None:
    proxy = start(tmp_path, ws_server)
    try:
        with client(proxy, "/echo") as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            ws.send(b"\x00\x01" * 50_000)
            assert ws.recv(timeout=10) == b"\x00\x01" * 50_000
            time.sleep(1.0)  # well past the route's 0.3 s timeout: it ended with the upgrade
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
        entry = proxy.access_entries(1, timeout=10)[0]  # once, when the tunnel closed
        assert entry["response_code"] == 101 and entry["path"] == "/echo"
        assert entry["response_flags"] in ("-", "DC")
        assert ws_server.paths == ["/echo"]
    finally:
        proxy.stop()


def test_the_server_closes_and_the_client_sees_its_close_code(tmp_path: Path, ws_server: WebSocketServer) -> None:
    proxy = start(tmp_path, ws_server)
    try:
        with client(proxy, "/bye") as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "bye: x"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proxy.access_entries(1, timeout=10)[0]["response_code"] == 101
    finally:
        proxy.stop()


def test_a_slow_reader_gets_everything(tmp_path: Path, ws_server: WebSocketServer) -> None:
    """The server floods 32 MiB; the client reads late and slowly: backpressure through the proxy, nothing lost."""
    proxy = start(tmp_path, ws_server)
    try:
        with client(proxy, "/flood?512") as ws:
            time.sleep(0.5)
            got = 0
            for message in ws:
                got += len(message)
        assert got == 512 * 65536
    finally:
        proxy.stop()


def test_the_stream_idle_timeout_still_ends_an_idle_tunnel(tmp_path: Path, ws_server: WebSocketServer) -> None:
    proxy = start(tmp_path, ws_server, ("--stream-idle-timeout", "0.5"), timeout="0s")
    try:
        with client(proxy, "/echo") as ws:
            ws.send("a")
            assert ws.recv(timeout=10) == "a"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=20)  # nothing either way: cut after 0.5 s
    finally:
        proxy.stop()


def test_connect_stays_refused(tmp_path: Path, ws_server: WebSocketServer) -> None:
    proxy = start(tmp_path, ws_server)
    try:
        answer = raw_exchange(proxy.port, b"CONNECT backend:80 HTTP/1.1\r\nHost: backend:80\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 ")
        assert ws_server.paths == []
    finally:
        proxy.stop()
