"""Instructions per proxied HTTP/2 request, counted by callgrind (the `h2c` and `grpc-unary` scenarios' path).

h2load (8 connections x 8 streams, prior knowledge) -> meshproxy -> nginx's h2c listener, the scenarios' route
(scenarios.h2_route_files). Instrumentation is on only while the measured requests run (after a warm-up run);
the figure is the proxy's total divided by their number. Needs valgrind, nginx and h2load.

    python benchmarks/h2_instructions.py                        # h2c, this checkout
    python benchmarks/h2_instructions.py --grpc                 # grpc-unary
    python benchmarks/h2_instructions.py --python /venv/bin/python   # a compiled venv's interpreter
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from children import Children, free_port
from instructions import cli, count_per_request, proxy_argv
from peers import start_nginx
from scenarios import GRPC_HEADERS, GRPC_PATH, GRPC_REQUEST, h2_route_files


def h2load(port: int, requests: int, grpc: bool, work: Path) -> None:
    """`requests` requests over 8 connections x 8 streams; every one must succeed."""
    argv = ["h2load", "-n", str(requests), "-c", "8", "-m", "8", "-H", ":authority: backend"]
    path = "/"
    if grpc:
        body = work / "grpc-body.bin"
        body.write_bytes(GRPC_REQUEST)
        argv += [arg for name, value in GRPC_HEADERS.items() for arg in ("-H", f"{name}: {value}")]
        argv += [f"--data={body}"]
        path = GRPC_PATH
    done = subprocess.run([*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=600)
    if f"{requests} succeeded" not in done.stdout or f"{requests} 2xx" not in done.stdout:
        raise SystemExit("h2load: not every request succeeded\n" + done.stdout[-2000:] + done.stderr[-2000:])


def measure(tree: Path, python: str, grpc: bool, requests: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="h2-instructions-"))
    listen = free_port()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with Children() as children:
        backend = start_nginx(children, nginx, work, None)
        files, _ = h2_route_files(work, backend, "GRPC" if grpc else "HTTP2")
        argv = [*proxy_argv(python, files, listen), "--no-metrics", "--no-tracing"]
        return count_per_request(tree, argv, {}, listen, lambda port, n: h2load(port, n, grpc, work), 1000,
                                 requests)


if __name__ == "__main__":
    cli(__doc__, "--grpc", "the grpc-unary scenario (default: h2c)", 4000, measure, ("h2c", "grpc-unary"))
