"""An HTTP/2 cleartext upstream for tests: hypercorn (h2c with prior knowledge) serving a small ASGI app in a thread.

Routes: /echo (the request as JSON: method, path, HTTP version, headers, body size and trailers seen), /bytes?size=N
(streamed), /trailers (a body, then response trailers), /slow?delay=S, /boom (fails after the response
started: the stream is reset). Requests and connections are counted.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from harness import free_port


class H2Upstream:
    def __init__(self, name: str = "h2-backend", host: str = "127.0.0.1", port: int = 0) -> None:
        """`host`, `port`: where to listen (a pod's address in a network namespace: made inside it, the server's
        thread is there too)."""
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.clients: set[tuple[str, int]] = set()
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._started.wait(15):
            raise RuntimeError("hypercorn did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        config = Config()
        config.bind = [f"{self.host}:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        config.keep_alive_timeout = 300
        config.h2_max_concurrent_streams = 1000
        self._stop = asyncio.Event()

        async def main() -> None:
            task = asyncio.ensure_future(serve(self.app, config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
            for _ in range(500):
                try:
                    _, writer = await asyncio.open_connection(self.host, self.port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.01)
            self._started.set()
            await task

        self.loop.run_until_complete(main())

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        self.clients.add(tuple(scope["client"]))
        record: dict[str, Any] = {"method": scope["method"], "path": path, "http_version": scope["http_version"],
                                  "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]]}
        self.requests.append(record)
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        size = 0
        trailers: list[list[str]] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        record["body_size"] = size
        base = [(b"x-upstream", self.name.encode())]
        if path == "/slow":
            await asyncio.sleep(float(query.get("delay", "1")))
        if path == "/bytes":
            total = int(query.get("size", "1024"))
            await send({"type": "http.response.start", "status": 200, "headers": base})
            block = b"y" * 65536
            sent = 0
            while sent < total:
                part = block[:min(len(block), total - sent)]
                await send({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/boom":  # the response starts, then the app fails: hypercorn resets the stream
            await send({"type": "http.response.start", "status": 200, "headers": base})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("boom")
        if path == "/trailers":
            await send({"type": "http.response.start", "status": 200, "trailers": True,
                        "headers": [*base, (b"trailer", b"x-result")]})
            await send({"type": "http.response.body", "body": b"with trailers", "more_body": False})
            await send({"type": "http.response.trailers", "headers": [(b"x-result", b"done")], "more_trailers": False})
            return
        body = json.dumps({**record, "trailers": trailers, "upstream": self.name}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*base, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()
