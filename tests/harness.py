"""Test harness: a real meshproxy process, real upstream servers on loopback, config writers.

Everything binds to port 0; the proxy reports the ports it got in its log lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from meshproxy.messages import block_pairs

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "config" / "bookinfo"  # Istio's Bookinfo networking YAML, copied unchanged (+ our services.yaml)
ISTIO_CORPUS = REPO / "tests" / "corpus" / "istio-samples"  # the rest of Istio's samples the tests read
LEGACY = ISTIO_CORPUS / "legacy"  # v1alpha3 files of Istio 1.0.0 and 1.5.0
# Istio's current Bookinfo set as Istio ships it: 21 networking files + its two Kubernetes platform files.
ISTIO_CURRENT = sorted([*(p for p in SAMPLES.glob("*.yaml") if p.name != "services.yaml"),
                        ISTIO_CORPUS / "bookinfo.yaml", ISTIO_CORPUS / "bookinfo-versions.yaml"], key=lambda p: p.name)
LISTENING_RE = re.compile(r"(\S+) listening on (\S+):(\d+)")


# --------------------------------------------------------------------------- config


def service_entry(host: str, endpoints: Iterable[tuple[int, dict[str, str]]], port: int = 9080,
                  name: str | None = None, address: str = "127.0.0.1", location: str = "MESH_EXTERNAL") -> str:
    """A ServiceEntry placing `host` on loopback ports, each endpoint with labels."""
    eps = [{"address": address, "ports": {"http": p}, "labels": labels} for p, labels in endpoints]
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name or host.split(".")[0]},
        "spec": {"hosts": [host if "." in host else f"{host}.default.svc.cluster.local"],
                 "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                 "resolution": "STATIC", "endpoints": eps, "location": location},
    }
    return "---\n" + json.dumps(doc) + "\n"


def virtual_service(host: str = "backend", *, http: str | None = None, destination: str | None = None) -> str:
    """A VirtualService for `host`: its `http` routes as YAML (indented as items under `http:`), or else one route
    to `destination` (default: `host` itself)."""
    routes = f"\n{http}" if http is not None else f" [{{route: [{{destination: {{host: {destination or host}}}}}]}}]"
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:{routes}
"""


BACKEND_VS = virtual_service("backend")


def write_config(folder: Path, name: str, *docs: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text("".join(docs))
    os.replace(tmp, path)  # atomic, as a ConfigMap update
    return path


# --------------------------------------------------------------------------- proxy process


class ProxyProcess:
    """`python -m meshproxy run` on free ports, with JSON access log lines collected."""

    def __init__(self, *config: Path | str, args: Iterable[str] = (), env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "meshproxy", "run", "--admin", "127.0.0.1:0", "--access-log", "json",
               "--watch-interval", "0.2", "--log-level", "info"]
        args = list(args)
        if "--listen" not in args:
            cmd += ["--listen", "127.0.0.1:0"]
        for c in config:
            cmd += ["--config", str(c)]
        cmd += args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=REPO)
        self.addresses: dict[str, tuple[str, int]] = {}
        self.stderr_lines: list[str] = []
        self.access: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()
        if not self._ready.wait(15):
            self.stop(signal.SIGKILL)
            raise RuntimeError("meshproxy did not start:\n" + "".join(self.stderr_lines))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            match = LISTENING_RE.search(line)
            if match:
                self.addresses[match.group(1)] = (match.group(2), int(match.group(3)))
                if "admin" in self.addresses and ("outbound" in self.addresses or "--listen" in self.proc.args):
                    self._ready.set()
        self._ready.set()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.access.put(json.loads(line))

    @property
    def port(self) -> int:
        return self.addresses["outbound"][1]

    @property
    def admin(self) -> str:
        return "http://127.0.0.1:%d" % self.addresses["admin"][1]

    def access_entries(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out.append(self.access.get(timeout=max(0.01, deadline - time.monotonic())))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)


# --------------------------------------------------------------------------- upstream servers


class Upstream:
    """An aiohttp server on a free loopback port, in its own thread; counts connections and requests.

    Routes: /echo (request as JSON), /stream?size=N&chunk=M (streamed, no content-length),
    /bytes?size=N (content-length), /upload (reads the body streamed, returns size and sha256),
    /slow?delay=S, /status/CODE. `name` is returned in the `x-upstream` header.
    """

    def __init__(self, name: str = "upstream", handler: Callable[[web.Request], Any] | None = None) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.connections: set[int] = set()
        self.loop = asyncio.new_event_loop()
        self._handler = handler
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.connections.add(id(request.transport))
        record = {"method": request.method, "path": request.path_qs, "headers": list(request.raw_headers),
                  "connection": id(request.transport)}
        self.requests.append(record)
        if self._handler is not None:
            return await self._handler(request)
        path = request.path
        headers = {"x-upstream": self.name}
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text="status", headers=headers)
        if path == "/slow":
            await asyncio.sleep(float(request.query.get("delay", "1")))
            return web.Response(text="slow done", headers=headers)
        if path == "/upload":
            digest, size = hashlib.sha256(), 0
            async for data in request.content.iter_chunked(1 << 16):
                digest.update(data)
                size += len(data)
            return web.json_response({"size": size, "sha256": digest.hexdigest()}, headers=headers)
        if path in ("/stream", "/bytes"):
            size, piece = int(request.query.get("size", "1024")), int(request.query.get("chunk", "65536"))
            response = web.StreamResponse(headers=headers)
            if path == "/bytes":
                response.content_length = size
            await response.prepare(request)
            block = b"x" * piece
            sent = 0
            while sent < size:
                part = block[: min(piece, size - sent)]
                await response.write(part)
                sent += len(part)
            await response.write_eof()
            return response
        body = await request.read()
        record["body"] = body
        return web.json_response({
            "method": request.method, "path": request.path_qs,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_size": len(body), "upstream": self.name,
        }, headers=headers)

    def header_values(self, index: int, name: str) -> list[str]:
        raw = self.requests[index]["headers"]
        return [v.decode("latin-1") for k, v in raw if k.decode("latin-1").lower() == name.lower()]

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class PeakRss:
    """Samples a process's RSS in a thread while a transfer runs; `growth()` stops and returns peak - start."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)
        except BaseException as exc:  # a sampler that died must fail the test, not leave a low peak behind
            self.failure = exc

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.failure is not None:
            raise AssertionError("RSS sampling stopped early") from self.failure
        return self.peak - self.base


def upstream_headers(telemetry: Any, info: Any) -> list[tuple[bytes, bytes]]:
    """Run telemetry's request hook on a record: the headers it adds upstream, with this workload's peer metadata."""
    return block_pairs(telemetry.on_request(info) + list(telemetry.request_peer_headers))


def free_port() -> int:
    """A port nobody listens on (for connect-failure tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send bytes on a fresh connection and read what comes back until the proxy closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            chunks.append(piece)
            if not read_until_close:
                break
        return b"".join(chunks)


def record(head: Any, peer_ip: bytes = b"127.0.0.1", transport: Any = None) -> Any:
    """A request's record (StreamInfo), as the data path makes one for a request head, for telemetry's unit tests."""
    from meshproxy.stream_info import ConnectionInfo, StreamInfo

    return StreamInfo(head, ConnectionInfo(peer_ip, transport), time.monotonic())
