"""Where the proxies export their sampled spans: a tiny HTTP server, a child of the harness, that accepts
every POST.

meshproxy exports OTLP/HTTP (protobuf) to /meshproxy/v1/traces and Envoy exports Zipkin JSON to
/envoy/api/v2/spans, so an export really completes (connection, request, answer) instead of failing against
a closed port, and the harness can say how many exports each proxy made (GET /take: counts since the last
call, as JSON). Bodies are read and dropped. A separate process, not a thread of the harness: the harness
forks children with a preexec_fn, which is unsafe while other threads run.

Run: python trace_sink.py --port PORT
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from children import LOOPBACK, Child, Children, free_address

MESHPROXY_PATH = "/meshproxy/v1/traces"
ENVOY_PATH = "/envoy/api/v2/spans"
READY_TIMEOUT_SECONDS = 10.0


class TraceSink:
    """The harness's handle on the sink process."""

    def __init__(self, children: Children, workdir: Path) -> None:
        address = free_address()
        self.host, self.port = address.host, address.port
        argv = [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port)]
        self.child: Child = children.start_ready("trace sink", argv, ready_url=address.url + "/ready",
                                                 timeout=READY_TIMEOUT_SECONDS, log=workdir / "trace-sink.log")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def take(self) -> dict[str, tuple[int, int]]:
        """Exports and bytes received per path since the last call."""
        self.child.check_alive()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request("GET", "/take")
            counts = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        return {path: (int(exports), int(size)) for path, (exports, size) in counts.items()}


# ----------------------------------------------------------------------------------------- the sink process

EXPORTS: Counter[str] = Counter()
BYTES: Counter[str] = Counter()
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.read_body()
        with LOCK:
            EXPORTS[self.path] += 1
            BYTES[self.path] += len(body)
        zipkin = self.path.endswith("/spans")
        self.send_response(202 if zipkin else 200)  # Zipkin answers 202; OTLP 200 with an empty message
        self.send_header("Content-Type", "application/json" if zipkin else "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = b""
        if self.path == "/take":
            with LOCK:
                body = json.dumps({path: [EXPORTS[path], BYTES[path]] for path in EXPORTS}).encode()
                EXPORTS.clear()
                BYTES.clear()
        elif self.path != "/ready":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self) -> bytes:
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []  # Envoy's Zipkin exporter sends chunked bodies
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    server = ThreadingHTTPServer((LOOPBACK, parser.parse_args().port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
