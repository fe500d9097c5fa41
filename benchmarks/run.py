"""meshproxy benchmark harness: one command, `python benchmarks/run.py` (see benchmarks/README.md).

For each scenario it starts every target (direct, meshproxy, envoy, aiohttp-naive) in front of one backend,
checks that the routing targets route as the scenario's Istio YAML says, then runs bounded wrk rounds,
interleaving the targets each round, and prints per scenario the medians over rounds (req/s, p50, p99, CPU
time per request; added latency, MB/s or resident memory where the scenario is about that) and each
figure's ratio to Envoy's in the same round. Pinning: the proxy alone on the first CPU; wrk and the backend
share the second (scenarios 5 and 6 differ, see the README).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import envoy_config
from children import LOOPBACK, Address, ChildError, Children
from h2load import run_h2load
from loadgen import Load, WrkResult, request_bytes, run_wrk
from peers import (
    H2LOAD,
    NGINX,
    WRK,
    Apt,
    Backend,
    ensure_tools,
    locate,
    say,
    start_backend,
    version_of,
)
from report import (
    Failure,
    Sample,
    Summaries,
    Summary,
    error_notes,
    format_failures,
    goals,
    summarize,
    table,
)
from scenarios import (
    IDLE_CONNECTIONS,
    QUICK_SCENARIOS,
    SCENARIOS,
    BackendUnsuitable,
    Kind,
    Pinning,
    Protocol,
    Scenario,
    Setup,
)
from targets import TARGETS, LaunchContext, Target, TargetSkipped, envoy_binary
from trace_sink import ENVOY_PATH, MESHPROXY_PATH, TraceSink

# the mutual-TLS scenarios (security issue #16) live in their own module
from mtls import MTLS_QUICK_SCENARIOS, MTLS_SCENARIOS, MeshFiles, dump_server_sidecar  # isort: skip

SCENARIOS = {**SCENARIOS, **MTLS_SCENARIOS}
QUICK_SCENARIOS = (*QUICK_SCENARIOS, *MTLS_QUICK_SCENARIOS)

BENCHMARKS_DIR = Path(__file__).resolve().parent
EXIT_OK = 0
EXIT_TARGET_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_NO_WRK = 77  # the smoke test skips on this code: wrk is neither present nor installable
QUICK_TARGETS = ("direct", "meshproxy", "envoy")
PROBE_TIMEOUT_SECONDS = 5.0
IDLE_SETUP_TIMEOUT_SECONDS = 180.0
IDLE_SETTLE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    load: Load
    warmup_s: int
    backend: str
    scenarios: tuple[str, ...]
    targets: tuple[str, ...] | None  # None: each scenario's own list
    quick: bool
    dump_configs: Path | None
    before: Path | None = None  # --before: another checkout measured as `meshproxy-before` in the same rounds


@dataclass(frozen=True, slots=True)
class Placement:
    proxy: int | None  # CPU of the proxy; None: not pinned
    load: int | None  # CPU of wrk or the idle client
    backend: set[int] | None  # CPUs of the backend; None: all
    description: str


@dataclass(frozen=True, slots=True)
class CpuPlan:
    first: int | None
    second: int | None

    def place(self, pinning: Pinning) -> Placement:
        first, second = self.first, self.second
        if first is None or second is None:
            return Placement(None, None, None, "none (needs 2 CPUs and taskset)")
        if pinning is Pinning.ONE_CORE:
            return Placement(first, first, {first}, f"proxy, wrk and backend all on CPU {first}")
        if pinning is Pinning.SHARED:
            return Placement(None, None, None, f"nothing pinned: proxy workers, wrk and backend share CPUs "
                                               f"{first} and {second}")
        if pinning is Pinning.SIDECARS:
            return Placement(first, second, {second}, f"both sidecars on CPU {first}; load and backend on CPU {second}")
        return Placement(first, second, {second}, f"proxy alone on CPU {first}; load and backend on CPU {second}")


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
    h2load: str | None  # None: not installed, the HTTP/2 scenarios are skipped
    backend: Backend
    cpus: CpuPlan
    sink: TraceSink


@dataclass(slots=True)
class Outcome:
    summaries: list[Summary] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--rounds", type=int, help="rounds per scenario (default 3; --quick: 1)")
    add("--duration", type=int, help="seconds per wrk run (default 10; --quick: 2)")
    add("--connections", type=int, help="wrk connections (default 64; --quick: 8) where the scenario does not fix them")
    add("--threads", type=int, default=1, help="wrk threads (default 1) where the scenario does not fix them")
    add("--warmup", type=int, default=1, help="seconds of unrecorded load per target before round 1 (0: none)")
    add("--backend", choices=("auto", "nginx", "python"), default="auto",
        help="auto (default): nginx, else the built-in uvloop+httptools backend")
    add("--scenario", action="append", choices=list(SCENARIOS),
        help="repeatable; default: every scenario but telemetry-off (--quick: " + ", ".join(QUICK_SCENARIOS) + ")")
    add("--target", action="append", choices=list(TARGETS),
        help="repeatable; default: each scenario's targets (--quick: direct, meshproxy, envoy if installed)")
    add("--quick", action="store_true", help="smoke run: 1 round x 2 s, 8 connections, four scenarios")
    add("--before", type=Path, metavar="DIR",
        help="another checkout of meshproxy (e.g. a git worktree at the commit before a change, built there with "
             "`pip install -e DIR` so its hot path is compiled in place): measured as meshproxy-before in the same "
             "rounds, beside meshproxy")
    add("--dump-configs", type=Path, metavar="DIR",
        help="write each scenario's Istio YAML and Envoy configuration under DIR and exit (placeholder ports)")
    args = parser.parse_args(argv)
    rounds, duration, connections = (1, 2, 8) if args.quick else (3, 10, 64)
    load = Load(args.duration or duration, args.connections or connections, args.threads)
    default_scenarios = QUICK_SCENARIOS if args.quick else tuple(s.name for s in SCENARIOS.values() if s.default)
    options = Options(
        rounds=args.rounds or rounds,
        load=load,
        warmup_s=args.warmup,
        backend=args.backend,
        scenarios=tuple(dict.fromkeys(args.scenario or default_scenarios)),
        targets=tuple(args.target) if args.target else (QUICK_TARGETS if args.quick else None),
        quick=args.quick,
        dump_configs=args.dump_configs,
        before=args.before.resolve() if args.before else None,
    )
    if min(options.rounds, load.duration_s, load.connections, load.threads) < 1 or options.warmup_s < 0:
        parser.error("--rounds, --duration, --connections and --threads must be at least 1, --warmup at least 0")
    return options


def plan_cpus() -> CpuPlan:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or locate("taskset") is None:
        return CpuPlan(None, None)
    return CpuPlan(first=cpus[0], second=cpus[1])


def raise_open_file_limit() -> int:
    """Soft open-file limit up to the hard one, for the harness and every child (idle-10k needs ~20,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def meshproxy_revision(tree: Path = BENCHMARKS_DIR.parent) -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=tree,
                              capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def meshproxy_hot_path(tree: Path = BENCHMARKS_DIR.parent) -> str:
    """Compiled with mypyc or interpreted (setup.py): the figures depend on it."""
    code = "from meshproxy import hot_path; print(hot_path.status().describe())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(tree)})
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


def header(bench: Bench, envoy: str | None) -> str:
    options, load = bench.options, bench.options.load
    return "\n".join(
        [
            f"date:      {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            (f"machine:   {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}, "
             f"Python {platform.python_version()}, open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"),
            f"meshproxy: working tree at {meshproxy_revision()}, hot path {meshproxy_hot_path()}",
            *([f"before:    {options.before} at {meshproxy_revision(options.before)}, hot path "
               f"{meshproxy_hot_path(options.before)}"] if options.before is not None else []),
            f"envoy:     {version_of([envoy, '--version']).partition('version: ')[2] if envoy else 'not used'}",
            f"backend:   {bench.backend.description} at {bench.backend.address}",
            f"wrk:       {version_of([bench.wrk, '-v'])}",
            f"h2load:    {version_of([bench.h2load, '--version']) if bench.h2load else 'not installed'}",
            (f"load:      {options.rounds} round(s) x {load.duration_s} s, {load.connections} connections, "
             f"{load.threads} wrk thread(s), {options.warmup_s} s warm-up per target, unless a scenario says "
             "otherwise; medians over rounds; 'x envoy': median over rounds of the ratio to Envoy in the same round"),
        ]
    )


def scenario_targets(options: Options, scenario: Scenario) -> list[str]:
    names = [name for name in scenario.targets if options.targets is None or name in options.targets]
    if options.before is not None and "meshproxy" in names:
        names.insert(names.index("meshproxy"), "meshproxy-before")
    return names


def launch_targets(context: LaunchContext, scenario: Scenario, names: Sequence[str], outcome: Outcome) -> list[Target]:
    targets = []
    for name in names:
        try:
            targets.append(scenario.launchers.get(name, TARGETS[name])(context))
        except TargetSkipped as skip:
            say(f"{scenario.name}: {name} skipped: {skip}")
            outcome.skipped.append(name)
            outcome.notes.append(f"note: {name} skipped: {skip}")
        except ChildError as error:
            say(f"{name} did not start for {scenario.name}: {error.reason}")
            outcome.failures.append(Failure(scenario.name, name, error.name, error.reason, error.log_tail))
    return targets


def stop_targets(bench: Bench, targets: Sequence[Target]) -> None:
    for target in targets:
        for process in target.processes():
            code = bench.children.stop(process)
            if code != 0:
                say(f"{process.name} exited with code {code} on SIGTERM (expected 0)")


def http_answer(address: Address, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(address.host, address.port, timeout=PROBE_TIMEOUT_SECONDS)
    try:
        connection.request(method, path, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def probe(bench: Bench, scenario: Scenario, setup: Setup, targets: list[Target], outcome: Outcome) -> list[Target]:
    """Routing targets must answer each probe from the expected backend port; those that do not are failures."""
    passed = []
    for target in targets:
        problem = None
        if target.routes:
            for check in setup.probes:
                try:
                    status, body = http_answer(target.address, "GET", check.path,
                                               {"Host": setup.request.host, **check.headers})
                except OSError as error:
                    problem = f"probe {check.path} {dict(check.headers)}: {error}"
                    break
                if status != 200 or body != check.expect:
                    problem = (f"routing check failed: {check.path} {dict(check.headers)} answered {status} "
                               f"{body[:40]!r}, expected 200 {check.expect!r}")
                    break
        if problem is None:
            passed.append(target)
            continue
        say(f"{scenario.name}: {target.name}: {problem}")
        log = target.process.log_tail() if target.process else ""
        outcome.failures.append(Failure(scenario.name, target.name, "probe", problem, log))
        for process in target.processes():
            bench.children.stop(process)
    return passed


def rotated(targets: Sequence[Target], position: int) -> list[Target]:
    """Each phase starts with a different target, so no target always runs first."""
    shift = position % len(targets) if targets else 0
    return [*targets[shift:], *targets[:shift]]


def measure(
    bench: Bench, scenario: Scenario, target: Target, setup: Setup, load: Load, cpu: int | None, log: Path
) -> tuple[WrkResult, float | None, int | None]:
    """One wrk (or h2load) run against `target`, the CPU seconds its processes spent meanwhile, and the TLS
    handshakes between its sidecars meanwhile (None: not counted)."""
    handshakes_before = target.handshakes() if target.handshakes else None
    before = target.cpu_seconds()
    try:
        if scenario.protocol is Protocol.H2C:
            assert bench.h2load is not None  # run_scenario skips the HTTP/2 scenarios without it
            result = run_h2load(bench.children, bench.h2load, target.address, setup.request, load, scenario.streams,
                                cpu=cpu, log=log)
        else:
            result = run_wrk(bench.children, bench.wrk, target.address, setup.request, load, cpu=cpu, log=log)
    except ChildError:
        target.check_alive()  # a dead target explains a failed wrk run better than wrk does
        raise
    target.check_alive()
    after = target.cpu_seconds()
    handshakes = None
    if target.handshakes and handshakes_before is not None:
        handshakes = target.handshakes() - handshakes_before
    return result, None if before is None or after is None else after - before, handshakes


def scenario_load(options: Options, scenario: Scenario) -> tuple[int, Load]:
    load = options.load
    duration = min(load.duration_s, scenario.max_duration_s or load.duration_s)
    load = Load(duration, scenario.connections or load.connections, scenario.threads or load.threads)
    return min(options.rounds, scenario.max_rounds or options.rounds), load


def phases(options: Options, rounds: int, load: Load) -> list[Phase]:
    """The optional warm-up (not recorded), then the measured rounds."""
    measured = [Phase(f"round {i + 1}/{rounds}", load, i) for i in range(rounds)]
    if not options.warmup_s:
        return measured
    return [Phase("warm-up", replace(load, duration_s=min(options.warmup_s, load.duration_s)), None), *measured]


def wrk_values(kind: Kind, setup: Setup, result: WrkResult, cpu: float | None,
               handshakes: int | None = None) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "rps": result.requests_per_second,
        "p50": result.p50_ms,
        "p99": result.p99_ms,
        "cpu": cpu * 1e6 / result.requests if cpu is not None and result.requests else None,
        # requests per second of the proxy's own CPU: its throughput per core even when the load side, sharing the
        # other CPU with the backend, cannot bring it to 100 % (the HTTP/2 scenarios)
        "per_core": result.requests / cpu if cpu else None,
    }
    if kind is Kind.BODIES and result.seconds > 0:
        values["mbps"] = (result.bytes_read + result.requests * request_bytes(setup.request)) / result.seconds / 1e6
    if kind is Kind.MTLS:
        values["handshakes"] = handshakes / result.seconds if handshakes is not None and result.seconds > 0 else None
    return values


def add_latency_over_direct(samples: list[Sample]) -> None:
    """Added latency: a target's p50 and p99 minus direct's in the same round."""
    direct = {s.round: s for s in samples if s.target == "direct"}
    for sample in samples:
        base = direct.get(sample.round)
        if sample.target == "direct" or base is None:
            continue
        for key in ("p50", "p99"):
            ours, theirs = sample.values.get(key), base.values.get(key)
            sample.values[f"added_{key}"] = None if ours is None or theirs is None else ours - theirs


def run_rounds(bench: Bench, scenario: Scenario, setup: Setup, targets: list[Target], placement: Placement,
               workdir: Path, outcome: Outcome) -> list[Sample]:
    rounds, load = scenario_load(bench.options, scenario)
    samples: list[Sample] = []
    for position, phase in enumerate(phases(bench.options, rounds, load)):
        for target in rotated(targets, position):
            try:
                result, cpu, handshakes = measure(bench, scenario, target, setup, phase.load, placement.load,
                                                  workdir / "load.log")
            except ChildError as error:
                say(f"{scenario.name}: {phase.label}: {target.name} failed: {error.reason}")
                outcome.failures.append(Failure(scenario.name, target.name, error.name, error.reason, error.log_tail))
                targets.remove(target)
                continue
            errors = (f" ({result.socket_errors} socket errors or timeouts, {result.bad_statuses} 4xx/5xx)"
                      if result.errors else "")
            say(f"{scenario.name}: {phase.label}: {target.name}: {result.requests_per_second:.0f} req/s{errors}")
            if phase.round_index is not None:
                values = wrk_values(scenario.kind, setup, result, cpu, handshakes)
                samples.append(Sample(scenario.name, target.name, phase.round_index, values, result.errors))
    if scenario.kind is Kind.LATENCY:
        add_latency_over_direct(samples)
    return samples


def read_line(stream: object, timeout: float) -> str | None:
    fileno = stream.fileno()  # type: ignore[attr-defined]
    ready, _, _ = select.select([fileno], [], [], timeout)
    if not ready:
        return None
    return stream.readline().decode(errors="replace")  # type: ignore[attr-defined]


def run_idle(bench: Bench, scenario: Scenario, setup: Setup, targets: list[Target], placement: Placement,
             workdir: Path, outcome: Outcome) -> list[Sample]:
    """Per target: RSS, then N connections with one request each held idle, then RSS again."""
    samples = []
    for target in list(targets):
        rss_before = target.rss_mib()
        argv = [sys.executable, str(BENCHMARKS_DIR / "idle_client.py"), "--target", str(target.address),
                "--host", setup.request.host, "--path", setup.request.path,
                "--connections", str(scenario.connections or IDLE_CONNECTIONS)]
        client = bench.children.spawn("idle client", argv, cpu=placement.load, stdout_pipe=True, stdin_pipe=True,
                                      log=workdir / f"idle-client-{target.name}.log")
        try:
            line = read_line(client.process.stdout, IDLE_SETUP_TIMEOUT_SECONDS)
            if not line:
                raise ChildError("idle client", f"no result within {IDLE_SETUP_TIMEOUT_SECONDS:.0f} s",
                                 client.log_tail())
            result = json.loads(line)
            time.sleep(IDLE_SETTLE_SECONDS)
            target.check_alive()
            rss = target.rss_mib()
        except ChildError as error:
            target.check_alive()
            outcome.failures.append(Failure(scenario.name, target.name, error.name, error.reason, error.log_tail))
            continue
        finally:
            bench.children.stop(client)
        opened = int(result["open"])
        per_connection = None
        if rss is not None and rss_before is not None and opened:
            per_connection = (rss - rss_before) * 1024 / opened
        say(f"{scenario.name}: {target.name}: {opened} connections in {result['seconds']} s, RSS {rss_before:.1f} "
            f"-> {rss:.1f} MiB")
        values = {"connections": float(opened), "rss_before": rss_before, "rss": rss,
                  "kib_per_connection": per_connection}
        samples.append(Sample(scenario.name, target.name, 0, values, int(result["failed"])))
    return samples


def sink_notes(counts: dict[str, tuple[int, int]], setup: Setup) -> list[str]:
    if not setup.telemetry.tracing:
        return []
    names = {MESHPROXY_PATH: "meshproxy (OTLP/HTTP)", ENVOY_PATH: "envoy (Zipkin JSON)"}
    parts = [f"{names.get(path, path)} {exports} export(s), {size / 1024:.0f} KiB"
             for path, (exports, size) in sorted(counts.items())]
    return ["note: trace sink received: " + ("; ".join(parts) if parts else "nothing")]


def scenario_heading(scenario: Scenario, setup: Setup, placement: Placement, options: Options) -> str:
    rounds, load = scenario_load(options, scenario)
    if scenario.kind is Kind.IDLE:
        how = f"{scenario.connections or IDLE_CONNECTIONS:,} connections held, RSS read {IDLE_SETTLE_SECONDS:g} s after the last answer"
    else:
        how = (f"{rounds} round(s) x {load.duration_s} s, {load.connections} connection(s), {load.threads} wrk "
               f"thread(s)")
        if scenario.protocol is Protocol.H2C:
            how = (f"{rounds} round(s) x {load.duration_s} s, h2load: {load.connections} connection(s) x "
                   f"{scenario.streams} concurrent streams, {load.threads} thread(s)")
    workers = f"; proxies with {scenario.workers} workers" if scenario.workers > 1 else ""
    return "\n".join([
        f"== {scenario.name}: {scenario.summary}",
        f"   goal: {scenario.goal}",
        f"   {how}; {setup.telemetry.describe()}{workers}",
        f"   pinning: {placement.description}",
    ])


def run_scenario(bench: Bench, scenario: Scenario) -> Outcome:
    """Start the targets, check their routing, measure, stop them; print the scenario's table."""
    outcome = Outcome()
    workdir = bench.workdir / scenario.name
    workdir.mkdir()
    try:
        if scenario.protocol is Protocol.H2C and bench.h2load is None:
            raise BackendUnsuitable("h2load is not installed and could not be installed (apt-get install "
                                    f"{H2LOAD.package})")
        setup = scenario.build(workdir, bench.backend)
    except BackendUnsuitable as why:
        say(f"{scenario.name} skipped: {why}")
        print(f"== {scenario.name}: skipped: {why}", end="\n\n", flush=True)
        return outcome
    placement = bench.cpus.place(scenario.pinning)
    bench.backend.pin(placement.backend)
    bench.sink.take()
    context = LaunchContext(bench.children, workdir, setup, bench.backend, placement.proxy, scenario.workers,
                            bench.sink, install=not bench.options.quick, before=bench.options.before)
    names = scenario_targets(bench.options, scenario)
    targets = launch_targets(context, scenario, names, outcome)
    samples: list[Sample] = []
    try:
        targets = probe(bench, scenario, setup, targets, outcome)
        run = run_idle if scenario.kind is Kind.IDLE else run_rounds
        samples = run(bench, scenario, setup, targets, placement, workdir, outcome)
    finally:
        stop_targets(bench, targets)
        bench.backend.pin(bench.cpus.place(Pinning.SPLIT).backend)
    outcome.summaries = summarize(samples, scenario.kind, names)
    outcome.notes += error_notes(outcome.summaries, scenario.kind)
    outcome.notes += sink_notes(bench.sink.take(), setup)
    blocks = [scenario_heading(scenario, setup, placement, bench.options),
              table(scenario.kind, outcome.summaries, outcome.failures, outcome.skipped)]
    if outcome.notes:
        blocks.append("\n".join(outcome.notes))
    print("\n".join(blocks), end="\n\n", flush=True)
    return outcome


def run(options: Options, children: Children, workdir: Path) -> int:
    apt = Apt()
    tools = ensure_tools([WRK] if options.backend == "python" else [WRK, NGINX], apt)
    wrk = tools[WRK.program]
    if wrk is None:
        say("wrk is not installed and could not be installed (apt-get install wrk)")
        return EXIT_NO_WRK
    raise_open_file_limit()
    cpus = plan_cpus()
    backend = start_backend(options.backend, tools.get(NGINX.program), children, workdir, cpus.second)
    uses_envoy = any("envoy" in scenario_targets(options, SCENARIOS[name]) for name in options.scenarios)
    envoy = envoy_binary(not options.quick) if uses_envoy else None
    failures: list[Failure] = []
    summaries: Summaries = {}
    sink = TraceSink(children, workdir)
    uses_h2load = any(SCENARIOS[name].protocol is Protocol.H2C for name in options.scenarios)
    h2load = ensure_tools([H2LOAD], apt)[H2LOAD.program] if uses_h2load else None
    bench = Bench(options, children, workdir, wrk, h2load, backend, cpus, sink)
    print(header(bench, envoy), end="\n\n", flush=True)
    for name in options.scenarios:
        outcome = run_scenario(bench, SCENARIOS[name])
        failures += outcome.failures
        summaries[name] = {s.target: s for s in outcome.summaries}
    lines = goals(summaries)
    if lines:
        print("== the performance issue's goals, meshproxy in this run\n" + "\n".join("   " + line for line in lines))
    if failures:
        print("\n" + format_failures(failures))
    return EXIT_TARGET_FAILED if failures else EXIT_OK


def dump_configs(options: Options) -> int:
    """Each scenario's Istio YAML and Envoy bootstrap, for a backend at 127.0.0.1:8080 (subsets 8081-8083, h2c
    8084)."""
    assert options.dump_configs is not None
    subsets = {name: Address(LOOPBACK, 8081 + i) for i, name in enumerate(("v1", "v2", "v3"))}
    backend = Backend("placeholder", Address(LOOPBACK, 8080), subsets, None, Address(LOOPBACK, 8084))
    for name in options.scenarios:
        scenario = SCENARIOS[name]
        directory = options.dump_configs / name
        directory.mkdir(parents=True, exist_ok=True)
        setup = scenario.build(directory, backend)
        for path in setup.configs:
            if path.parent != directory:
                shutil.copy(path, directory / path.name)
        tracing = envoy_config.Tracing(setup.telemetry.sampling_percent, LOOPBACK, 4318, ENVOY_PATH) \
            if setup.telemetry.tracing else None
        config = envoy_config.bootstrap(setup.configs, listen=(LOOPBACK, 15001), admin=(LOOPBACK, 15000),
                                        tracing=tracing, certs=envoy_config.CertDir(MeshFiles(directory).client_certs))
        envoy_config.write(directory / "envoy.yaml", config)
        if name in MTLS_SCENARIOS:
            dump_server_sidecar(directory, backend)
        print(f"{directory}: {', '.join(p.name for p in setup.configs)} (meshproxy --config), envoy.yaml")
    return EXIT_OK


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    if options.dump_configs:
        return dump_configs(options)
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
