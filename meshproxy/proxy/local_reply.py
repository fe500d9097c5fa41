"""Errors -> Envoy's local replies: status, body, response flag and response code details, in one place.

Bodies and details are Envoy 1.40's own strings, so clients, dashboards and tests written against Istio see the
same answers (router.cc onUpstreamReset / sendNoHealthyUpstreamResponse, fault_filter.cc, conn_manager_impl.cc).
An upstream reset is detailed as Envoy 1.40 does it, checked against Envoy itself
(tests/integration/test_security_envoy.py): `upstream_reset_before_response_started{<reset reason>[|<transport
failure reason>]}` with spaces made underscores, e.g. `...{remote_connection_failure|delayed_connect_error:_Connection
_refused}`; the body names the reset reason only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from ..http1.errors import ProtocolError
from ..http2.grpc import GRPC_CONTENT_TYPE, GRPC_STATUS, GRPC_UNKNOWN
from ..stream_info import DPE, NC, NR, SI, UC, UF, UH, UO, UPE, UR, UT

RESET_PREFIX: Final = "upstream connect error or disconnect/reset before headers. "
RESET_BEFORE: Final = "upstream_reset_before_response_started"
RESET_AFTER: Final = "upstream_reset_after_response_started"


def reset_details(started: bool, reason: str, transport: str = "") -> str:
    """Envoy's details for an upstream reset: the reason (and transport failure), spaces as underscores."""
    inside = f"{reason}|{transport}" if transport else reason
    return f"{RESET_AFTER if started else RESET_BEFORE}{{{inside}}}".replace(" ", "_")


def connect_error(code: int | None) -> str:
    """Envoy's transport failure reason for a failed connect: the error's text (`delayed connect error: Connection
    refused`, written `delayed_connect_error:_Connection_refused` in details and logs)."""
    return f"delayed connect error: {os.strerror(code) if code else 'unknown'}"


class UpstreamError(Exception):
    """An attempt that ended without a usable response; carries the reply Envoy would make."""

    status = 503
    flag = UC
    reason = "connection termination"
    transport = ""  # the transport failure reason (a connect error), if any

    def body(self, retried: bool) -> bytes:
        lead = "retried and the latest " if retried else ""
        return f"{RESET_PREFIX}{lead}reset reason: {self.reason}".encode()

    def details(self, started: bool = False) -> str:
        return reset_details(started, self.reason, self.transport)


class ConnectFailureError(UpstreamError):
    flag = UF

    def __init__(self, reason: str = "remote connection failure", transport: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.transport = transport


class TLSFailureError(ConnectFailureError):
    """The upstream TLS handshake failed, or the server's certificate is not one the cluster accepts: 503 UF, the
    transport failure reason `TLS_error:|...:TLS_error_end` (security/client_tls.py)."""


class ConnectionTerminationError(UpstreamError):
    """The upstream closed or reset before a complete response head."""


class UpstreamProtocolError(UpstreamError):
    status = 502
    flag = UPE
    reason = "protocol error"


class ResponseResetError(UpstreamError):
    """The upstream went away after the response head was sent downstream: reset the client."""


class RemoteResetError(UpstreamError):
    """The upstream reset the stream (HTTP/2 RST_STREAM): Envoy's UR, `remote reset`."""

    flag = UR
    reason = "remote reset"


class RefusedStreamError(RemoteResetError):
    """RST_STREAM REFUSED_STREAM, or a stream above the upstream's GOAWAY: never processed (retryOn refused-stream)."""

    reason = "remote refused stream reset"


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

    def details(self, started: bool = False) -> str:
        return "response_timeout"


class RetriableResponse(UpstreamError):
    """A real upstream response the retry policy discards (not an error the client sees)."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(f"retriable response {status}")
        self.status = status
        self.why = why or f"retriable status {status}"  # the record's retry reason


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    flag: int
    details: str


NO_ROUTE: Final = Reply(404, b"", NR, "route_not_found")
NO_CLUSTER: Final = Reply(503, b"", NC, "cluster_not_found")
NO_HEALTHY_UPSTREAM: Final = Reply(503, b"no healthy upstream", UH, "no_healthy_upstream")
FAULT_ABORT_BODY: Final = b"fault filter abort"
FAULT_ABORT: Final = "fault_filter_abort"
DIRECT_RESPONSE: Final = "direct_response"
INTERNAL_ERROR: Final = Reply(500, b"internal error", 0, "internal_error")
DOWNSTREAM_DISCONNECT: Final = "downstream_remote_disconnect"
STREAM_IDLE_TIMEOUT: Final = "stream_idle_timeout"

# Replies to a request the codec refused, or that the connection stopped (ProtocolError.detail -> body); the
# connection closes after them. Envoy's bodies for its own timeouts, the reason phrase otherwise.
_ERROR_BODIES: Final = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    505: b"HTTP Version Not Supported",
}
_ERROR_DETAIL_BODIES: Final = {
    STREAM_IDLE_TIMEOUT: b"stream timeout",  # Envoy's local reply body for SI
    "request_header_timeout": b"request header timeout",
}


def protocol_error_body(error: ProtocolError) -> bytes:
    return _ERROR_DETAIL_BODIES.get(error.detail) or _ERROR_BODIES.get(error.status, b"Bad Request")


def protocol_error_flag(error: ProtocolError) -> int:
    """SI for the stream idle timeout (408 before the request ended, 504 after); DPE for a bad request."""
    return SI if error.detail == STREAM_IDLE_TIMEOUT else DPE


def stream_idle_timeout(request_complete: bool) -> ProtocolError:
    return ProtocolError(504 if request_complete else 408, STREAM_IDLE_TIMEOUT)


# Authorization and JWT authentication (Envoy's rbac and jwt_authn filters): no response flag, as in Envoy.
RBAC_DENIED_BODY: Final = b"RBAC: access denied"
RBAC_DENIED_PREFIX: Final = "rbac_access_denied_matched_policy"


def rbac_denied(policy_id: str) -> Reply:
    """403 of the rbac filter; `policy_id` is the DENY rule that matched, or `none` when no ALLOW rule did."""
    return Reply(403, RBAC_DENIED_BODY, 0, f"{RBAC_DENIED_PREFIX}[{'_'.join(policy_id.split())}]")


def jwt_denied(status: int, message: str, details: str, uri: bytes) -> tuple[Reply, tuple[tuple[bytes, bytes], ...]]:
    """The jwt_authn filter's reply: Envoy's status text as the body, and the Bearer challenge."""
    challenge = b'Bearer realm="' + uri + b'", error="invalid_token"'
    return Reply(status, message.encode(), 0, details), ((b"www-authenticate", challenge),)


# ---- gRPC-shaped local replies (Envoy's Utility::sendLocalReply with is_grpc, Grpc::Utility::httpToGrpcStatus)

GRPC_MESSAGE: Final = b"grpc-message"
_HTTP_TO_GRPC: Final = {
    400: 13,  # INTERNAL
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    429: 14,  # UNAVAILABLE
    502: 14,
    503: 14,
    504: 14,
}


def http_to_grpc_status(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


def grpc_local_reply_headers(status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]
                             ) -> list[tuple[bytes, bytes]]:
    """The header block of a trailers-only gRPC reply (HTTP 200 goes with it): `grpc-status` mapped from the HTTP
    status unless the reply names one (a fault's abort.grpcStatus), `grpc-message` the body, percent-encoded."""
    out: list[tuple[bytes, bytes]] = []
    has_status = False
    for name, value in extra:
        if name == GRPC_STATUS:
            has_status = True
        elif name == b"content-type":
            continue
        out.append((name, value))
    out.insert(0, (b"content-type", GRPC_CONTENT_TYPE))
    if not has_status:
        out.append((GRPC_STATUS, b"%d" % http_to_grpc_status(status)))
        if body:
            out.append((GRPC_MESSAGE, grpc_percent_encode(body)))
    return out


def grpc_percent_encode(text: bytes) -> bytes:
    """gRPC's grpc-message encoding (Envoy's PercentEncoding::encode): `%` and bytes outside 0x20-0x7E as %XX."""
    if all(0x20 <= byte <= 0x7E and byte != 0x25 for byte in text):
        return text
    return b"".join(bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in text)
