"""A listener that terminates mutual TLS with the workload certificates: Istio's inbound PeerAuthentication modes.

- DISABLE: plaintext, as a listener without certificates.
- STRICT: every connection is a TLS handshake that requires a client certificate signed by the mesh roots; a
  plaintext client fails the handshake and is closed.
- PERMISSIVE: decided per connection from its first bytes, as Envoy's tls_inspector: a TLS record header
  (handshake 0x16, version 0x03) is mutual TLS as in STRICT, anything else plaintext. The bytes are peeked, not
  read, so whichever side takes the connection sees them all. A client that sends nothing within
  `detect_timeout` is taken as plaintext (a server-first protocol), as Istio's listener filter timeout does.

`mode` may change while the listener runs (a PeerAuthentication applied by a reload): it is read at each accept.
The handshake runs on the event loop's own TLS (uvloop's), with the context current at accept time: rotated
certificates serve new connections, open ones keep theirs. The connection's protocol (the HTTP/1.1 listener)
reads the peer's identity from its transport when it is made (see `ListenerContext.secure`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final

from .acceptor import BACKLOG, Acceptor, wait_readable

log = logging.getLogger("meshproxy.listener")

DISABLE: Final = "DISABLE"
PERMISSIVE: Final = "PERMISSIVE"
STRICT: Final = "STRICT"
MODES: Final = (DISABLE, PERMISSIVE, STRICT)
TLS_HANDSHAKE_RECORD: Final = 0x16
TLS_MAJOR_VERSION: Final = 0x03
HANDSHAKE_TIMEOUT: Final = 10.0  # Istio's inbound transport_socket_connect_timeout... bounded like a request head
# What an Istio sidecar's inbound TLS context offers (Istio's ALPNDownstream): the client's HTTP version is selected,
# h2 when it offers it (curl, grpcio; Istio's sidecars offer `istio-h2`, `istio` and `h2` to an HTTP/2 upstream,
# `istio-http/1.1`, `istio`, `http/1.1` otherwise). The `istio-*` names only pick Envoy's filter chain; none is
# selected. The connection's first bytes then say which codec serves it (the HTTP/2 preface, or a request line).
INBOUND_ALPN: Final = ("h2", "http/1.1")


def looks_like_tls(first: bytes) -> bool | None:
    """A TLS record header starts 0x16 0x03; None: not enough bytes to say."""
    if not first:
        return None
    if first[0] != TLS_HANDSHAKE_RECORD:
        return False
    if len(first) < 2:
        return None
    return first[1] == TLS_MAJOR_VERSION


def no_context() -> ssl.SSLContext:
    """A plaintext listener's: it never terminates TLS (its mode stays DISABLE)."""
    raise RuntimeError("this listener has no certificates: it cannot terminate TLS")


class SecureServer:
    """Accepts connections itself (see the module docstring); `close()` as asyncio.Server's."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], mode: str,
                 context: Callable[[], ssl.SSLContext] = no_context, detect_timeout: float = 10.0,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        if mode not in MODES:
            raise ValueError(f"inbound TLS mode {mode!r}: expected one of {', '.join(MODES)}")
        self.sockets = [sock]
        self.factory = factory
        self.mode = mode
        self.context = context
        self.detect_timeout = detect_timeout
        self.handshake_timeout = handshake_timeout
        self.handshake_failures = 0
        self._loop = asyncio.get_running_loop()
        self.acceptor = Acceptor(self.sockets, self._serve, "inbound")

    @property
    def pending(self) -> set[asyncio.Task[None]]:
        """Connections between accept and their protocol (detection, handshake)."""
        return self.acceptor.pending

    @classmethod
    async def listen(cls, host: str, port: int, factory: Callable[[], asyncio.Protocol], mode: str,
                     context: Callable[[], ssl.SSLContext] = no_context, reuse_port: bool = False,
                     detect_timeout: float = 10.0) -> SecureServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(sock, factory, mode, context, detect_timeout)

    def close(self) -> None:
        """Stop accepting (may be called more than once: a drain closes the listeners, so does the stop)."""
        self.acceptor.close()

    async def _serve(self, conn: socket.socket) -> None:
        mode = self.mode
        try:
            if mode == PERMISSIVE:
                tls = await self._detect(conn)
                if tls is None:  # closed before a byte
                    conn.close()
                    return
            else:
                tls = mode == STRICT
            if tls:
                await self._loop.connect_accepted_socket(self.factory, conn, ssl=self.context(),
                                                         ssl_handshake_timeout=self.handshake_timeout)
            else:
                await self._loop.connect_accepted_socket(self.factory, conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
            self.handshake_failures += 1
            log.debug("inbound TLS handshake failed (%s): %s", mode, exc)
            conn.close()

    async def _detect(self, conn: socket.socket) -> bool | None:
        """Peek at the first bytes: True for TLS, False for plaintext, None when the client closed first."""
        loop = self._loop
        deadline = loop.time() + self.detect_timeout if self.detect_timeout > 0 else None
        while True:
            try:
                first = conn.recv(2, socket.MSG_PEEK)
            except BlockingIOError:
                first = None
            if first is not None:
                if not first:
                    return None
                verdict = looks_like_tls(first)
                if verdict is not None:
                    return verdict
            if first:  # one byte, 0x16: the second is on its way; the socket stays readable meanwhile, so no reader
                if deadline is not None and loop.time() >= deadline:
                    return True
                await asyncio.sleep(0.005)
                continue
            if not await wait_readable(conn, deadline):
                return False  # nothing within the detection timeout: a server-first protocol, plaintext
