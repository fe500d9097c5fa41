"""TLS over a plain TCP connection with `ssl.MemoryBIO`, for the TCP proxy's upstream: it can half-close, which
asyncio's TLS transport cannot (its `write_eof` is not implemented, and its `close` stops reading).

Envoy's TLS socket, on the downstream's end of stream, sends close_notify, shuts the TCP write side and keeps
reading until the server closes; a TCP client that half-closes (sends a request, then EOF, then reads the answer)
works the same through meshproxy. `TLSStream` is the TCP transport's protocol and, once the handshake is done and
the caller has checked the server's identity, the transport of the proxy's upstream protocol (`hand_over`).
Decrypted bytes that arrive before the hand-over are kept and delivered then.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Final, cast

READ_SIZE: Final = 65536


class TLSStream(asyncio.Protocol):
    """A client TLS connection (see the module docstring). `handshake` resolves when the handshake is done, or
    fails with the handshake's error (an ssl.SSLError, or ConnectionResetError when the server closed)."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname or None)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.app: asyncio.Protocol | None = None
        self.held: list[bytes] = []  # application bytes before the hand-over
        self.peer_closed = False  # close_notify or FIN from the server
        self.shut = False  # our close_notify sent
        self.failed: Exception | None = None  # a TLS error after the handshake: the connection was reset for it

    # ---- the TCP transport's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshake.done():
            self._handshake()
        if self.handshake.done() and not self.handshake.exception():
            self._read()

    def eof_received(self) -> bool:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionResetError("closed by the server during the handshake"))
            return False
        self._peer_end()
        return True  # our direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("closed by the server during the handshake"))
        elif self.app is not None:
            self.app.connection_lost(exc or self.failed)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self.handshake.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self._flush()
        self.handshake.set_result(None)

    def _read(self) -> None:
        while True:
            try:
                chunk = self.ssl.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the server's direction is over
                self._peer_end()
                break
            except ssl.SSLError as exc:  # a fatal alert, a bad record: reset, as an error
                self._fail(exc)
                return
            if not chunk:
                break
            if self.app is not None:
                self.app.data_received(chunk)
            else:
                self.held.append(chunk)
        self._flush()  # what reading produced (key updates, alerts)

    def _peer_end(self) -> None:
        if self.peer_closed:
            return
        self.peer_closed = True
        if self.app is not None and not self.app.eof_received() and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        self.failed = exc
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ---- the upstream protocol's transport

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        self.app = protocol
        protocol.connection_made(cast(asyncio.Transport, self))
        if self.held:
            protocol.data_received(b"".join(self.held))
            self.held.clear()
        if self.peer_closed:
            self.peer_closed = False
            self._peer_end()

    def selected_alpn(self) -> str | None:
        return self.ssl.selected_alpn_protocol()

    def write(self, data: bytes) -> None:
        if self.shut or self.failed is not None:
            return
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then the TCP write side shut, as Envoy's TLS socket at the end of the stream."""
        self._close_notify()
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        self._close_notify()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    def _close_notify(self) -> None:
        if self.shut or not self.handshake.done() or self.handshake.exception():
            return
        self.shut = True
        try:
            self.ssl.unwrap()
        except ssl.SSLWantReadError:  # the server's close_notify is still to come: reading goes on
            pass
        except ssl.SSLError:
            pass
        self._flush()
