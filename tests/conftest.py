"""Shared fixtures: upstream servers and config folders. The harness lives in tests/harness.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Upstream  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Tests of old compiled code would mislead: stop at once when a hot module changed since the build."""
    from meshproxy import hot_path

    stale = hot_path.status().stale
    if stale:
        pytest.exit(f"the compiled hot path is older than its source ({', '.join(stale)}): run `pip install -e .` "
                    "again (or install with MESHPROXY_PURE_PYTHON=1 to run it interpreted)", returncode=2)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream("backend")
    yield server
    server.close()
