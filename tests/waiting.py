"""Event-driven waits for tests on a loaded machine: poll a condition until it holds, with a generous deadline.

A fixed sleep before a check either flakes (too short under load) or wastes time; `wait_until` returns as soon as
the condition holds and fails with a message only after `timeout` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

GENEROUS = 30.0  # seconds: two cores shared with other test runs and benchmarks


def wait_until(condition: Callable[[], T], timeout: float = GENEROUS, what: str = "condition",
               interval: float = 0.02) -> T:
    """The first truthy value of `condition()`, polled every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
