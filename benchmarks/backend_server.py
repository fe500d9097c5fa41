"""Fallback benchmark backend: uvloop + httptools, tiny fixed responses, keep-alive and pipelining.

Used only when nginx cannot be installed or started. It answers like the harness's nginx: "ok\\n" on the main
port, 1 MiB on /mib (GET or POST, the request body read and dropped), and "NAME\\n" on each subset port.
Run: python backend_server.py --port PORT [--subset NAME=PORT ...]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import httptools
import uvloop

BODY_PATH = b"/mib"
BODY_BYTES = 1 << 20
RESPONSE_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def response(body: bytes, content_type: bytes, close: bool) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + connection + b"\r\n" + body)


class FixedResponseProtocol(asyncio.Protocol):
    """Answers every request with the same 200 (1 MiB on /mib); bodies are read and ignored."""

    def __init__(self, text: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.keep_alive = {False: response(text, b"text/plain", False),
                           True: response(b"x" * BODY_BYTES, b"application/octet-stream", False)}
        self.close = {False: response(text, b"text/plain", True),
                      True: response(b"x" * BODY_BYTES, b"application/octet-stream", True)}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(RESPONSE_BAD_REQUEST)
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        big = self.url.split(b"?", 1)[0] == BODY_PATH
        if self.parser.should_keep_alive():
            self.transport.write(self.keep_alive[big])
        else:
            self.transport.write(self.close[big])
            self.transport.close()


async def serve(ports: dict[int, bytes]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda text=text: FixedResponseProtocol(text), "127.0.0.1", port,
                                        backlog=1024) for port, text in ports.items()]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subset", action="append", default=[], help="NAME=PORT: a port answering NAME")
    args = parser.parse_args()
    ports = {args.port: b"ok\n"}
    for item in args.subset:
        name, _, port = item.partition("=")
        ports[int(port)] = name.encode() + b"\n"
    uvloop.run(serve(ports))


if __name__ == "__main__":
    main()
