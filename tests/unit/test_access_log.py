"""The access log writes off the event loop: a stuck stdout or disk holds the writer thread, never a request."""

from __future__ import annotations

import asyncio
import io
import json
import threading

from harness import record
from meshproxy.http1.head import build_request_head
from meshproxy.telemetry.access_log import AccessLog


class StuckOut(io.StringIO):
    """An output whose writes block until released, and which remembers the threads that wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()
        self.writers: set[threading.Thread] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():  # the event loop's thread is not held here:
            self.writing.set()  # a write from it fails the test below at once, instead of hanging it
            self.release.wait(30)
        return super().write(text)


def request(path: bytes) -> object:
    return record(build_request_head(b"GET", path, [(b"host", b"reviews:9080")], "1.1", True))


def test_lines_go_out_in_order_from_a_writer_thread_while_the_output_is_stuck() -> None:
    out = StuckOut()
    log = AccessLog("json", out)

    async def serve() -> None:
        log.log(request(b"/0"), "outbound")  # type: ignore[arg-type]
        log.flush()
        assert await asyncio.to_thread(out.writing.wait, 10)  # the writer holds the first batch, stuck
        for i in range(1, 100):  # the loop goes on logging meanwhile: these calls must not wait for the output
            log.log(request(b"/%d" % i), "outbound")  # type: ignore[arg-type]
        log.flush()

    asyncio.run(serve())
    assert not out.getvalue()  # nothing written yet: the output is still stuck
    out.release.set()
    log.close()
    assert threading.main_thread() not in out.writers
    assert [json.loads(line)["path"] for line in out.getvalue().splitlines()] == [f"/{i}" for i in range(100)]


def test_without_an_event_loop_a_line_is_written_at_once() -> None:
    out = io.StringIO()
    AccessLog("text", out).log(request(b"/x"), "outbound")  # type: ignore[arg-type]
    assert '"GET /x HTTP/1.1"' in out.getvalue()
