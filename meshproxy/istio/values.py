"""Istio's value rules, in one place for the loader and the routing compiler.

RE2 regexes (Istio's engine, its length and program-size limits), Go durations,
HTTP header names and the retryOn vocabulary. The loader validates with these and
stores the results in the model (compiled regexes, float seconds, lower-case
names), so the compiler never parses a value again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import re2

MAX_REGEX_LENGTH: Final = 1024  # Istio validateStringRegexp
MAX_REGEX_PROGRAM_SIZE: Final = 32768  # Istio's re2.max_program_size.error_level

RE2_OPTIONS: Final = re2.Options()
RE2_OPTIONS.log_errors = False

DURATION_RE: Final = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}

HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
PSEUDO_HEADERS: Final = (":method", ":scheme", ":authority", ":path", ":status")

# retryOn policy names -> Envoy's RetryPolicy::RETRY_ON_* bits. The one vocabulary: the loader
# validates retryOn against it, routing.policy compiles retryOn into these bits.
RETRY_ON_BITS: Final[Mapping[str, int]] = {
    "5xx": 1 << 0,
    "gateway-error": 1 << 1,
    "connect-failure": 1 << 2,
    "retriable-4xx": 1 << 3,
    "refused-stream": 1 << 4,
    "retriable-status-codes": 1 << 5,
    "reset": 1 << 6,
    "reset-before-request": 1 << 7,
    "retriable-headers": 1 << 8,
    "envoy-ratelimited": 1 << 9,
    "http3-post-connect-failure": 1 << 10,
    "cancelled": 1 << 11,  # the gRPC names
    "deadline-exceeded": 1 << 12,
    "internal": 1 << 13,
    "resource-exhausted": 1 << 14,
    "unavailable": 1 << 15,
}


def compile_regex(pattern: str) -> Any:
    """A config regex compiled with RE2 under Istio's limits; ValueError says what is wrong.

    Istio's matches are full matches: callers match with `fullmatch` (or an anchored RE2 call).
    """
    if not pattern:
        raise ValueError("regex must not be empty")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regex is longer than {MAX_REGEX_LENGTH} characters")
    try:
        compiled = re2.compile(pattern, RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"{pattern!r} is not a valid RE2 regex: {reason}") from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise ValueError(f"regex program size {compiled.programsize} is over the limit {MAX_REGEX_PROGRAM_SIZE}")
    return compiled


def is_duration(text: str) -> bool:
    return DURATION_RE.fullmatch(text) is not None


def parse_duration(text: str) -> float:
    """Go/Istio duration text (checked with is_duration) -> seconds."""
    return sum(float(num) * DURATION_UNITS[unit] for num, unit in DURATION_PART_RE.findall(text))


def is_header_name(name: str) -> bool:
    """An HTTP field name (token) or one of the HTTP/2 pseudo-headers Istio accepts."""
    return name in PSEUDO_HEADERS or HEADER_NAME_RE.fullmatch(name) is not None


def header_key(name: str) -> str:
    """Header names are case-insensitive: the model and the compiled table keep them lower-case."""
    return name.lower()


def retry_on_problems(retry_on: str) -> list[str]:
    """What is wrong with a retryOn value (policies and status codes, comma-separated); [] if nothing."""
    problems = []
    for token in retry_on_tokens(retry_on):
        if token.isdigit():
            if not 100 <= int(token) <= 599:
                problems.append(f"{token} is not an HTTP status code")
        elif token not in RETRY_ON_BITS:
            problems.append(f"{token!r} is not a valid retryOn policy")
    return problems


def retry_on_tokens(retry_on: str) -> list[str]:
    return [t for t in (t.strip() for t in retry_on.split(",")) if t]
