"""Samples (one measurement of one target in one round), medians over rounds, ratios to Envoy, the tables.

Each scenario kind has its own columns. A target's row holds the median over rounds of each figure; its
`x envoy` row holds, per figure, the median over rounds of (its figure / Envoy's figure in the same round),
so slow drift on the machine between rounds cancels out. For req/s and MB/s a ratio above 1 is better;
for latencies, CPU and memory, below 1 is better.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from scenarios import Kind

MISSING = "-"
BASELINE = "envoy"


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    title: str
    digits: int
    ratio: bool = True  # shown as a ratio to Envoy in the `x envoy` row


COLUMNS: dict[Kind, tuple[Column, ...]] = {
    Kind.THROUGHPUT: (Column("rps", "req/s", 0), Column("p50", "p50 ms", 2), Column("p99", "p99 ms", 2),
                      Column("cpu", "cpu us/req", 1), Column("per_core", "req/s per core", 0)),
    Kind.LATENCY: (Column("p50", "p50 ms", 3), Column("p99", "p99 ms", 3), Column("added_p50", "added p50 ms", 3),
                   Column("added_p99", "added p99 ms", 3), Column("cpu", "cpu us/req", 1)),
    Kind.BODIES: (Column("rps", "req/s", 0), Column("mbps", "MB/s", 0), Column("p50", "p50 ms", 2),
                  Column("p99", "p99 ms", 2), Column("cpu", "cpu us/req", 1)),
    Kind.MTLS: (Column("rps", "req/s", 0), Column("p50", "p50 ms", 2), Column("p99", "p99 ms", 2),
                Column("cpu", "cpu us/req", 1), Column("handshakes", "handshakes/s", 0)),
    Kind.IDLE: (Column("connections", "connections", 0, ratio=False), Column("rss_before", "RSS before MiB", 1),
                Column("rss", "RSS MiB", 1), Column("kib_per_connection", "KiB/conn", 1)),
}


@dataclass(frozen=True, slots=True)
class Sample:
    scenario: str
    target: str
    round: int
    values: dict[str, float | None]
    errors: int  # failed requests (wrk: socket errors, timeouts, 4xx/5xx; idle: connections without a 200)


@dataclass(frozen=True, slots=True)
class Failure:
    scenario: str
    target: str
    source: str  # the process that failed (the target's own, or wrk) and whose output log_tail is
    reason: str
    log_tail: str


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over the rounds of one (scenario, target); errors are summed. `ratios`: to Envoy, per round."""

    scenario: str
    target: str
    rounds: int
    values: dict[str, float | None]
    ratios: dict[str, float | None]
    errors: int


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0 or ours < 0:
        return None
    return ours / theirs


def summarize(samples: Sequence[Sample], kind: Kind, target_order: Sequence[str]) -> list[Summary]:
    """One scenario's samples -> one summary per target, in `target_order`."""
    columns = COLUMNS[kind]
    baseline = {s.round: s for s in samples if s.target == BASELINE}
    summaries = []
    for target in [t for t in target_order if any(s.target == t for s in samples)]:
        group = [s for s in samples if s.target == target]
        values = {c.key: median_or_none(s.values.get(c.key) for s in group) for c in columns}
        ratios: dict[str, float | None] = {}
        if target not in (BASELINE, "direct") and baseline:
            for column in columns:
                if column.ratio:
                    ratios[column.key] = median_or_none(
                        ratio(s.values.get(column.key), baseline[s.round].values.get(column.key))
                        for s in group if s.round in baseline)
        summaries.append(Summary(group[0].scenario, target, len(group), values, ratios, sum(s.errors for s in group)))
    return summaries


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return MISSING
    return f"{value:,.{digits}f}"


def table(kind: Kind, summaries: Sequence[Summary], failures: Sequence[Failure], skipped: Sequence[str]) -> str:
    columns = COLUMNS[kind]
    titles = ("target", *(c.title for c in columns), "errors")
    rows: list[tuple[str, ...]] = []
    for summary in summaries:
        rows.append((summary.target, *(_number(summary.values[c.key], c.digits) for c in columns),
                     str(summary.errors)))
    measured = {s.target for s in summaries}
    rows += [(f.target, "FAILED", *([MISSING] * (len(columns) - 1)), "") for f in failures
             if f.target not in measured]
    rows += [(name, "skipped", *([MISSING] * (len(columns) - 1)), "") for name in skipped]
    for summary in summaries:
        if summary.ratios:
            rows.append((f"{summary.target} x {BASELINE}",
                         *(_number(summary.ratios.get(c.key), 2) if c.ratio else "" for c in columns), ""))
    return format_table(titles, rows)


def format_table(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    all_rows = [titles, *rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(titles))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(titles), rule, *(line(row) for row in rows)])


def error_notes(summaries: Sequence[Summary], kind: Kind) -> list[str]:
    what = ("connections without a 200 answer" if kind is Kind.IDLE
            else "failed requests (socket errors, timeouts or 4xx/5xx), included in its req/s and latencies")
    return [f"note: {s.target}: {s.errors} {what} over {s.rounds} round(s)" for s in summaries if s.errors]


def format_failures(failures: Sequence[Failure]) -> str:
    blocks = []
    for failure in failures:
        block = f"{failure.target} ({failure.scenario}) FAILED: {failure.source} {failure.reason}"
        if failure.log_tail:
            block += f"\n--- {failure.source} output (last lines) ---\n{failure.log_tail}\n---"
        blocks.append(block)
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------- the goals

Summaries = dict[str, dict[str, Summary]]  # scenario -> target -> summary


def _get(summaries: Summaries, scenario: str, target: str) -> Summary | None:
    return summaries.get(scenario, {}).get(target)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _both(*checks: bool | None) -> bool | None:
    return None if any(c is None for c in checks) else all(bool(c) for c in checks)


def goal_faster_than_envoy(scenario: str) -> Callable[[Summaries], str | None]:
    def check(summaries: Summaries) -> str | None:
        ours = _get(summaries, scenario, "meshproxy")
        if ours is None or not ours.ratios:
            return None
        rps, p99 = ours.ratios.get("rps"), ours.ratios.get("p99")
        ok = _both(None if rps is None else rps >= 1.5, None if p99 is None else p99 <= 1.0)
        return (f"{scenario}: req/s {_number(rps, 2)}x envoy (>= 1.5), p99 {_number(p99, 2)}x envoy (<= 1): "
                f"{_verdict(ok)}")
    return check


def goal_per_core(scenario: str) -> Callable[[Summaries], str | None]:
    """The HTTP/2 issue's (#18): req/s per core of the proxy (requests per CPU-second), p99 no worse. Raw req/s is
    shown too; below 1.5x with the proxy's core not full, it is the load side (h2load and nginx on one CPU) that
    capped it."""
    def check(summaries: Summaries) -> str | None:
        ours = _get(summaries, scenario, "meshproxy")
        if ours is None or not ours.ratios:
            return None
        per_core, p99, rps = ours.ratios.get("per_core"), ours.ratios.get("p99"), ours.ratios.get("rps")
        rate, cpu = ours.values.get("rps"), ours.values.get("cpu")
        busy = None if rate is None or cpu is None else rate * cpu / 1e4  # percent of its core
        ok = _both(None if per_core is None else per_core >= 1.5, None if p99 is None else p99 <= 1.0)
        return (f"{scenario} (HTTP/2 issue): req/s per core {_number(per_core, 2)}x envoy (>= 1.5), p99 "
                f"{_number(p99, 2)}x envoy (<= 1): {_verdict(ok)}; req/s {_number(rps, 2)}x envoy with meshproxy's "
                f"core {_number(busy, 0)} % busy")
    return check


def goal_routes_1000(summaries: Summaries) -> str | None:
    many, few = _get(summaries, "routes-1000", "meshproxy"), _get(summaries, "bookinfo-routing", "meshproxy")
    if many is None or few is None:
        return None
    share = ratio(many.values["rps"], few.values["rps"])
    ok = None if share is None else share >= 0.9
    return (f"routes-1000: req/s {_number(share, 2)}x bookinfo-routing's (>= 0.90; the two ran minutes apart): "
            f"{_verdict(ok)}")


def goal_one_connection(summaries: Summaries) -> str | None:
    ours = _get(summaries, "one-connection", "meshproxy")
    if ours is None or not ours.ratios:
        return None
    p50, p99 = ours.ratios.get("added_p50"), ours.ratios.get("added_p99")
    ok = _both(None if p50 is None else p50 <= 1.0, None if p99 is None else p99 <= 1.0)
    return f"one-connection: added p50 {_number(p50, 2)}x envoy's, added p99 {_number(p99, 2)}x (<= 1): {_verdict(ok)}"


def goal_bodies(summaries: Summaries) -> str | None:
    ours = _get(summaries, "bodies-1mib", "meshproxy")
    if ours is None or not ours.ratios:
        return None
    mbps = ours.ratios.get("mbps")
    return f"bodies-1mib: MB/s {_number(mbps, 2)}x envoy (>= 1): {_verdict(None if mbps is None else mbps >= 1.0)}"


def goal_idle(summaries: Summaries) -> str | None:
    ours = _get(summaries, "idle-10k", "meshproxy")
    if ours is None or ours.values.get("rss") is None:
        return None
    rss = ours.values["rss"]
    return f"idle-10k: RSS {_number(rss, 2)} MiB (< 100): {_verdict(rss < 100 if rss is not None else None)}"


def goal_mtls(summaries: Summaries) -> str | None:
    """The security issue's (#16): Bookinfo over mutual TLS, both sidecars on one core."""
    ours = _get(summaries, "mtls-keepalive", "meshproxy")
    if ours is None or not ours.ratios:
        return None
    rps = ours.ratios.get("rps")
    return (f"mtls-keepalive (security issue): req/s per core {_number(rps, 2)}x envoy (>= 1.5): "
            f"{_verdict(None if rps is None else rps >= 1.5)}")


GOALS: tuple[Callable[[Summaries], str | None], ...] = (
    goal_faster_than_envoy("bookinfo-routing"), goal_faster_than_envoy("bookinfo-telemetry"), goal_routes_1000,
    goal_one_connection, goal_bodies, goal_idle, goal_mtls, goal_per_core("h2c"), goal_per_core("grpc-unary"),
)


def goals(summaries: Summaries) -> list[str]:
    return [line for check in GOALS if (line := check(summaries)) is not None]
