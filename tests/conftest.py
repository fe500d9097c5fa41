"""Shared fixtures: upstream servers and config folders. The harness lives in tests/harness.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Upstream  # noqa: E402


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream("backend")
    yield server
    server.close()
