"""Instructions per proxied request, counted by callgrind: the steady measure on a shared machine.

The harness's Bookinfo scenario (`virtual-service-reviews-test-v2.yaml` + `destination-rule-all.yaml`, its
ServiceEntry with one endpoint per reviews version: scenarios.bookinfo_files), the built-in Python backend,
sequential keep-alive requests on one connection, every second one with `end-user: jason`, PYTHONHASHSEED=0.
Instrumentation is on only while the measured requests run (after a warm-up); the figure is the total divided by
their number. Needs valgrind (Debian's package).

    python benchmarks/instructions.py                     # this checkout, telemetry off
    python benchmarks/instructions.py --telemetry         # Istio metrics + tracing at 1 %
    python benchmarks/instructions.py --tree ../before    # another checkout, its hot path built in place
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from children import Children, free_port
from peers import start_python_backend
from scenarios import BOOKINFO_PROXY_OPTIONS, REVIEWS_HOST, bookinfo_files

REPO_ROOT = Path(__file__).resolve().parent.parent


def send(port: int, count: int) -> None:
    """`count` sequential requests on one keep-alive connection; each must be a 200."""
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as replies:
        for i in range(count):
            user = b"end-user: jason\r\n" if i % 2 else b""
            sock.sendall(b"GET /reviews/0 HTTP/1.1\r\nHost: " + REVIEWS_HOST.encode()
                         + b"\r\nuser-agent: instructions\r\n" + user + b"\r\n")
            status, length = replies.readline(), 0
            while (line := replies.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            replies.read(length)
            if b" 200 " not in status:
                raise SystemExit(f"request {i}: {status!r}")


def measure(tree: Path, python: str, telemetry: bool, requests: int) -> float:
    """The harness's Bookinfo configuration and built-in backend; one proxy under callgrind."""
    work = Path(tempfile.mkdtemp(prefix="instructions-"))
    listen = free_port()
    with Children() as children:
        backend = start_python_backend(children, work, None)
        argv = proxy_argv(python, bookinfo_files(work, backend), listen)
        argv += ["--tracing-sampling", "1"] if telemetry else ["--no-metrics", "--no-tracing"]
        env = {**BOOKINFO_PROXY_OPTIONS, "PYTHONPATH": str(tree)}
        return count_per_request(tree, argv, env, listen, send, 200, requests)


def count_per_request(tree: Path, argv: list[str], env: Mapping[str, str], port: int,
                      load: Callable[[int, int], None], warmup: int, requests: int) -> float:
    """Instructions per request of the proxy `argv` under callgrind: `load(port, n)` sends n requests, first
    `warmup` of them uncounted (connections, caches), then `requests` with instrumentation on."""
    work = Path(tempfile.mkdtemp(prefix="callgrind-"))
    out = work / "callgrind.out"
    proxy = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                              *argv], cwd=tree, env={**os.environ, **env, "PYTHONHASHSEED": "0"},
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proxy.stderr is not None
        for line in proxy.stderr:
            if "listening on" in line:
                break
        load(port, warmup)
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proxy.pid)], check=True, capture_output=True)
        load(port, requests)
        subprocess.run([*control, "-i", "off", str(proxy.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proxy.pid)], check=True, capture_output=True)
        time.sleep(1)
        total = 0
        for dump in work.glob("callgrind.out*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return total / requests
    finally:
        proxy.terminate()
        proxy.wait(60)


def proxy_argv(python: str, configs: Iterable[Path], port: int) -> list[str]:
    """`meshproxy run` on `configs`, listening on `port`, no admin, no file polling."""
    return [python, "-m", "meshproxy", "run", *(word for path in configs for word in ("--config", str(path))),
            "--listen", f"127.0.0.1:{port}", "--admin", "off", "--watch-interval", "0"]


def cli(doc: str, flag: str, flag_help: str, requests: int, measure: Callable[[Path, str, bool, int], float],
        modes: tuple[str, str]) -> None:
    """The command line of the counters (this one, h2_instructions.py): --tree, --python, one on/off `flag`
    (`modes`: what off and on measure), --requests; prints the figure."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="its interpreter (default: this one)")
    parser.add_argument(flag, action="store_true", dest="on", help=flag_help)
    parser.add_argument("--requests", type=int, default=requests, help=f"measured requests (default {requests})")
    args = parser.parse_args()
    per_request = measure(args.tree.resolve(), args.python, args.on, args.requests)
    print(f"{args.tree}: {per_request / 1000:.1f}k instructions per request ({modes[args.on]}, {args.requests} "
          "requests)")


if __name__ == "__main__":
    cli(__doc__, "--telemetry", "Istio metrics and tracing at 1 %% (default: off)", 2000, measure,
        ("telemetry off", "telemetry on"))
