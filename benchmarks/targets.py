"""Targets: what wrk is pointed at. Each launcher starts (or names) a server in front of the backend.

`direct` is the backend itself, the baseline. `meshproxy` is the proxy under test, loading the
scenario's Istio YAML. Later targets (Envoy, a naive aiohttp proxy) are more launchers in TARGETS.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from children import Address, Child, Children, free_address
from peers import Backend

REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_READY_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True, slots=True)
class LaunchContext:
    children: Children
    workdir: Path
    config: Path
    backend: Backend
    cpu: int | None


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    address: Address
    process: Child | None  # the process whose CPU time is charged to this target; None: not measured

    def check_alive(self) -> None:
        if self.process is not None:
            self.process.check_alive()

    def cpu_seconds(self) -> float | None:
        """utime + stime (from /proc/PID/stat, via psutil) of the process and its live children."""
        if self.process is None:
            return None
        try:
            return process_tree_cpu_seconds(self.process.pid)
        except psutil.NoSuchProcess as error:
            raise self.process.died_error() from error


TargetLauncher = Callable[[LaunchContext], Target]


def process_tree_cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def direct(context: LaunchContext) -> Target:
    return Target("direct", context.backend.address, None)


def meshproxy(context: LaunchContext) -> Target:
    listen, admin = free_address(), free_address()
    options = {"--config": str(context.config), "--listen": str(listen), "--admin": str(admin)}
    argv = [sys.executable, "-m", "meshproxy", "run", *(word for pair in options.items() for word in pair)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = context.children.start_ready(
        "meshproxy",
        argv,
        ready_url=admin.url + "/ready",
        timeout=PROXY_READY_TIMEOUT_SECONDS,
        cpu=context.cpu,
        log=context.workdir / "meshproxy.log",
        cwd=REPO_ROOT,
        env=env,
    )
    return Target("meshproxy", listen, child)


TARGETS: dict[str, TargetLauncher] = {
    "direct": direct,
    "meshproxy": meshproxy,
}
