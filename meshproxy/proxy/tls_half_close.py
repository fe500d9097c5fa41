"""Server-side TLS that passes half-closes on, for TCP over mutual TLS (ssl.MemoryBIO under a plain transport).

The event loop's TLS (uvloop's, asyncio's) closes the whole connection when the client's close_notify arrives, so
what the app still sends is lost. Istio's sidecars half-close: an app that shuts down its sending side reaches the
server's sidecar as a close_notify (then a FIN), and Envoy keeps sending the answer. Here the close_notify (or the
FIN) is the app protocol's `eof_received`, whose True keeps the connection open for the other direction, and
`write_eof()` sends our close_notify and a FIN. TLS 1.3 and OpenSSL allow writing after the peer's close_notify.

`TLSHalfCloseProtocol` is the raw connection's protocol: it runs the handshake, then makes the app protocol (the
same factory as for uvloop's TLS) with a `TLSHalfCloseTransport` whose `get_extra_info("ssl_object")` is the
handshaken `ssl.SSLObject`. Used for connections that will be TCP (a client offering no HTTP protocol by ALPN);
HTTP stays on the event loop's TLS, which is faster.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("meshproxy.transparent")

READ_SIZE: Final = 256 * 1024


class TLSHalfCloseTransport(asyncio.Transport):
    """What the app protocol writes to: plaintext in, TLS records out on the raw transport."""

    def __init__(self, owner: TLSHalfCloseProtocol) -> None:
        super().__init__()
        self._owner = owner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._owner.write_app(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._owner.write_app_eof()

    def close(self) -> None:
        self._owner.close_app()

    def abort(self) -> None:
        self._owner.raw_abort()

    def is_closing(self) -> bool:
        return self._owner.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._owner.sslobj
        if name == "peercert":
            return self._owner.sslobj.getpeercert()
        return self._owner.raw_info(name, default)

    def pause_reading(self) -> None:
        self._owner.raw_call("pause_reading")

    def resume_reading(self) -> None:
        self._owner.raw_call("resume_reading")

    def is_reading(self) -> bool:
        raw = self._owner.raw
        return raw is not None and raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._owner.raw is not None:
            self._owner.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._owner.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._owner.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._owner.app


class TLSHalfCloseProtocol(asyncio.Protocol):
    """The raw connection's protocol (see the module docstring). `done` resolves after the handshake (an exception
    when it failed or timed out, as `connect_accepted_socket(ssl=...)` raises)."""

    def __init__(self, context: ssl.SSLContext, factory: Callable[[], asyncio.Protocol], handshake_timeout: float,
                 done: asyncio.Future[None]) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.factory = factory
        self.handshake_timeout = handshake_timeout
        self.done = done
        self.raw: asyncio.Transport | None = None
        self.app: Any = None
        self.transport: TLSHalfCloseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof_seen = False  # the client's close_notify or FIN, passed on once
        self.sent_eof = False
        self.closing = False

    # ---- the raw connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(self.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.transport is None:
            self._handshake()
            if self.transport is None:
                return
        self._read()

    def eof_received(self) -> bool:
        if self.transport is None:  # before the handshake completed
            self._fail(ConnectionResetError("the client closed during the TLS handshake"))
            return False
        self._read()  # whatever came before the FIN
        return self._app_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is None:
            self._fail(exc or ConnectionResetError("the connection closed during the TLS handshake"))
            return
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---- handshake and records

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._flush()  # the alert, when there is one
            self._fail(exc if isinstance(exc, ssl.SSLError) else ssl.SSLError(str(exc)))
            return
        self._flush()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = TLSHalfCloseTransport(self)
        self.app = self.factory()
        if not self.done.done():
            self.done.set_result(None)
        self.app.connection_made(self.transport)

    def _read(self) -> None:
        if self.eof_seen:
            return
        chunks = []
        zero = False
        try:
            while True:
                chunk = self.sslobj.read(READ_SIZE)
                if not chunk:
                    zero = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            zero = True
        except ssl.SSLError as exc:
            log.debug("TLS record error: %s", exc)
            self.raw_abort()
            return
        self._flush()  # a key update or the like may need an answer
        if chunks and self.app is not None:
            self.app.data_received(b"".join(chunks))
        if zero and not self._app_eof():
            self.close_app()

    def _app_eof(self) -> bool:
        """The client's close_notify or FIN, passed on once; True: the app keeps the other direction open."""
        if self.eof_seen:
            return True
        self.eof_seen = True
        keep = bool(self.app.eof_received())
        if not keep:
            self.close_app()
        return keep

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.raw is not None and not self.raw.is_closing():
            self.raw.write(data)

    def _handshake_timeout(self) -> None:
        self.timer = None
        self._fail(TimeoutError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.raw is not None and not self.raw.is_closing():
            self.raw.close()

    # ---- what the app's transport asks

    def write_app(self, data: bytes) -> None:
        if self.sent_eof or self.closing:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            log.debug("TLS write failed: %s", exc)
            self.raw_abort()
            return
        self._flush()

    def write_app_eof(self) -> None:
        if self.sent_eof:
            return
        self.sent_eof = True
        self._close_notify()
        if self.raw is not None and not self.raw.is_closing() and self.raw.can_write_eof():
            self.raw.write_eof()

    def close_app(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.sent_eof:
            self.sent_eof = True
            self._close_notify()
        if self.raw is not None:
            self.raw.close()

    def _close_notify(self) -> None:
        try:
            self.sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
            pass  # sent; the peer's own close_notify is not waited for
        self._flush()

    def raw_abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def raw_info(self, name: str, default: Any) -> Any:
        return self.raw.get_extra_info(name, default) if self.raw is not None else default

    def raw_call(self, method: str) -> None:
        if self.raw is not None and not self.raw.is_closing():
            getattr(self.raw, method)()
