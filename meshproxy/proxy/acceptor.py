"""Accepting connections by hand, for the listeners that decide per connection before a protocol is made (TLS or
plaintext from the first bytes, the handshake, the original destination): `proxy/secure_server.py` and
`proxy/transparent_tls.py`.

- Each time a listening socket is readable, every queued connection is taken (up to ACCEPTS_PER_WAKEUP), as
  asyncio's own servers do: one accept per wake-up left a burst of new clients, and their handshakes, waiting
  behind whole loop iterations (benchmarks/README.md, mtls-handshakes).
- Each connection is then served by its own task (`serve(conn)`); at most MAX_PENDING are between accept and their
  protocol at once (a flood of clients that never finish a handshake is closed at accept: bounded memory).
- An accept error (EMFILE and the like) stops accepting for ACCEPT_RETRY_DELAY rather than spinning.

`wait_readable` is the wait both listeners use while they peek at a client's first bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

log = logging.getLogger("meshproxy.listener")

BACKLOG: Final = 4096
MAX_PENDING: Final = 1024  # connections between accept and their protocol (detection, handshake); more are closed
ACCEPTS_PER_WAKEUP: Final = 64  # connections taken each time the listening socket is readable
ACCEPT_RETRY_DELAY: Final = 0.1  # seconds without accepting after an accept error (EMFILE): no busy loop


class Acceptor:
    """Accepts on `sockets` and runs `serve(conn)` for each connection (see the module docstring)."""

    def __init__(self, sockets: list[socket.socket], serve: Callable[[socket.socket], Coroutine[Any, Any, None]],
                 what: str) -> None:
        self.sockets = sockets
        self.serve = serve
        self.what = what  # the listener, for the log
        self.pending: set[asyncio.Task[None]] = set()  # connections between accept and their protocol
        self.refused = 0  # closed at accept: too many connections still pending
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._paused: dict[int, asyncio.TimerHandle] = {}  # by socket index: accepting again after an error
        for index, sock in enumerate(sockets):
            self._loop.add_reader(sock.fileno(), self._accept, index)

    def close(self) -> None:
        """Stop accepting and close the sockets and the pending connections (may be called more than once: a drain
        closes the listeners, so does the stop)."""
        if not self.closed:
            self.closed = True
            for index, sock in enumerate(self.sockets):
                timer = self._paused.pop(index, None)
                if timer is not None:
                    timer.cancel()
                elif sock.fileno() >= 0:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        for task in list(self.pending):
            task.cancel()

    def _accept(self, index: int) -> None:
        loop = self._loop
        listener = self.sockets[index]
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.what, exc)
                loop.remove_reader(listener.fileno())
                self._paused[index] = loop.call_later(ACCEPT_RETRY_DELAY, self._resume, index)
                return
            if len(self.pending) >= MAX_PENDING:
                self.refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self.serve(conn))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _resume(self, index: int) -> None:
        del self._paused[index]
        self._loop.add_reader(self.sockets[index].fileno(), self._accept, index)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def wait_readable(conn: socket.socket, deadline: float | None) -> bool:
    """Until `conn` has bytes (or its end) to read: True, or False at `deadline` (loop time; None: no limit)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), _wake, ready)
    try:
        if deadline is None:
            await ready
        else:
            async with asyncio.timeout_at(deadline):
                await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(conn.fileno())
