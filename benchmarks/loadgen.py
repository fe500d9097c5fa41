"""Load generation with wrk: one bounded run, results read from a JSON line printed by wrk_json.lua."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from children import Address, ChildError, Children
from scenarios import Request

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_json.lua"
RESULT_PREFIX = "WRK_JSON "
WRK_REQUEST_TIMEOUT_SECONDS = 2
WRK_EXIT_GRACE_SECONDS = 15


@dataclass(frozen=True, slots=True)
class Load:
    duration_s: int
    connections: int
    threads: int


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    bad_statuses: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.bad_statuses


def wrk_argv(wrk: str, target: Address, request: Request, load: Load) -> list[str]:
    headers = {"Host": request.host, **request.headers}
    header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    return [
        wrk,
        f"--threads={load.threads}",
        f"--connections={max(load.connections, load.threads)}",
        f"--duration={load.duration_s}s",
        f"--timeout={WRK_REQUEST_TIMEOUT_SECONDS}s",
        f"--script={WRK_SCRIPT}",
        *header_args,
        target.url + request.path,
    ]


def parse_wrk_output(stdout: str) -> WrkResult | None:
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line.removeprefix(RESULT_PREFIX))
            errors = data["errors"]
            return WrkResult(
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1e3,
                p99_ms=data["p99_us"] / 1e3,
                socket_errors=sum(int(errors[kind]) for kind in ("connect", "read", "write", "timeout")),
                bad_statuses=int(errors["status"]),
            )
    return None


def run_wrk(
    children: Children,
    wrk: str,
    target: Address,
    request: Request,
    load: Load,
    *,
    cpu: int | None,
    log: Path,
) -> WrkResult:
    """One wrk run of `load.duration_s` seconds; the harness waits a bounded time for it to finish."""
    argv = wrk_argv(wrk, target, request, load)
    child = children.spawn("wrk", argv, cpu=cpu, stdout_pipe=True, log=log)
    try:
        stdout, _ = child.process.communicate(timeout=load.duration_s + WRK_EXIT_GRACE_SECONDS)
    except subprocess.TimeoutExpired as error:
        reason = f"still running {WRK_EXIT_GRACE_SECONDS} s after its duration"
        raise ChildError("wrk", reason, child.log_tail()) from error
    finally:
        children.stop(child)
    text = stdout.decode(errors="replace")
    result = parse_wrk_output(text)
    if result is None:
        reason = f"exited {child.process.returncode} without a result"
        raise ChildError("wrk", reason, (text[-2000:] + "\n" + child.log_tail()).strip())
    return result
