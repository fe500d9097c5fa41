"""Fault injection decisions, pure (Envoy fault filter): delay first, then an independent abort dice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..routing.policy import FaultPolicy

MILLION: Final = 1_000_000

# gRPC status names Istio accepts in abort.grpcStatus -> numeric code.
GRPC_CODES: Final = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


def decide_delay(policy: FaultPolicy, randbelow: Callable[[int], int]) -> float:
    """Seconds to hold the request (0 for none): fires when random % 10^6 < per-million, as Envoy."""
    if policy.delay_per_million and randbelow(MILLION) < policy.delay_per_million:
        return policy.delay
    return 0.0


def decide_abort(policy: FaultPolicy, randbelow: Callable[[int], int]) -> bool:
    return bool(policy.abort_per_million) and randbelow(MILLION) < policy.abort_per_million
