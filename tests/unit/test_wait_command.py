"""`meshproxy wait` (the postStart hook of holdApplicationUntilProxyStarts): returns once the readiness URL
answers 200, fails after its timeout, against a real HTTP server on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Readiness(ThreadingHTTPServer):
    not_ready_answers = 0  # 503s before the first 200 (-1: never ready)
    asked = 0


class Handler(BaseHTTPRequestHandler):
    server: Readiness

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.asked += 1
        ready = self.server.not_ready_answers >= 0 and self.server.asked > self.server.not_ready_answers
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readiness() -> Iterator[Readiness]:
    server = Readiness(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def wait(server: Readiness, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz/ready"
    return subprocess.run([sys.executable, "-m", "meshproxy", "wait", "--url", url, "--period-millis", "20", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_returns_once_ready(readiness: Readiness) -> None:
    readiness.not_ready_answers = 3
    result = wait(readiness, "--timeout-seconds", "30")
    assert result.returncode == 0, result.stderr
    assert readiness.asked == 4
    assert "ready" in result.stderr


def test_fails_after_the_timeout_naming_the_last_answer(readiness: Readiness) -> None:
    readiness.not_ready_answers = -1
    result = wait(readiness, "--timeout-seconds", "0.3")
    assert result.returncode == 1
    assert "not ready after 0.3 s (status 503)" in result.stderr
    assert readiness.asked >= 2
