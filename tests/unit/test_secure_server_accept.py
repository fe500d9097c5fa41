"""The inbound mTLS listener (proxy/secure_server.py) takes every queued connection when its socket is readable,
not one per event-loop iteration: under a burst of new connections (one request per connection between sidecars)
one accept per wake-up left connections, and their handshakes, waiting behind whole loop iterations."""

from __future__ import annotations

import asyncio
import socket
import ssl

import uvloop

from meshproxy.proxy.acceptor import ACCEPTS_PER_WAKEUP
from meshproxy.proxy.secure_server import PERMISSIVE, SecureServer

BURST = 40


def test_a_burst_of_connections_is_accepted_in_one_wake_up() -> None:
    async def main() -> tuple[int, int]:
        server = await SecureServer.listen("127.0.0.1", 0, asyncio.Protocol, PERMISSIVE,
                                           lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), detect_timeout=30)
        port = server.sockets[0].getsockname()[1]
        clients = []
        try:
            for _ in range(BURST):  # the kernel completes each connect into the listen backlog, the loop not running
                clients.append(socket.create_connection(("127.0.0.1", port)))
            # silent clients stay in PERMISSIVE's detection: each accepted one is a pending task
            for _ in range(3):
                await asyncio.sleep(0)
            accepted_early = len(server.pending)
            for _ in range(100):
                if len(server.pending) == BURST:
                    break
                await asyncio.sleep(0.01)
            return accepted_early, len(server.pending)
        finally:
            for client in clients:
                client.close()
            server.close()
            server.close()  # twice, as a drain and then the stop do: no error

    assert BURST <= ACCEPTS_PER_WAKEUP
    accepted_early, accepted = uvloop.run(main())
    assert accepted == BURST
    assert accepted_early == BURST, f"{accepted_early} of {BURST} accepted after three loop iterations"
