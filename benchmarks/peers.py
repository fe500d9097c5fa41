"""The harness's peers: the tools it installs with apt, and the HTTP backend behind every target."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from children import Address, Child, ChildError, Children, free_address

BENCHMARKS_DIR = Path(__file__).resolve().parent
SBIN_DIRS = ("/usr/sbin", "/sbin")
APT_UPDATE_TIMEOUT_SECONDS = 300
APT_INSTALL_TIMEOUT_SECONDS = 600
BACKEND_READY_TIMEOUT_SECONDS = 10.0

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {address};
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Tool:
    program: str
    package: str


WRK = Tool("wrk", "wrk")
NGINX = Tool("nginx", "nginx")


def locate(program: str) -> str | None:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(program, path=search_path)


class Apt:
    """apt-get, with `apt-get update` run at most once per harness run."""

    def __init__(self) -> None:
        self._updated = False

    def install(self, packages: Sequence[str]) -> bool:
        if locate("apt-get") is None:
            say("apt-get not found: cannot install " + " ".join(packages))
            return False
        if not self._updated:
            self._updated = True
            self._run(["apt-get", "update"], APT_UPDATE_TIMEOUT_SECONDS)
        return self._run(
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
            APT_INSTALL_TIMEOUT_SECONDS,
        )

    @staticmethod
    def _run(argv: list[str], timeout: int) -> bool:
        say("running: " + " ".join(argv))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            done = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            say(f"{argv[0]} failed: {error}")
            return False
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
            say(f"{' '.join(argv[:2])} exited {done.returncode}: " + "\n".join(output[-10:]))
        return done.returncode == 0


def ensure_tools(tools: Sequence[Tool], apt: Apt) -> dict[str, str | None]:
    """Path of each tool's program, installing the missing ones (together, then one by one)."""
    missing = [tool for tool in tools if locate(tool.program) is None]
    if missing and not apt.install([tool.package for tool in missing]) and len(missing) > 1:
        for tool in missing:
            apt.install([tool.package])
    return {tool.program: locate(tool.program) for tool in tools}


def version_of(argv: Sequence[str]) -> str:
    """First line a program prints for its version flag (nginx and wrk print it on stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "unknown"


@dataclass(frozen=True, slots=True)
class Backend:
    description: str
    address: Address
    child: Child


def start_nginx(children: Children, nginx: str, workdir: Path, cpu: int | None) -> Backend:
    address = free_address()
    nginx_dir = workdir / "nginx"
    nginx_dir.mkdir(parents=True, exist_ok=True)
    conf = nginx_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=nginx_dir, address=address))
    argv = [nginx, "-p", str(nginx_dir), "-c", str(conf), "-e", str(nginx_dir / "nginx-error.log")]
    child = children.start_ready(
        "nginx",
        argv,
        ready_url=address.url + "/",
        timeout=BACKEND_READY_TIMEOUT_SECONDS,
        cpu=cpu,
        log=nginx_dir / "nginx.out",
    )
    version = version_of([nginx, "-v"]).removeprefix("nginx version: ")
    return Backend(f"{version}, 1 worker", address, child)


def start_python_backend(children: Children, workdir: Path, cpu: int | None) -> Backend:
    address = free_address()
    argv = [sys.executable, str(BENCHMARKS_DIR / "backend_server.py"), "--port", str(address.port)]
    child = children.start_ready(
        "python backend",
        argv,
        ready_url=address.url + "/",
        timeout=BACKEND_READY_TIMEOUT_SECONDS,
        cpu=cpu,
        log=workdir / "python-backend.log",
    )
    return Backend("built-in Python backend (uvloop + httptools)", address, child)


def start_backend(
    choice: str, nginx: str | None, children: Children, workdir: Path, cpu: int | None
) -> Backend:
    """`choice` is nginx, python, or auto (nginx, falling back to the built-in Python backend)."""
    if choice == "python":
        return start_python_backend(children, workdir, cpu)
    if nginx is None:
        if choice == "nginx":
            raise ChildError("nginx", "not installed and could not be installed")
        say("nginx unavailable: using the built-in Python backend")
        return start_python_backend(children, workdir, cpu)
    try:
        return start_nginx(children, nginx, workdir, cpu)
    except ChildError as error:
        if choice == "nginx":
            raise
        say(f"nginx did not start ({error.reason}): using the built-in Python backend\n{error.log_tail}")
        return start_python_backend(children, workdir, cpu)
