"""Samples (one wrk run each), their medians over rounds, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loadgen import WrkResult

BASELINE_TARGET = "direct"
COLUMNS = ("scenario", "target", "req/s", "p50 ms", "p99 ms", "cpu us/req", "errors")
MISSING = "-"


@dataclass(frozen=True, slots=True)
class Sample:
    scenario: str
    target: str
    round: int
    result: WrkResult
    cpu_seconds: float | None  # CPU time of the target's own process during the run

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_seconds is None or self.result.requests == 0:
            return None
        return self.cpu_seconds * 1e6 / self.result.requests


@dataclass(frozen=True, slots=True)
class Failure:
    scenario: str
    target: str
    source: str  # the process that failed (the target's own, or wrk) and whose output log_tail is
    reason: str
    log_tail: str


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over the rounds of one (scenario, target); errors are summed."""

    scenario: str
    target: str
    rounds: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None
    errors: int


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize(samples: Sequence[Sample], target_order: Sequence[str]) -> list[Summary]:
    """Per scenario (in the order run), per target (in `target_order`)."""
    scenarios = list(dict.fromkeys(sample.scenario for sample in samples))
    keys = sorted(
        {(sample.scenario, sample.target) for sample in samples},
        key=lambda key: (scenarios.index(key[0]), target_order.index(key[1])),
    )
    summaries = []
    for scenario, target in keys:
        group = [s for s in samples if (s.scenario, s.target) == (scenario, target)]
        summaries.append(
            Summary(
                scenario=scenario,
                target=target,
                rounds=len(group),
                requests_per_second=statistics.median(s.result.requests_per_second for s in group),
                p50_ms=statistics.median(s.result.p50_ms for s in group),
                p99_ms=statistics.median(s.result.p99_ms for s in group),
                cpu_us_per_request=median_or_none(s.cpu_us_per_request for s in group),
                errors=sum(s.result.errors for s in group),
            )
        )
    return summaries


def _number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def summary_row(summary: Summary) -> tuple[str, ...]:
    return (
        summary.scenario,
        summary.target,
        _number(summary.requests_per_second, 0),
        _number(summary.p50_ms, 2),
        _number(summary.p99_ms, 2),
        _number(summary.cpu_us_per_request, 1),
        str(summary.errors),
    )


def ratio_row(summary: Summary, baseline: Summary) -> tuple[str, ...]:
    def ratio(ours: float, theirs: float) -> str:
        return _number(ours / theirs if theirs else None, 2)

    return (
        summary.scenario,
        f"{summary.target}/{baseline.target}",
        ratio(summary.requests_per_second, baseline.requests_per_second),
        ratio(summary.p50_ms, baseline.p50_ms),
        ratio(summary.p99_ms, baseline.p99_ms),
        MISSING,
        "",
    )


def failure_row(failure: Failure) -> tuple[str, ...]:
    return (failure.scenario, failure.target, "FAILED", MISSING, MISSING, MISSING, "")


def table_rows(summaries: Sequence[Summary], failures: Sequence[Failure]) -> list[tuple[str, ...]]:
    """Per scenario: each measured target, each failed one, then each target's ratio to direct."""
    rows: list[tuple[str, ...]] = []
    scenarios = dict.fromkeys([s.scenario for s in summaries] + [f.scenario for f in failures])
    for scenario in scenarios:
        measured = [s for s in summaries if s.scenario == scenario]
        measured_targets = {s.target for s in measured}
        rows += [summary_row(s) for s in measured]
        rows += [
            failure_row(f) for f in failures if f.scenario == scenario and f.target not in measured_targets
        ]
        baseline = next((s for s in measured if s.target == BASELINE_TARGET), None)
        if baseline:
            rows += [ratio_row(s, baseline) for s in measured if s is not baseline]
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    all_rows = [COLUMNS, *rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(COLUMNS))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(COLUMNS), rule, *(line(row) for row in rows)])


def format_error_notes(summaries: Sequence[Summary]) -> str:
    """One line per target that had failed requests: wrk counts those in req/s and latency too."""
    return "\n".join(
        f"note: {s.target} ({s.scenario}): {s.errors} failed requests (socket errors, timeouts or "
        f"4xx/5xx) over {s.rounds} round(s); they are included in its req/s and latencies"
        for s in summaries
        if s.errors
    )


def format_failures(failures: Sequence[Failure]) -> str:
    blocks = []
    for failure in failures:
        block = f"{failure.target} ({failure.scenario}) FAILED: {failure.source} {failure.reason}"
        if failure.log_tail:
            block += f"\n--- {failure.source} output (last lines) ---\n{failure.log_tail}\n---"
        blocks.append(block)
    return "\n\n".join(blocks)
