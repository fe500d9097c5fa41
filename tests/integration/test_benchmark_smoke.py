"""Smoke test of the benchmark harness: one quick run measures direct and meshproxy. Nothing timed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_NO_WRK = 77  # benchmarks/run.py: wrk is neither installed nor installable
RUN_TIMEOUT_SECONDS = 55
# scenario  target  req/s  p50 ms  p99 ms  cpu us/req  errors
MEASURED_ROW = re.compile(
    r"^(?P<scenario>\S+)\s+(?P<target>direct|meshproxy)\s+(?P<rps>\d+(?:\.\d+)?)\s.*\s(?P<errors>\d+)$", re.M
)


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 5)
def test_quick_benchmark_measures_direct_and_meshproxy() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode == EXIT_NO_WRK:
        pytest.skip(f"wrk cannot be installed: {done.stderr.strip()[-500:]}")
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    rows = {row["target"]: row for row in MEASURED_ROW.finditer(done.stdout)}
    assert set(rows) == {"direct", "meshproxy"}, output
    assert all(float(row["rps"]) > 0 for row in rows.values()), output
    assert all(int(row["errors"]) == 0 for row in rows.values()), output  # socket errors or 4xx/5xx
