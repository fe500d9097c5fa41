"""TLS session resumption for upstream connections, as Envoy's upstream TLS does by default.

Envoy keeps the last session of each client TLS context (`max_session_keys: 1`) and offers it on the next
connection, so between two sidecars a new connection costs a TLS 1.3 PSK handshake (no certificate signed, sent or
verified) rather than a full one. Python's ssl resumes only when a session is passed to `wrap_bio`, and the event
loops (uvloop's and asyncio's sslproto) never pass one, so `ResumingClientContext` does it in `wrap_bio` itself:
per server name (the SNI: one per cluster and subset for ISTIO_MUTUAL), it offers the freshest session that carries
a ticket, taken from the last connections it made (TLS 1.3 tickets arrive after the handshake, with the first data
read, so a connection still handshaking has none yet).

What stays as safe as a full handshake: a session belongs to its context (a certificate rotation makes a new
context, so new sessions), the server accepts a ticket only if it issued it (else it does a full handshake), and
the resumed connection carries the certificate of the original handshake, which the caller checks again
(UpstreamTLS.check_peer, the SPIFFE id) as for any connection. Costs nothing per request: it runs at connect.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any, Final

RECENT_CONNECTIONS: Final = 16  # per server name: connections whose session may be taken for the next one
LOOKS_PER_CONNECT: Final = 2  # of the oldest of them, at each new connection


class ResumingClientContext(ssl.SSLContext):
    """An `ssl.SSLContext` for the client side that resumes sessions per server name (see the module docstring)."""

    _recent: dict[str | None, deque[ssl.SSLObject]]
    _sessions: dict[str | None, ssl.SSLSession]

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        self._recent = {}  # server name -> its last connections, oldest first, whose sessions are not taken yet
        self._sessions = {}  # server name -> the session offered to its next connection

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: Any = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if server_side:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if session is None:
            session = self.session_for(server_hostname)
        sslobj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        recent = self._recent.get(server_hostname)
        if recent is None:
            recent = self._recent[server_hostname] = deque()
        recent.append(sslobj)
        return sslobj

    def session_for(self, server_hostname: str | None) -> ssl.SSLSession | None:
        """The session to offer to a new connection to this server name: the newest one with a ticket among the
        oldest of the last connections (the oldest are the likeliest to have had their ticket); None before any."""
        recent = self._recent.get(server_hostname)
        for _ in range(LOOKS_PER_CONNECT):
            if not recent:
                break
            try:
                session = recent[0].session
            except ValueError:  # a failed handshake's session cannot even be read ("i2d() failed")
                recent.popleft()
                continue
            if session is not None and session.has_ticket:
                self._sessions[server_hostname] = session
                recent.popleft()
            elif len(recent) >= RECENT_CONNECTIONS:
                recent.popleft()  # no ticket yet and too old to wait for: forgotten
            else:
                break
        return self._sessions.get(server_hostname)
