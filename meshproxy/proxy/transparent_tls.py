"""The transparent inbound listener (Istio's 15006) when the proxy has workload certificates: mutual TLS terminated
per connection as the PeerAuthentication of its original destination port says, as an Istio sidecar's
virtualInbound filter chains do (pilot/pkg/networking/core/filterchain_options.go).

Each accepted connection's original destination is read first (SO_ORIGINAL_DST); its port picks the mode
(`mode_for_port`: the workload policy's port-level mode, else the workload's; PERMISSIVE by default):

- STRICT: a TLS handshake that requires a client certificate signed by the mesh roots; anything else (a plaintext
  client, a client without a certificate, nothing within the handshake timeout) is closed.
- PERMISSIVE: the first bytes decide, peeked (never read): a ClientHello offering one of Istio's mTLS ALPN
  protocols (`istio`, `istio-peer-exchange`, `istio-http/1.0`, `istio-http/1.1`, `istio-h2`: what Istio's sidecars
  offer) is mutual TLS as under STRICT; plaintext, or TLS without those (an app's own TLS, as Istio's "plain TLS"
  filter chain), is taken as it is and passed to the app.
- DISABLE: as it is, nothing peeked (server-first protocols work).

Then the connection is the ordinary transparent one (`transparent.Intercepted`, told the original destination):
on mutual TLS it reads the decrypted bytes, so HTTP/1.1, HTTP/2 (ALPN `h2`: the preface follows) and TCP are told
apart as on plaintext (a client that offered no HTTP protocol by ALPN is TCP: Istio's mTLS TCP chain), and the
client's principal and SNI feed authorization and metrics. The mode is
read at each accept: a reload changes it for new connections. The server context is the one current at accept
time (rotated certificates serve new connections). A client offering HTTP by ALPN (`h2`, `http/1.1`) gets the
event loop's TLS (uvloop's, fast); one offering none (TCP over mutual TLS) gets `tls_stream.py`'s, which passes
a half-close on where the event loop's TLS would close the whole connection at the client's close_notify.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final

from . import sniff
from .acceptor import BACKLOG, Acceptor, wait_readable
from .secure_server import HANDSHAKE_TIMEOUT, INBOUND_ALPN, PERMISSIVE, STRICT, looks_like_tls
from .tls_stream import TLSStream
from .transparent import Intercepted, Interception, original_destination

log = logging.getLogger("meshproxy.transparent")

# Istio's allIstioMtlsALPNs: a client offering one of them is a sidecar speaking mutual TLS
ISTIO_MTLS_ALPN: Final = frozenset({"istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"})
# While a ClientHello arrives in pieces the socket stays readable (peeked bytes stay): no reader to wait on, so
# it is looked at again after a pause that doubles, from POLL to MAX_POLL (a stalled client costs little).
POLL: Final = 0.005
MAX_POLL: Final = 0.2


def offers_istio_mtls(hello: bytes) -> bool:
    return any(protocol in ISTIO_MTLS_ALPN for protocol in sniff.alpn(hello))


def offers_http(hello: bytes) -> bool:
    """Whether the server will select an HTTP protocol by ALPN (else the connection is TCP over mutual TLS)."""
    return any(protocol in INBOUND_ALPN for protocol in sniff.alpn(hello))


def listen_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for `host`; 0.0.0.0 also gets [::] where the host has IPv6 (as the plaintext listener)."""
    hosts = [host, "::"] if host == "0.0.0.0" and socket.has_ipv6 else [host]
    out: list[socket.socket] = []
    for index, name in enumerate(hosts):
        family = socket.AF_INET6 if ":" in name else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((name, port if index == 0 else out[0].getsockname()[1]))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if index > 0 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                log.info("transparent inbound: IPv6 unavailable here (%s): listening on IPv4 only", exc)
                break
            for made in out:
                made.close()
            raise
        out.append(sock)
    return out


class TransparentTLSServer:
    """Accepts on its sockets itself (see the module docstring); `close()` as asyncio.Server's."""

    def __init__(self, socks: list[socket.socket], interception: Interception, mode_for_port: Callable[[int], str],
                 context: Callable[[], ssl.SSLContext], detect_timeout: float = 0.0,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.sockets = socks
        self.interception = interception
        self.mode_for_port = mode_for_port
        self.context = context
        self.detect_timeout = detect_timeout  # 0: wait for the client's first bytes (Istio's protocolDetectionTimeout)
        self.handshake_timeout = handshake_timeout
        self.handshake_failures = 0
        self._loop = asyncio.get_running_loop()
        self.acceptor = Acceptor(socks, self._serve, "transparent inbound")

    def close(self) -> None:
        self.acceptor.close()

    async def _serve(self, conn: socket.socket) -> None:
        transport: asyncio.BaseTransport | None = None  # once made, the connection is the transport's to close
        mode, port = "", 0
        try:
            destination = self.interception.fixed_destination or original_destination(conn)
            local = conn.getsockname()
            if destination is None or (local[0], local[1]) == destination:
                log.debug("transparent inbound: connection without an original destination (not redirected): "
                          "closed")
                conn.close()
                return
            mode, port = self.mode_for_port(destination[1]), destination[1]
            interception = self.interception

            def factory() -> asyncio.Protocol:
                return Intercepted(interception, destination)  # type: ignore[return-value]  # a protocol

            hello = b""
            if mode == STRICT:  # the ClientHello, within the handshake's time: its ALPN picks the TLS below
                peeked = await self._client_hello(conn, self.handshake_timeout)
                if not peeked:  # gone, silent, or plaintext: no handshake to make
                    self.handshake_failures += 1
                    conn.close()
                    return
                hello, tls = peeked, True
            elif mode == PERMISSIVE:
                peeked = await self._client_hello(conn, self.detect_timeout)
                if peeked is None:
                    conn.close()
                    return
                hello, tls = peeked, bool(peeked) and offers_istio_mtls(peeked)
            else:
                tls = False
            if tls and not offers_http(hello):  # TCP over mutual TLS: a TLS that passes half-closes on
                done = self._loop.create_future()
                context = self.context()
                transport, _ = await self._loop.connect_accepted_socket(
                    lambda: TLSStream.server(context, factory, self.handshake_timeout, done), conn)
                await done
            elif tls:
                await self._loop.connect_accepted_socket(factory, conn, ssl=self.context(),
                                                         ssl_handshake_timeout=self.handshake_timeout)
            else:
                await self._loop.connect_accepted_socket(factory, conn)
        except asyncio.CancelledError:
            _drop(conn, transport)
            raise
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
            self.handshake_failures += 1
            log.debug("transparent inbound: TLS handshake failed (%s, port %d): %s", mode, port, exc)
            _drop(conn, transport)
        except Exception:  # never an unretrieved task error: the connection goes, the listener stays
            log.exception("transparent inbound: connection failed (%s, port %d)", mode, port)
            _drop(conn, transport)

    async def _client_hello(self, conn: socket.socket, timeout: float) -> bytes | None:
        """The first bytes, peeked: b"" when they are not TLS (or nothing came within `timeout`; 0: no limit), the
        ClientHello when they are (whole, or what came within the handshake timeout), None when the client left."""
        loop = self._loop
        deadline = loop.time() + timeout if timeout > 0 else None
        hello_deadline = 0.0
        pause = POLL
        while True:
            try:
                data: bytes | None = conn.recv(sniff.MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data is not None:
                if not data:
                    return None
                verdict = looks_like_tls(data)
                if verdict is False:
                    return b""
                if verdict and sniff.client_hello_complete(data):
                    return data
                if not hello_deadline:
                    hello_deadline = loop.time() + self.handshake_timeout
                if loop.time() >= hello_deadline:
                    return data if verdict else b""
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_POLL)
                continue
            if not await wait_readable(conn, deadline):
                return b""  # nothing within the detection timeout: a server-first protocol, as it is


def _drop(conn: socket.socket, transport: asyncio.BaseTransport | None) -> None:
    """Close a connection that failed: its transport when one took the socket (it owns the descriptor then)."""
    if transport is not None:
        transport.close()  # the TLS under it aborts what is pending
    else:
        conn.close()

