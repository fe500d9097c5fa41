"""The harness's peers: the tools it installs with apt, and the HTTP backend behind every target."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from children import Address, Child, ChildError, Children, free_address

BENCHMARKS_DIR = Path(__file__).resolve().parent
SBIN_DIRS = ("/usr/sbin", "/sbin")
APT_UPDATE_TIMEOUT_SECONDS = 300
APT_INSTALL_TIMEOUT_SECONDS = 600
BACKEND_READY_TIMEOUT_SECONDS = 10.0

MIB = 1 << 20
BODY_PATH = "/mib"  # POST or GET: answered with BODY_FILE_BYTES bytes (the request body is read and dropped)
BODY_FILE_BYTES = MIB
SUBSET_PORTS = ("v1", "v2", "v3")  # extra listeners that answer their own name: "v1\n" (as long as "ok\n")
# The HTTP/2 scenarios' backend: nginx's h2c listener (prior knowledge). "ok\n" on any path; GRPC_PATH answers a
# unary gRPC call: one message (GRPC_RESPONSE, a 5-byte gRPC prefix and a 3-byte protobuf) and grpc-status 0 in
# the trailers, as a grpcio server answers.
GRPC_PATH = "/bench.Echo/Unary"
GRPC_RESPONSE = b"\x00\x00\x00\x00\x03\x08\x01\x10"
GRPC_FILE = "grpc-response.bin"

# worker_rlimit_nofile and worker_connections: the idle-10k scenario and two-worker proxies open many upstream
# connections; both stay under the harness's open-file limit (raised to its hard limit, children inherit it).
NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
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
        # A static file for GET and POST. The mirror (to a location answering 204) makes nginx read the whole
        # request body before it answers, as an application would: without it nginx answers a POST to a static
        # file before the body has arrived. POST to a static file is then 405, which error_page turns into the
        # same file with 200.
        location = {body_path} {{
            mirror /_drop;
            mirror_request_body on;
            client_max_body_size 4m;
            client_body_buffer_size 2m;
            root {workdir};
            default_type application/octet-stream;
            error_page 405 =200 /_body;
        }}
        location = /_drop {{ internal; return 204; }}
        location = /_body {{ internal; default_type application/octet-stream; alias {workdir}{body_path}; }}
    }}
{subset_servers}{h2c_server}}}
"""
# nginx 1.22's h2c: `listen ... http2` without ssl speaks HTTP/2 with prior knowledge only. The gRPC location
# is a static file read after the request body (the mirror, as above): POST to it is 405, turned into 200 and
# the file by error_page, whose location adds the trailers. open_file_cache keeps the file open: an
# application answers from memory, and opening it per call made nginx's share of the load side's one CPU
# 24 us per call instead of 16 (the load side caps these scenarios' req/s).
H2C_SERVER = """\
    server {{
        listen {address} http2;
        http2_max_concurrent_streams 1024;
        open_file_cache max=16;
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location = {grpc_path} {{
            mirror /_drop;
            mirror_request_body on;
            alias {workdir}/{grpc_file};
            default_type application/grpc;
            error_page 405 =200 /_grpc;
        }}
        location = /_drop {{ internal; return 204; }}
        location = /_grpc {{
            internal;
            default_type application/grpc;
            alias {workdir}/{grpc_file};
            add_trailer grpc-status 0;
        }}
    }}
"""
SUBSET_SERVER = """\
    server {{
        listen {address};
        location / {{
            default_type text/plain;
            return 200 "{name}\\n";
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
H2LOAD = Tool("h2load", "nghttp2-client")


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
    """The HTTP backend: `address` answers "ok\\n" (and BODY_PATH with 1 MiB); `subsets[name]` answers "name\\n"."""

    description: str
    address: Address
    subsets: dict[str, Address]
    child: Child | None  # None: only addresses (run.py --dump-configs)
    h2c: Address | None = None  # HTTP/2 with prior knowledge ("ok\\n", and GRPC_PATH); None: the Python backend

    def pin(self, cpus: set[int] | None) -> None:
        """Move the backend (every process of it: nginx's master and worker) to `cpus`; None: every CPU."""
        if self.child is not None:
            pin_tree(self.child.pid, cpus)


def pin_tree(pid: int, cpus: set[int] | None) -> None:
    """Set the CPU affinity of a process, its threads and its children (None: every CPU of the harness)."""
    allowed = cpus if cpus is not None else os.sched_getaffinity(0)
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            for thread in process.threads():
                os.sched_setaffinity(thread.id, allowed)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue


def write_body_file(directory: Path) -> None:
    (directory / BODY_PATH.lstrip("/")).write_bytes(b"x" * BODY_FILE_BYTES)


def start_nginx(children: Children, nginx: str, workdir: Path, cpu: int | None) -> Backend:
    address, h2c = free_address(), free_address()
    subsets = {name: free_address() for name in SUBSET_PORTS}
    nginx_dir = workdir / "nginx"
    nginx_dir.mkdir(parents=True, exist_ok=True)
    # nginx's worker runs as nobody: it must be able to reach the body file (a temporary directory is 0700)
    workdir.chmod(0o711)
    nginx_dir.chmod(0o755)
    write_body_file(nginx_dir)
    (nginx_dir / GRPC_FILE).write_bytes(GRPC_RESPONSE)
    conf = nginx_dir / "nginx.conf"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    servers = "".join(SUBSET_SERVER.format(address=sub, name=name) for name, sub in subsets.items())
    conf.write_text(NGINX_CONF.format(workdir=nginx_dir, address=address, nofile=nofile,
                                      connections=max(1024, nofile - 100), body_path=BODY_PATH,
                                      subset_servers=servers,
                                      h2c_server=H2C_SERVER.format(address=h2c, workdir=nginx_dir,
                                                                   grpc_path=GRPC_PATH, grpc_file=GRPC_FILE)))
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
    return Backend(f"{version}, 1 worker (HTTP/1.1, and h2c at {h2c})", address, subsets, child, h2c)


def start_python_backend(children: Children, workdir: Path, cpu: int | None) -> Backend:
    address = free_address()
    subsets = {name: free_address() for name in SUBSET_PORTS}
    argv = [sys.executable, str(BENCHMARKS_DIR / "backend_server.py"), "--port", str(address.port),
            *(word for name, sub in subsets.items() for word in ("--subset", f"{name}={sub.port}"))]
    child = children.start_ready(
        "python backend",
        argv,
        ready_url=address.url + "/",
        timeout=BACKEND_READY_TIMEOUT_SECONDS,
        cpu=cpu,
        log=workdir / "python-backend.log",
    )
    return Backend("built-in Python backend (uvloop + httptools)", address, subsets, child)


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
