"""Where the proxies export their sampled spans: a tiny HTTP server in the harness that accepts every POST.

meshproxy exports OTLP/HTTP (protobuf) to /meshproxy/v1/traces and Envoy exports Zipkin JSON to
/envoy/api/v2/spans, so an export really completes (connection, request, answer) instead of failing against
a closed port, and the harness can say how many exports each proxy made. Bodies are read and dropped.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from children import LOOPBACK

MESHPROXY_PATH = "/meshproxy/v1/traces"
ENVOY_PATH = "/envoy/api/v2/spans"


class TraceSink:
    def __init__(self) -> None:
        sink = self
        self.exports: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.read_body()
                with sink._lock:
                    sink.exports[self.path] += 1
                    sink.bytes[self.path] += len(body)
                zipkin = self.path.endswith("/spans")
                self.send_response(202 if zipkin else 200)  # Zipkin answers 202; OTLP 200 with an empty message
                self.send_header("Content-Type", "application/json" if zipkin else "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def read_body(self) -> bytes:
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self.host = LOOPBACK
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="trace-sink", daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> TraceSink:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take(self) -> dict[str, tuple[int, int]]:
        """Exports and bytes received per path since the last call."""
        with self._lock:
            counts = {path: (self.exports[path], self.bytes[path]) for path in self.exports}
            self.exports.clear()
            self.bytes.clear()
        return counts
