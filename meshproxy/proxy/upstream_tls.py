"""Opening a TLS connection to an upstream endpoint, for every upstream protocol (HTTP/1.1, HTTP/2, TCP): TCP, the
handshake with the endpoint's `UpstreamTLS` context for that protocol (its ALPN), then the server's SANs, and only
then the connection's own protocol object.

Envoy checks the server's SANs during the handshake, so nothing is ever written to a server it refuses. Python has
no verify callback, so the check comes just after the handshake; until it passes the transport belongs to a
placeholder protocol (`Handshaken`) that holds what the server sends (an HTTP/2 server's SETTINGS, a server-first
TCP greeting), and the real protocol is made and handed the transport only then: an HTTP/2 preface or a TCP
client's first bytes never reach a server with the wrong identity. The caller makes its protocol knowing the
server's principal (telemetry labels are bound when a TCP connection opens), then calls `Handshaken.hand_over`.

A TCP connection's TLS is `tls_stream.TLSStream.client` rather than asyncio's TLS transport, so that it can
half-close as Envoy's does (close_notify, then keep reading); it holds what arrives until `hand_over` as
`Handshaken` does. HTTP connections never half-close.

Failures are Envoy's: a refused or timed-out connect `ConnectFailureError` (UF, `delayed connect error: ...`), a
failed handshake or a SAN mismatch `TLSFailureError` (UF, `TLS_error:|...:TLS_error_end`, security/client_tls.py).
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import TYPE_CHECKING, Protocol, cast

from .local_reply import ConnectFailureError, TLSFailureError, connect_error
from .tls_stream import TLSStream

if TYPE_CHECKING:
    from ..security.client_tls import UpstreamTLS


class HeldConnection(Protocol):
    """A connection whose handshake is done and whose server passed the check, waiting for its protocol."""

    def hand_over(self, protocol: asyncio.Protocol) -> None: ...

    def selected_alpn(self) -> str | None: ...


class Handshaken(asyncio.Protocol):
    """The transport's protocol between the end of the handshake and the SAN check: keeps what arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.eof = False
        self.lost = False
        self.lost_with: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # kept open: the real protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.lost_with = True, exc

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """The real protocol takes the transport, then hears what arrived meanwhile, in order."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.received:
            protocol.data_received(b"".join(self.received))
            self.received.clear()
        if self.eof and not protocol.eof_received():
            transport.close()
        if self.lost:
            protocol.connection_lost(self.lost_with)

    def selected_alpn(self) -> str | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        return ssl_object.selected_alpn_protocol() if ssl_object is not None else None


async def connect_tls(host: str, port: int, timeout: float, tls: UpstreamTLS, protocol: str,
                      bind: str = "") -> tuple[HeldConnection, str]:
    """(the connection, held until `hand_over`, and the server's SPIFFE principal on mutual TLS, else "");
    ConnectFailureError / TLSFailureError as Envoy words them (see the module docstring). `protocol` is
    client_tls's HTTP11, HTTP2 or TCP: the ALPN offered, and whether HTTP's auto SNI / SAN apply."""
    from ..security.certs import CertError
    from ..security.client_tls import TCP, handshake_failure_reason
    from ..security.peer import peer_principal

    if tls.error:
        raise TLSFailureError("remote connection failure", tls.error)
    try:
        context = tls.context(protocol)
    except CertError as exc:  # files that loaded at config load and no longer do
        raise TLSFailureError("remote connection failure", f"TLS_error:|{exc}:TLS_error_end") from None
    loop = asyncio.get_running_loop()
    held: HeldConnection
    try:
        async with asyncio.timeout(timeout):
            if protocol == TCP:
                stream = TLSStream.client(context, tls.sni(protocol))
                transport, _ = await loop.create_connection(lambda: stream, host, port,
                                                            local_addr=(bind, 0) if bind else None)
                try:
                    await stream.handshake
                except BaseException:
                    transport.abort()
                    raise
                transport, held = stream, stream
            else:
                transport, waiting = await loop.create_connection(
                    Handshaken, host, port, ssl=context, server_hostname=tls.sni(protocol),
                    ssl_handshake_timeout=timeout, local_addr=(bind, 0) if bind else None)
                held = cast(Handshaken, waiting)
    except TimeoutError:
        raise ConnectFailureError("connection timeout") from None
    except ConnectionRefusedError as exc:
        raise ConnectFailureError("remote connection failure",
                                  connect_error(exc.errno or errno.ECONNREFUSED)) from None
    except (ssl.SSLError, ConnectionResetError, ConnectionAbortedError, EOFError) as exc:
        raise TLSFailureError("remote connection failure", handshake_failure_reason(exc)) from None
    except OSError as exc:
        raise ConnectFailureError("remote connection failure", connect_error(exc.errno)) from None
    ssl_object = transport.get_extra_info("ssl_object")
    failure = tls.check_peer(ssl_object, protocol)
    if failure:
        transport.abort()
        raise TLSFailureError("remote connection failure", failure)
    return held, peer_principal(ssl_object) if tls.mutual else ""
