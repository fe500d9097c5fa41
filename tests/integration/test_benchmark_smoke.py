"""Smoke test of the benchmark harness: one quick run (`--quick`: single-route, bookinfo-routing, the two
mutual-TLS scenarios and the HTTP/2 pair h2c and grpc-unary under h2load, one round of 2 s each, direct +
meshproxy, and Envoy if it is already installed). Checks that every row is measured without errors and that the
routing probes passed (a failed probe exits 1); in mtls-handshakes, that each request made its own connection
between the sidecars when handshakes are counted (as root). Nothing timed, nothing about speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_NO_WRK = 77  # benchmarks/run.py: wrk is neither installed nor installable
RUN_TIMEOUT_SECONDS = 160
QUICK_SCENARIOS = ("single-route", "bookinfo-routing", "h2c", "grpc-unary", "mtls-keepalive", "mtls-handshakes")
SCENARIO_HEADING = re.compile(r"^== (?P<scenario>\S+):", re.M)
# target  req/s  p50 ms  p99 ms  cpu us/req  errors
MEASURED_ROW = re.compile(r"^(?P<target>direct|meshproxy|envoy)\s+(?P<rps>[\d,]+)\s.*\s(?P<errors>\d+)$", re.M)


def measured_rows(stdout: str) -> dict[str, dict[str, re.Match[str]]]:
    """scenario -> target -> its row."""
    headings = list(SCENARIO_HEADING.finditer(stdout))
    sections = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        text = stdout[heading.end():following.start() if following else len(stdout)]
        sections[heading["scenario"]] = {row["target"]: row for row in MEASURED_ROW.finditer(text)}
    return sections


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 5)
def test_quick_benchmark_measures_every_scenario_without_errors() -> None:
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
    sections = measured_rows(done.stdout)
    assert tuple(sections) == QUICK_SCENARIOS, output
    for rows in sections.values():
        assert {"direct", "meshproxy"} <= set(rows), output  # envoy too when installed
        assert all(float(row["rps"].replace(",", "")) > 0 for row in rows.values()), output
        assert all(int(row["errors"]) == 0 for row in rows.values()), output  # socket errors or 4xx/5xx
    for target, row in sections["mtls-handshakes"].items():
        if target == "direct":
            continue
        # req/s  p50  p99  cpu us/req  handshakes/s  errors: "-" when not counted (not root, no iptables)
        handshakes = row[0].split()[-2]
        if handshakes != "-":
            rps = float(row["rps"].replace(",", ""))
            assert 0.8 * rps <= float(handshakes.replace(",", "")) <= 1.2 * rps + 10, output
