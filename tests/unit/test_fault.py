"""meshproxy.proxy.fault: the fault filter's dice (Envoy: fires when random % 10^6 < per-million), seeded."""

from __future__ import annotations

import random

import pytest

from meshproxy.proxy.fault import MILLION, decide_abort, decide_delay
from meshproxy.routing.policy import NO_FAULT, FaultPolicy

DRAWS = 20_000


def delay_policy(percent: float, seconds: float = 7.0) -> FaultPolicy:
    return FaultPolicy(delay=seconds, delay_per_million=int(percent * 10_000))


def abort_policy(percent: float, status: int = 500) -> FaultPolicy:
    return FaultPolicy(abort_status=status, abort_per_million=int(percent * 10_000))


def delay_rate(policy: FaultPolicy, seed: int = 7) -> float:
    randbelow = random.Random(seed).randrange
    return sum(decide_delay(policy, randbelow) > 0 for _ in range(DRAWS)) / DRAWS


def abort_rate(policy: FaultPolicy, seed: int = 7) -> float:
    randbelow = random.Random(seed).randrange
    return sum(decide_abort(policy, randbelow) for _ in range(DRAWS)) / DRAWS


def test_no_fault_never_fires():
    randbelow = random.Random(1).randrange
    assert not NO_FAULT.active
    assert all(decide_delay(NO_FAULT, randbelow) == 0.0 for _ in range(DRAWS))
    assert not any(decide_abort(NO_FAULT, randbelow) for _ in range(DRAWS))


def test_zero_percent_never_fires_even_with_a_delay_or_status_set():
    assert delay_rate(delay_policy(0.0)) == 0.0
    assert abort_rate(abort_policy(0.0)) == 0.0


def test_hundred_percent_always_fires_with_the_configured_delay():
    randbelow = random.Random(3).randrange
    policy = delay_policy(100.0, seconds=7.0)
    assert {decide_delay(policy, randbelow) for _ in range(DRAWS)} == {7.0}
    assert abort_rate(abort_policy(100.0)) == 1.0


@pytest.mark.parametrize("percent", [0.1, 1.0, 10.0, 50.0, 90.0])
def test_rates_follow_the_percentage(percent: float):
    # 20,000 draws: one standard deviation is at most 0.36 points; the tolerance is a 0.3-point floor + 5 %.
    tolerance = 0.003 + 0.05 * percent / 100
    assert delay_rate(delay_policy(percent)) == pytest.approx(percent / 100, abs=tolerance)
    assert abort_rate(abort_policy(percent)) == pytest.approx(percent / 100, abs=tolerance)


def test_the_dice_is_a_number_below_a_million_compared_with_per_million():
    """Envoy's comparison exactly: fires for random < per-million, not for random == per-million."""
    asked: list[int] = []

    def fixed(value: int):
        def randbelow(n: int) -> int:
            asked.append(n)
            return value
        return randbelow

    policy = FaultPolicy(delay=1.5, delay_per_million=250_000, abort_status=503, abort_per_million=250_000)
    assert decide_delay(policy, fixed(249_999)) == 1.5
    assert decide_delay(policy, fixed(250_000)) == 0.0
    assert decide_abort(policy, fixed(249_999)) is True
    assert decide_abort(policy, fixed(250_000)) is False
    assert asked == [MILLION] * 4


def test_delay_and_abort_are_independent_draws():
    """Delay first, then its own abort dice: with 50 % each, a quarter of requests get both."""
    rng = random.Random(11)
    policy = FaultPolicy(delay=1.0, delay_per_million=500_000, abort_status=500, abort_per_million=500_000)
    both = delayed = aborted = 0
    for _ in range(DRAWS):
        d = decide_delay(policy, rng.randrange) > 0
        a = decide_abort(policy, rng.randrange)
        delayed += d
        aborted += a
        both += d and a
    assert delayed / DRAWS == pytest.approx(0.5, abs=0.03)
    assert aborted / DRAWS == pytest.approx(0.5, abs=0.03)
    assert both / DRAWS == pytest.approx(0.25, abs=0.03)


def test_the_same_seed_gives_the_same_decisions():
    policy = FaultPolicy(delay=2.0, delay_per_million=300_000, abort_status=500, abort_per_million=300_000)

    def run(seed: int) -> list[tuple[float, bool]]:
        randbelow = random.Random(seed).randrange
        return [(decide_delay(policy, randbelow), decide_abort(policy, randbelow)) for _ in range(200)]

    assert run(5) == run(5)
    assert run(5) != run(6)
