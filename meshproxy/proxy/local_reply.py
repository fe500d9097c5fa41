"""Errors -> Envoy's local replies: status, body and response flag, in one place.

Bodies are Envoy's own strings, so clients and tests written against Istio see
the same answers (router.cc onUpstreamReset / sendNoHealthyUpstreamResponse,
fault_filter.cc, conn_manager_impl.cc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Response flags (Envoy %RESPONSE_FLAGS% short names).
NR: Final = "NR"  # no route
NC: Final = "NC"  # no cluster
UH: Final = "UH"  # no healthy upstream
UF: Final = "UF"  # upstream connection failure
UC: Final = "UC"  # upstream connection termination
UT: Final = "UT"  # upstream request timeout
UO: Final = "UO"  # upstream overflow (circuit breaker)
URX: Final = "URX"  # retry limit exceeded
UPE: Final = "UPE"  # upstream protocol error
DC: Final = "DC"  # downstream connection termination
DPE: Final = "DPE"  # downstream protocol error
FI: Final = "FI"  # fault injection abort
DI: Final = "DI"  # fault injection delay

RESET_PREFIX: Final = "upstream connect error or disconnect/reset before headers. "


class UpstreamError(Exception):
    """An attempt that ended without a usable response; carries the reply Envoy would make."""

    status = 503
    flag = UC
    reason = "connection termination"
    retriable_as_connect_failure = False

    def body(self, retried: bool) -> bytes:
        lead = "retried and the latest " if retried else ""
        return f"{RESET_PREFIX}{lead}reset reason: {self.reason}".encode()


class ConnectFailureError(UpstreamError):
    flag = UF
    retriable_as_connect_failure = True

    def __init__(self, reason: str = "remote connection failure", transport: str = "") -> None:
        super().__init__(reason)
        self.reason = reason + (f", transport failure reason: {transport}" if transport else "")


class ConnectionTerminationError(UpstreamError):
    """The upstream closed or reset before a complete response head."""


class UpstreamProtocolError(UpstreamError):
    status = 502
    flag = UPE
    reason = "protocol error"


class ResponseResetError(UpstreamError):
    """The upstream went away after the response head was sent downstream: reset the client."""


class UpstreamOverflowError(UpstreamError):
    """A circuit breaker limit was hit (connections + pending, requests): 503 UO, never retried."""

    flag = UO
    reason = "overflow"


OVERLOADED_HEADER: Final = ((b"x-envoy-overloaded", b"true"),)


class UpstreamTimeoutError(UpstreamError):
    """The route timeout (or the last per-try timeout) expired: 504, never retried after the route timeout."""

    status = 504
    flag = UT
    reason = "upstream request timeout"

    def __init__(self, per_try: bool = False) -> None:
        super().__init__(self.reason)
        self.per_try = per_try

    def body(self, retried: bool) -> bytes:
        return b"upstream request timeout"


class RetriableResponse(UpstreamError):
    """A real upstream response the retry policy discards (not an error the client sees)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"retriable response {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    flag: str


NO_ROUTE: Final = Reply(404, b"", NR)
NO_CLUSTER: Final = Reply(503, b"", NC)
NO_HEALTHY_UPSTREAM: Final = Reply(503, b"no healthy upstream", UH)
FAULT_ABORT_BODY: Final = b"fault filter abort"
