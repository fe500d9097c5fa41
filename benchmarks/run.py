"""meshproxy benchmark harness: one command, `python benchmarks/run.py` (see benchmarks/README.md).

For each scenario it starts every target in front of one backend, then runs bounded wrk rounds,
interleaving the targets each round, and prints medians over rounds: req/s, p50, p99 and the
proxy's CPU time per request, with each target's ratio to going direct to the backend.
Pinning: the proxy alone on the first CPU; wrk and the backend share the second.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from children import ChildError, Children
from loadgen import Load, WrkResult, run_wrk
from peers import NGINX, WRK, Apt, Backend, ensure_tools, locate, say, start_backend, version_of
from report import Failure, Sample, format_error_notes, format_failures, format_table, summarize, table_rows
from scenarios import SCENARIOS, Request, Scenario
from targets import TARGETS, LaunchContext, Target

EXIT_OK = 0
EXIT_TARGET_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_NO_WRK = 77  # the smoke test skips on this code: wrk is neither present nor installable


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    load: Load
    warmup_s: int
    backend: str
    scenarios: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CpuPlan:
    proxy: int | None
    load: int | None  # wrk and the backend

    def describe(self) -> str:
        if self.proxy is None:
            return "none (needs 2 CPUs and taskset)"
        return f"proxy alone on CPU {self.proxy}; wrk and backend on CPU {self.load}"


@dataclass(frozen=True, slots=True)
class Phase:
    label: str
    load: Load
    round_index: int | None  # None: warm-up, run but not recorded


@dataclass(frozen=True, slots=True)
class Bench:
    """Everything a scenario run needs, fixed for the whole harness run."""

    options: Options
    children: Children
    workdir: Path
    wrk: str
    backend: Backend
    cpus: CpuPlan


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--rounds", type=int, help="rounds per scenario (default 3; --quick: 1)")
    add("--duration", type=int, help="seconds per wrk run (default 10; --quick: 2)")
    add("--connections", type=int, help="wrk connections (default 64; --quick: 8)")
    add("--threads", type=int, default=1, help="wrk threads (default 1)")
    add(
        "--warmup", type=int, default=1, help="seconds of unrecorded load per target before round 1 (0: none)"
    )
    add(
        "--backend",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto (default): nginx, else the built-in uvloop+httptools backend",
    )
    add("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: every scenario")
    add("--quick", action="store_true", help="smoke run: 1 round x 2 s, 8 connections")
    args = parser.parse_args(argv)
    rounds, duration, connections = (1, 2, 8) if args.quick else (3, 10, 64)
    load = Load(args.duration or duration, args.connections or connections, args.threads)
    options = Options(
        rounds=args.rounds or rounds,
        load=load,
        warmup_s=args.warmup,
        backend=args.backend,
        scenarios=tuple(args.scenario or SCENARIOS),
    )
    if min(options.rounds, load.duration_s, load.connections, load.threads) < 1 or options.warmup_s < 0:
        parser.error(
            "--rounds, --duration, --connections and --threads must be at least 1, --warmup at least 0"
        )
    return options


def plan_cpus() -> CpuPlan:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or locate("taskset") is None:
        return CpuPlan(None, None)
    return CpuPlan(proxy=cpus[0], load=cpus[1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def header(bench: Bench) -> str:
    options, load = bench.options, bench.options.load
    return "\n".join(
        [
            f"date:     {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"machine:  {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}, "
            f"Python {platform.python_version()}",
            f"pinning:  {bench.cpus.describe()}",
            f"backend:  {bench.backend.description} at {bench.backend.address}",
            f"wrk:      {version_of([bench.wrk, '-v'])}",
            f"load:     {options.rounds} round(s) x {load.duration_s} s, {load.connections} connections, "
            f"{load.threads} wrk thread(s), {options.warmup_s} s warm-up per target; medians over rounds",
        ]
    )


def launch_targets(context: LaunchContext, scenario: str) -> tuple[list[Target], list[Failure]]:
    targets, failures = [], []
    for name, launch in TARGETS.items():
        try:
            targets.append(launch(context))
        except ChildError as error:
            say(f"{name} did not start for {scenario}: {error.reason}")
            failures.append(Failure(scenario, name, error.name, error.reason, error.log_tail))
    return targets, failures


def stop_targets(bench: Bench, targets: Sequence[Target]) -> None:
    for target in targets:
        if target.process is None:
            continue
        code = bench.children.stop(target.process)
        if code != 0:
            say(f"{target.name} exited with code {code} on SIGTERM (expected 0)")


def rotated(targets: Sequence[Target], position: int) -> list[Target]:
    """Each phase starts with a different target, so no target always runs first."""
    shift = position % len(targets) if targets else 0
    return [*targets[shift:], *targets[:shift]]


def measure(
    bench: Bench, target: Target, request: Request, load: Load, log: Path
) -> tuple[WrkResult, float | None]:
    """One wrk run against `target`, and the CPU seconds its process spent meanwhile."""
    before = target.cpu_seconds()
    try:
        result = run_wrk(
            bench.children, bench.wrk, target.address, request, load, cpu=bench.cpus.load, log=log
        )
    except ChildError:
        target.check_alive()  # a dead target explains a failed wrk run better than wrk does
        raise
    target.check_alive()
    after = target.cpu_seconds()
    return result, None if before is None or after is None else after - before


def phases(options: Options) -> list[Phase]:
    """The optional warm-up (not recorded), then the measured rounds."""
    rounds = [Phase(f"round {i + 1}/{options.rounds}", options.load, i) for i in range(options.rounds)]
    if not options.warmup_s:
        return rounds
    return [Phase("warm-up", replace(options.load, duration_s=options.warmup_s), None), *rounds]


def run_scenario(bench: Bench, name: str, scenario: Scenario) -> tuple[list[Sample], list[Failure]]:
    """Start the targets, run every phase over each live target in turn, stop the targets."""
    workdir = bench.workdir / name
    workdir.mkdir()
    config = workdir / "config.yaml"
    request = scenario(config, bench.backend.address)
    context = LaunchContext(bench.children, workdir, config, bench.backend, bench.cpus.proxy)
    targets, failures = launch_targets(context, name)
    samples: list[Sample] = []
    try:
        for position, phase in enumerate(phases(bench.options)):
            for target in rotated(targets, position):
                try:
                    result, cpu = measure(bench, target, request, phase.load, workdir / "wrk.log")
                except ChildError as error:
                    say(f"{name}: {phase.label}: {target.name} failed: {error.reason}")
                    failures.append(Failure(name, target.name, error.name, error.reason, error.log_tail))
                    targets.remove(target)
                    continue
                say(f"{name}: {phase.label}: {target.name}: {result.requests_per_second:.0f} req/s")
                if phase.round_index is not None:
                    samples.append(Sample(name, target.name, phase.round_index, result, cpu))
    finally:
        stop_targets(bench, targets)
    return samples, failures


def run(options: Options, children: Children, workdir: Path) -> int:
    tools = ensure_tools([WRK] if options.backend == "python" else [WRK, NGINX], Apt())
    wrk = tools[WRK.program]
    if wrk is None:
        say("wrk is not installed and could not be installed (apt-get install wrk)")
        return EXIT_NO_WRK
    cpus = plan_cpus()
    backend = start_backend(options.backend, tools.get(NGINX.program), children, workdir, cpus.load)
    bench = Bench(options, children, workdir, wrk, backend, cpus)
    print(header(bench), end="\n\n", flush=True)
    samples: list[Sample] = []
    failures: list[Failure] = []
    for name in options.scenarios:
        scenario_samples, scenario_failures = run_scenario(bench, name, SCENARIOS[name])
        samples += scenario_samples
        failures += scenario_failures
    summaries = summarize(samples, list(TARGETS))
    print(format_table(table_rows(summaries, failures)))
    for section in (format_error_notes(summaries), format_failures(failures)):
        if section:
            print("\n" + section)
    return EXIT_TARGET_FAILED if failures else EXIT_OK


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # both clean up like Ctrl-C, even if SIGINT was ignored
        signal.signal(signum, _raise_interrupt)
    try:
        # Children is exited first: every child stops before its working directory is removed.
        with tempfile.TemporaryDirectory(prefix="meshproxy-bench-") as tmp, Children() as children:
            return run(options, children, Path(tmp))
    except KeyboardInterrupt:
        say("interrupted: every child process was stopped")
        return EXIT_INTERRUPTED
    except ChildError as error:
        say(f"{error}\n{error.log_tail}")
        return EXIT_TARGET_FAILED


if __name__ == "__main__":
    sys.exit(main())
