"""TLS on `ssl.MemoryBIO` under a plain TCP transport, for the TCP connections that must half-close: the TCP
proxy's TLS upstreams (client side, `upstream_tls.connect_tls`) and TCP over mutual TLS on the transparent inbound
listener (server side, `transparent_tls`). HTTP stays on the event loop's TLS, which is faster: it never half-closes.

The event loop's TLS transport (asyncio's, uvloop's) cannot half-close: its `write_eof` is not implemented, and the
peer's close_notify or FIN closes the whole connection, so what the other direction still carries is lost. Envoy's
TLS socket passes half-closes on, and Istio's sidecars rely on it: at the end of its stream it sends close_notify,
shuts the TCP write side and keeps reading; the peer's close_notify (or FIN) ends one direction only. Here the
peer's close_notify or FIN is the app protocol's `eof_received` (its True keeps the other direction open), and
`write_eof()` sends our close_notify, then a FIN. TLS 1.3 and OpenSSL allow writing after the peer's close_notify.

`TLSStream` is both the raw transport's protocol (the record layer: handshake, reads, close_notify, flow control,
handshake timeout, failures) and the app protocol's transport, whose `get_extra_info("ssl_object")` is the
handshaken `ssl.SSLObject`. The two sides differ only in how the app protocol comes: a server makes it with its
factory as soon as the handshake is done (`TLSStream.server`); a client waits until its caller has checked the
server's identity and hands the protocol over then (`TLSStream.client`, `hand_over`: a `HeldConnection`), and what
came meanwhile (the server's bytes, its close_notify, the connection's loss) is kept and delivered at the hand-over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

log = logging.getLogger("meshproxy.tls")

READ_SIZE: Final = 256 * 1024


class TLSStream(asyncio.Protocol, asyncio.Transport):
    """One TLS connection (see the module docstring). `handshake` resolves when the handshake is done, or fails with
    its error: an ssl.SSLError, ConnectionResetError when the peer closed, TimeoutError past `handshake_timeout`."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str = "",
                 app_factory: Callable[[], asyncio.Protocol] | None = None, handshake_timeout: float | None = None,
                 handshake: asyncio.Future[None] | None = None) -> None:
        super().__init__()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname or None)
        self.handshake = handshake if handshake is not None else asyncio.get_running_loop().create_future()
        self.app_factory = app_factory  # None: the app protocol comes by `hand_over`
        self.handshake_timeout = handshake_timeout  # None: the caller bounds the handshake
        self.raw: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.handshaken = False
        self.held: list[bytes] = []  # application bytes before the hand-over
        self.lost: tuple[Exception | None] | None = None  # the connection lost before the hand-over (its error)
        self.peer_ended = False  # the peer's close_notify or FIN: passed on once, at the hand-over if before it
        self.shut = False  # our close_notify sent
        self.closing = False
        self.failed: Exception | None = None  # a TLS error after the handshake: the connection was reset for it

    @classmethod
    def client(cls, context: ssl.SSLContext, server_hostname: str) -> TLSStream:
        """A client connection, held after its handshake until `hand_over`."""
        return cls(context, server_side=False, server_hostname=server_hostname)

    @classmethod
    def server(cls, context: ssl.SSLContext, app_factory: Callable[[], asyncio.Protocol], handshake_timeout: float,
               handshake: asyncio.Future[None]) -> TLSStream:
        """A server connection: `app_factory()` is its protocol once the handshake is done; `handshake` fails
        as `connect_accepted_socket(ssl=...)` raises."""
        return cls(context, server_side=True, app_factory=app_factory, handshake_timeout=handshake_timeout,
                   handshake=handshake)

    # ---- the raw connection's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        if self.handshake_timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(self.handshake_timeout, self._handshake_timed_out)
        self._handshake()  # a client's ClientHello; a server has nothing to say yet

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        self._read()

    def eof_received(self) -> bool:
        if not self.handshaken:
            self._handshake_failed(ConnectionResetError("the peer closed the connection during the TLS handshake"))
            return False
        self._peer_end()
        return True  # our direction may still be flowing (the app closes it when it is done)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._stop_timer()
        if not self.handshaken:
            self._handshake_failed(exc or ConnectionResetError("the connection closed during the TLS handshake"))
            return
        exc = exc or self.failed
        if self.app is None:
            self.lost = (exc,)
        else:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---- the record layer

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._flush()  # the alert, when there is one
            self._handshake_failed(ssl.SSLError(str(exc)) if isinstance(exc, ValueError) else exc)
            return
        self._flush()
        self.handshaken = True
        self._stop_timer()
        app = self.app_factory() if self.app_factory is not None else None
        if not self.handshake.done():
            self.handshake.set_result(None)
        if app is not None:
            self.hand_over(app)

    def _handshake_timed_out(self) -> None:
        self.timer = None
        self._handshake_failed(TimeoutError("TLS handshake timed out"))

    def _handshake_failed(self, exc: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.raw is not None and not self.raw.is_closing():
            self.raw.close()  # after the alert, when there is one

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _read(self) -> None:
        if self.peer_ended or self.closing:
            return
        chunks = []
        ended = False
        try:
            while True:
                chunk = self.ssl.read(READ_SIZE)
                if not chunk:  # the peer's close_notify
                    ended = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify, after ours
            ended = True
        except ssl.SSLError as exc:  # a fatal alert, a bad record: the connection is reset, as an error
            log.debug("TLS record error: %s", exc)
            self.failed = exc
            self.abort()
            return
        self._flush()  # what reading produced (a key update's answer)
        if chunks:
            data = b"".join(chunks)
            if self.app is not None:
                self.app.data_received(data)
            else:
                self.held.append(data)
        if ended:
            self._peer_end()

    def _peer_end(self) -> None:
        if self.peer_ended:
            return
        self.peer_ended = True
        if self.app is not None and not self.closing:
            self._pass_end(self.app)

    def _pass_end(self, app: asyncio.Protocol) -> None:
        if not app.eof_received():
            self.close()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.raw is not None and not self.raw.is_closing():
            self.raw.write(data)

    def _close_notify(self) -> None:
        if self.shut or not self.handshaken:
            return
        self.shut = True
        try:
            self.ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
            pass  # sent; the peer's close_notify is not waited for (reading goes on)
        self._flush()

    # ---- the client's hand-over (a HeldConnection, see upstream_tls.py)

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """The app protocol takes the connection, then hears what arrived meanwhile, in order."""
        self.app = protocol
        protocol.connection_made(self)
        app = self.app  # connection_made may have passed the transport on (set_protocol)
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            app.data_received(data)
        if self.peer_ended:
            self._pass_end(app)
        if self.lost is not None:
            app.connection_lost(self.lost[0])

    def selected_alpn(self) -> str | None:
        return self.ssl.selected_alpn_protocol()

    # ---- the app protocol's transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.shut or self.closing:
            return
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            log.debug("TLS write failed: %s", exc)
            self.failed = exc
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then the TCP write side shut, as Envoy's TLS socket at the end of the stream."""
        if self.shut:
            return
        self._close_notify()
        raw = self.raw
        if raw is not None and not raw.is_closing() and raw.can_write_eof():
            raw.write_eof()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._close_notify()
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing or self.raw is None or self.raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl
        if name == "peercert":
            return self.ssl.getpeercert()
        return self.raw.get_extra_info(name, default) if self.raw is not None else default

    def pause_reading(self) -> None:
        if self.raw is not None and not self.raw.is_closing():
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.raw is not None and not self.raw.is_closing():
            self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw is not None and self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() if self.raw is not None else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self.app)
