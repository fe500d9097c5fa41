"""`meshproxy demo`: Bookinfo on one machine, every app with its own sidecar, an ingress gateway in front.

Each process is real: six aiohttp apps, six `meshproxy run` sidecars (inbound in
front of the app, outbound for its calls, the workload's own identity), and a
`meshproxy run --gateway bookinfo-gateway` ingress. All sidecars watch one
config folder, which `meshproxy demo apply/delete` changes.
"""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import state
from .topology import (
    CONFIG_DIR,
    GATEWAY_NAMESPACE,
    GATEWAY_SERVICE_ACCOUNT,
    INITIAL_FILES,
    Workload,
    console_port,
    ingress_admin_port,
    layout,
    listen_ports,
    services_yaml,
)

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0  # the sidecars drain for 2 s first


@dataclass
class Demo:
    demo_dir: Path
    base_port: int
    ingress_port: int
    access_log: str = "off"
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.demo_dir / "logs"

    @property
    def certs(self) -> Path:
        return self.demo_dir / "certs"

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # Ctrl-C reaches the demo, which stops its children
        out.close()
        self.processes.append((name, proc))

    def prepare(self) -> None:
        initial = self.demo_dir / "initial"
        initial.mkdir(parents=True, exist_ok=True)
        (initial / "services.yaml").write_text(services_yaml(self.base_port))
        files = [initial / "services.yaml"] + [CONFIG_DIR / f for f in INITIAL_FILES if f != "services.yaml"]
        state.reset(self.demo_dir, files)
        self.issue_certificates()

    def issue_certificates(self) -> None:
        """A fresh mesh root and one workload certificate per sidecar (EC P-256: cheaper handshakes than RSA), as
        `meshproxy ca init` / `ca issue` make them: every sidecar speaks mutual TLS to the others (auto mTLS)."""
        from ..security.ca import KEY_EC, init_ca, issue

        ca = init_ca(self.certs / "ca", key_type=KEY_EC, overwrite=True)
        for w in layout(self.base_port):
            issue(ca, "default", w.service_account, self.certs / w.name, key_type=KEY_EC)
        issue(ca, GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, self.certs / "istio-ingressgateway", key_type=KEY_EC)

    def start(self) -> None:
        config = str(state.config_dir(self.demo_dir))
        # Every trace sampled, as Istio's demo profile does, so a Jaeger on 127.0.0.1:4318 shows them all.
        common = ["--config", config, "--watch-interval", "0.5", "--access-log", self.access_log,
                  "--drain-time", "2", "--tracing-sampling", "100",
                  "--console-requests", "200"]
        for w in layout(self.base_port):
            self._spawn(w.name, ["-m", "meshproxy.demo.bookinfo", w.service, "--version", w.version,
                                 "--port", str(w.app_port), "--proxy", f"http://127.0.0.1:{w.outbound_port}",
                                 "--pod-name", f"{w.name}-0"])
            self._spawn(f"{w.name}.sidecar", [
                "-m", "meshproxy", "run", *common,
                "--listen", f"127.0.0.1:{w.outbound_port}",
                "--inbound", f"127.0.0.1:{w.inbound_port}=127.0.0.1:{w.app_port}",
                "--admin", f"127.0.0.1:{w.admin_port}",
                "--workload", w.name, "--label", f"app={w.service}", "--label", f"version={w.version}",
                "--cert-dir", str(self.certs / w.name),  # inbound PERMISSIVE, as Istio's default
            ])
        self._spawn("istio-ingressgateway", [
            "-m", "meshproxy", "run", *common, "--gateway", "bookinfo-gateway",
            "--listen", f"127.0.0.1:{self.ingress_port}", "--admin", f"127.0.0.1:{ingress_admin_port(self.base_port)}",
            "--workload", "istio-ingressgateway", "--label", "app=istio-ingressgateway",
            "--label", "istio=ingressgateway",
            "--cert-dir", str(self.certs / "istio-ingressgateway"),
        ])
        # One console for the mesh: it reads every proxy's admin port (requests, spans, routes, metrics).
        proxies = [f"--proxy={w.name}={w.admin_port}" for w in layout(self.base_port)]
        proxies.append(f"--proxy=istio-ingressgateway={ingress_admin_port(self.base_port)}")
        self._spawn("console", ["-m", "meshproxy.console.mesh", "--listen",
                                f"127.0.0.1:{console_port(self.base_port)}", *proxies])

    def wait_ready(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """True once every app listens and every proxy is ready; False if `stopping()` became true first."""
        deadline = time.monotonic() + READY_TIMEOUT
        admins = [w.admin_port for w in layout(self.base_port)] + [ingress_admin_port(self.base_port),
                                                                   console_port(self.base_port)]
        apps = [w.app_port for w in layout(self.base_port)]
        while time.monotonic() < deadline:
            if stopping():
                return False
            dead = [name for name, proc in self.processes if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited; see {self.logs}")
            if all(_ready(port) for port in admins) and all(_listening(port) for port in apps):
                return True
            time.sleep(0.1)
        raise RuntimeError(f"the demo did not get ready in {READY_TIMEOUT:.0f}s; see {self.logs}")

    def stop(self) -> list[str]:
        """Stop every process (SIGTERM, then SIGKILL after STOP_TIMEOUT); the ones that did not exit cleanly."""
        running = [(name, proc) for name, proc in self.processes if proc.poll() is None]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        unclean = []
        for name, proc in running:
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                unclean.append(f"{name} (killed after {STOP_TIMEOUT:.0f}s)")
            else:
                if code not in (0, -signal.SIGTERM):  # -SIGTERM: still starting, before its handler was set
                    unclean.append(f"{name} (exit status {code})")
        return unclean

    def apply_command(self, file: Path) -> str:
        """The command that changes this demo's routing, as a user would type it here."""
        where = "" if self.demo_dir == state.DEFAULT_DEMO_DIR else f" --dir {shlex.quote(str(self.demo_dir))}"
        try:
            shown = file.relative_to(Path.cwd())
        except ValueError:
            shown = file
        return f"meshproxy demo{where} apply {shlex.quote(str(shown))}"

    def banner(self) -> str:
        workloads: list[Workload] = layout(self.base_port)
        lines = [
            "Bookinfo is running: 6 apps, each with its meshproxy sidecar, behind an ingress gateway.",
            f"  product page:   http://127.0.0.1:{self.ingress_port}/productpage",
            f"  mesh console:   http://127.0.0.1:{console_port(self.base_port)}/console/  "
            "(graph, traces, requests, routing)",
            f"  ingress admin:  http://127.0.0.1:{ingress_admin_port(self.base_port)}  "
            "(/stats/prometheus, /routes, /config_dump)",
        ]
        for w in workloads:
            lines.append(f"  {w.name + ' sidecar:':24} http://127.0.0.1:{w.admin_port}/stats/prometheus")
        lines += [
            f"  mutual TLS:     between all sidecars (auto mTLS), identities in {self.certs}",
            f"  routing files:  {state.config_dir(self.demo_dir)}",
            f"  change routing: {self.apply_command(CONFIG_DIR / 'virtual-service-all-v1.yaml')}",
            f"  logs:           {self.logs}",
            "Press Ctrl-C to stop.",
        ]
        return "\n".join(lines)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _busy_ports(base_port: int, ingress_port: int) -> list[str]:
    busy = []
    for port, what in listen_ports(base_port, ingress_port):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no use
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{port} ({what})")
    return busy


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_demo(demo_dir: Path, base_port: int, ingress_port: int, access_log: str) -> int:
    busy = _busy_ports(base_port, ingress_port)
    if busy:  # checked before the state folder is reset: it may be a running demo's
        print(f"in use: port {', '.join(busy)}; is a demo already running? Choose other ports with --port "
              f"(ingress) and --base-port (base .. base+99)", file=sys.stderr)
        return 1
    demo = Demo(demo_dir, base_port, ingress_port, access_log)
    stop = False

    def on_signal(signum: int, _: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        status = _serve(demo, lambda: stop)
    finally:
        unclean = demo.stop()
    if unclean:
        print(f"did not stop cleanly: {', '.join(unclean)}; see {demo.logs}", file=sys.stderr)
        return 1
    print("stopped.", flush=True)
    return status


def _serve(demo: Demo, stopping: Callable[[], bool]) -> int:
    """Start the demo and watch it until `stopping()`: 0, or 1 when it could not start or a process died."""
    try:
        demo.prepare()
        demo.start()
        if demo.wait_ready(stopping):
            print(demo.banner(), flush=True)
    except RuntimeError as exc:  # a process exited, or not ready in time: say why (the caller stops the rest)
        print(exc, file=sys.stderr)
        return 1
    while not stopping():
        dead = [name for name, proc in demo.processes if proc.poll() is not None]
        if dead:
            print(f"{', '.join(dead)} exited; see {demo.logs}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("stopping...", flush=True)
    return 0
