"""Retry decisions, pure: values in, values out (Envoy RetryStateImpl). The exchange acts on them."""

from __future__ import annotations

import random
from typing import Final

from ..routing.policy import (
    RETRY_ON_5XX,
    RETRY_ON_CONNECT_FAILURE,
    RETRY_ON_ENVOY_RATELIMITED,
    RETRY_ON_GATEWAY_ERROR,
    RETRY_ON_GRPC_ANY,
    RETRY_ON_GRPC_CANCELLED,
    RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    RETRY_ON_GRPC_INTERNAL,
    RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    RETRY_ON_GRPC_UNAVAILABLE,
    RETRY_ON_REFUSED_STREAM,
    RETRY_ON_RESET,
    RETRY_ON_RESET_BEFORE_REQUEST,
    RETRY_ON_RETRIABLE_4XX,
    RETRY_ON_RETRIABLE_HEADERS,
    RETRY_ON_RETRIABLE_STATUS_CODES,
    RetryPolicy,
)

# Why an attempt produced no response.
CONNECT_FAILURE: Final = 0
RESET: Final = 1  # the upstream closed or reset before the response head
PER_TRY_TIMEOUT: Final = 2
REFUSED: Final = 3  # HTTP/2 REFUSED_STREAM (or a stream above a GOAWAY): never processed

GRPC_BITS: Final = {
    b"1": RETRY_ON_GRPC_CANCELLED,
    b"4": RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    b"8": RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    b"13": RETRY_ON_GRPC_INTERNAL,
    b"14": RETRY_ON_GRPC_UNAVAILABLE,
}
GRPC_ANY: Final = RETRY_ON_GRPC_ANY


def should_retry_response(policy: RetryPolicy, status: int, headers: list[tuple[bytes, bytes]],
                          retriable_header_names: bytes | None = None) -> bool:
    """Would Envoy retry this real upstream response? (A proxy-made 503 never reaches here.)

    `retriable_header_names` is the request's `x-envoy-retriable-header-names` (for retriable-headers).
    """
    on = policy.retry_on
    if on & RETRY_ON_ENVOY_RATELIMITED and any(name == b"x-envoy-ratelimited" for name, _ in headers):
        return True
    if on & RETRY_ON_RETRIABLE_HEADERS and retriable_header_names:
        wanted = {n.strip().lower() for n in retriable_header_names.split(b",")}
        if any(name in wanted for name, _ in headers):
            return True
    if on & RETRY_ON_5XX and status >= 500:
        return True
    if on & RETRY_ON_GATEWAY_ERROR and status in (502, 503, 504):
        return True
    if on & RETRY_ON_RETRIABLE_4XX and status == 409:
        return True
    if on & RETRY_ON_RETRIABLE_STATUS_CODES and status in policy.retriable_status_codes:
        return True
    if on & GRPC_ANY:
        for name, value in headers:
            if name == b"grpc-status":
                return bool(on & GRPC_BITS.get(value.strip(), 0))
    return False


GRPC_STATUS: Final = b"grpc-status"
CONTENT_TYPE: Final = b"content-type"
GRPC_CONTENT_TYPE: Final = b"application/grpc"
GRPC_WEB_CONTENT_TYPE: Final = b"application/grpc-web"


def holds_for_trailers(policy: RetryPolicy, status: int, headers: list[tuple[bytes, bytes]]) -> int:
    """The meshproxy.io/retry-grpc-trailers hold: how many response bytes are left to hold after this head (0: do
    not hold). Only a gRPC response (HTTP 200, application/grpc, not gRPC-web) whose head fits the bound is held;
    a trailers-only one (end_stream) never reaches here: its status is judged as any response head."""
    if status != 200:
        return 0
    size = 0
    grpc = False
    for name, value in headers:
        size += len(name) + len(value)
        if name == CONTENT_TYPE:
            grpc = value.startswith(GRPC_CONTENT_TYPE) and not value.startswith(GRPC_WEB_CONTENT_TYPE)
    left = policy.grpc_trailers_bytes - size
    return left if grpc and left > 0 else 0


def retriable_grpc_status(policy: RetryPolicy, trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The retriable grpc-status of a held response's trailers (its code, b"" if none is retriable)."""
    for name, value in trailers:
        if name == GRPC_STATUS:
            code = value.strip()
            return code if policy.retry_on & GRPC_BITS.get(code, 0) else b""
    return b""


def should_retry_failure(policy: RetryPolicy, kind: int, request_sent: bool) -> bool:
    """Would Envoy retry an attempt that got no response? (wouldRetryFromReset)"""
    on = policy.retry_on
    if on & (RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR | RETRY_ON_RESET):
        return True
    if kind == CONNECT_FAILURE:
        return bool(on & (RETRY_ON_CONNECT_FAILURE | RETRY_ON_RESET_BEFORE_REQUEST))
    if kind == REFUSED:
        return bool(on & (RETRY_ON_REFUSED_STREAM | RETRY_ON_RESET_BEFORE_REQUEST))
    return kind == RESET and not request_sent and bool(on & RETRY_ON_RESET_BEFORE_REQUEST)


def backoff(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Fully jittered exponential back-off: retry n waits uniform in [0, (2^n - 1) * base), capped at max."""
    return rng.random() * min(((1 << retry_number) - 1) * policy.backoff_base, policy.backoff_max)
