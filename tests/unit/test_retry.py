"""meshproxy.proxy.retry: Envoy's retry decisions for each retryOn condition, and jittered back-off (seeded)."""

from __future__ import annotations

import random
import statistics

import pytest

from meshproxy.proxy.retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET, backoff, should_retry_failure, \
    should_retry_response
from meshproxy.routing.policy import DEFAULT_BACKOFF_BASE, DEFAULT_RETRY_ON, NO_RETRY, RetryPolicy


def policy(retry_on: str, attempts: int = 2, backoff: float | None = None) -> RetryPolicy:
    return RetryPolicy.compile(attempts, retry_on, backoff=backoff)


def grpc(code: str) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/grpc"), (b"grpc-status", code.encode())]


# ---------------------------------------------------------------- responses

# (retryOn, status, response headers, retried?)
RESPONSES = [
    ("5xx", 500, [], True),
    ("5xx", 503, [], True),
    ("5xx", 504, [], True),
    ("5xx", 499, [], False),
    ("5xx", 200, [], False),
    ("gateway-error", 502, [], True),
    ("gateway-error", 503, [], True),
    ("gateway-error", 504, [], True),
    ("gateway-error", 500, [], False),
    ("gateway-error", 501, [], False),
    ("retriable-4xx", 409, [], True),
    ("retriable-4xx", 404, [], False),
    ("retriable-4xx", 429, [], False),
    ("retriable-status-codes,418", 418, [], True),
    ("retriable-status-codes,418", 500, [], False),
    ("418,503", 503, [], True),  # bare codes: Istio adds retriable-status-codes
    ("retriable-status-codes", 503, [], False),  # no codes listed: nothing to match
    ("envoy-ratelimited", 429, [(b"x-envoy-ratelimited", b"true")], True),
    ("envoy-ratelimited", 429, [], False),
    ("cancelled", 200, grpc("1"), True),
    ("deadline-exceeded", 200, grpc("4"), True),
    ("resource-exhausted", 200, grpc("8"), True),
    ("internal", 200, grpc("13"), True),
    ("unavailable", 200, grpc("14"), True),
    ("unavailable", 200, grpc(" 14 "), True),
    ("unavailable", 200, grpc("13"), False),
    ("cancelled,unavailable", 200, grpc("0"), False),
    ("unavailable", 200, [], False),  # not a gRPC response
    ("unavailable", 503, [], False),  # a gRPC condition says nothing about HTTP statuses
    ("connect-failure", 503, [], False),  # failure conditions never retry a real response
    ("reset", 503, [], False),
    ("refused-stream", 503, [], False),
    ("reset-before-request", 502, [], False),
    # Istio's default (1.24+): a real 503 is not retried, gRPC unavailable and cancelled are
    (DEFAULT_RETRY_ON, 503, [], False),
    (DEFAULT_RETRY_ON, 200, grpc("14"), True),
    (DEFAULT_RETRY_ON, 200, grpc("1"), True),
    (DEFAULT_RETRY_ON, 200, grpc("4"), False),
]


@pytest.mark.parametrize(("retry_on", "status", "headers", "retried"), RESPONSES,
                         ids=[f"{on}-{status}-{'+'.join(v.decode().strip() for n, v in h if n == b'grpc-status')}"
                              for on, status, h, _ in RESPONSES])
def test_should_retry_response(retry_on: str, status: int, headers: list[tuple[bytes, bytes]], retried: bool):
    assert should_retry_response(policy(retry_on), status, headers) is retried


def test_no_retry_policy_retries_nothing():
    assert not any(should_retry_response(NO_RETRY, status, []) for status in (409, 500, 502, 503, 504))
    assert not should_retry_response(NO_RETRY, 200, grpc("14"))
    assert not any(should_retry_failure(NO_RETRY, kind, sent)
                   for kind in (CONNECT_FAILURE, RESET, PER_TRY_TIMEOUT) for sent in (False, True))


def test_retriable_headers_are_the_ones_the_request_names():
    on = policy("retriable-headers")
    headers = [(b"content-type", b"text/plain"), (b"x-upstream-retry", b"1")]
    assert should_retry_response(on, 200, headers, b"X-Upstream-Retry, x-other")
    assert should_retry_response(on, 200, headers, b"x-other,x-upstream-retry")
    assert not should_retry_response(on, 200, headers, b"x-other")
    assert not should_retry_response(on, 200, headers, None)  # the request named none
    assert not should_retry_response(policy("5xx"), 200, headers, b"x-upstream-retry")  # not enabled


def test_conditions_combine():
    on = policy("gateway-error,retriable-4xx,unavailable")
    assert [should_retry_response(on, s, []) for s in (409, 500, 502, 503, 504)] == [True, False, True, True, True]
    assert should_retry_response(on, 200, grpc("14"))


# ---------------------------------------------------------------- attempts that got no response

# retryOn -> retried? for (connect failure, reset before the request was sent, reset after, per-try timeout)
FAILURES = {
    "5xx": (True, True, True, True),
    "gateway-error": (True, True, True, True),
    "reset": (True, True, True, True),
    "connect-failure": (True, False, False, False),
    "reset-before-request": (True, True, False, False),
    "refused-stream": (False, False, False, False),
    "retriable-4xx": (False, False, False, False),
    "retriable-status-codes,503": (False, False, False, False),
    "envoy-ratelimited": (False, False, False, False),
    "retriable-headers": (False, False, False, False),
    "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable": (False, False, False, False),
    DEFAULT_RETRY_ON: (True, False, False, False),
}


@pytest.mark.parametrize("retry_on", list(FAILURES))
def test_should_retry_failure(retry_on: str):
    on = policy(retry_on)
    got = (should_retry_failure(on, CONNECT_FAILURE, False), should_retry_failure(on, RESET, False),
           should_retry_failure(on, RESET, True), should_retry_failure(on, PER_TRY_TIMEOUT, True))
    assert got == FAILURES[retry_on]


def test_a_connect_failure_is_retried_whether_or_not_marked_sent():
    on = policy("connect-failure")
    assert should_retry_failure(on, CONNECT_FAILURE, False) and should_retry_failure(on, CONNECT_FAILURE, True)


# ---------------------------------------------------------------- back-off

DRAWS = 4_000


def draws(on: RetryPolicy, retry_number: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [backoff(on, retry_number, rng) for _ in range(DRAWS)]


@pytest.mark.parametrize(("base", "bounds"), [
    # Envoy: retry n waits uniform in [0, (2^n - 1) * base), capped at 10 * base
    (None, {1: 0.025, 2: 0.075, 3: 0.175, 4: 0.25, 5: 0.25, 10: 0.25}),
    (0.1, {1: 0.1, 2: 0.3, 3: 0.7, 4: 1.0, 8: 1.0}),
])
def test_backoff_is_full_jitter_below_a_growing_capped_bound(base: float | None, bounds: dict[int, float]):
    on = policy("5xx", attempts=10, backoff=base)
    assert on.backoff_base == (base or DEFAULT_BACKOFF_BASE)
    for n, bound in bounds.items():
        values = draws(on, n)
        assert min(values) >= 0.0
        assert max(values) < bound + 1e-12, n
        assert max(values) > 0.95 * bound, n  # the whole range is used...
        assert min(values) < 0.05 * bound, n  # ...from the bottom
        assert statistics.fmean(values) == pytest.approx(bound / 2, rel=0.08), n  # uniform: mean half the bound


def test_backoff_grows_until_the_cap_then_stays():
    on = policy("5xx", attempts=10)
    means = [statistics.fmean(draws(on, n)) for n in range(1, 8)]
    assert means[0] < means[1] < means[2] < means[3]
    capped = means[3:]
    assert max(capped) - min(capped) < 0.1 * on.backoff_max
    assert on.backoff_max == pytest.approx(10 * DEFAULT_BACKOFF_BASE)


def test_backoff_is_deterministic_for_a_seed():
    on = policy("5xx", attempts=5)
    assert draws(on, 3, seed=42) == draws(on, 3, seed=42)
    assert draws(on, 3, seed=42) != draws(on, 3, seed=43)
