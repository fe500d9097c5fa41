"""Load generation with wrk: one bounded run, results read from a JSON line printed by wrk_json.lua.

wrk takes one Lua script: the harness writes one per request shape, the request part (method, body, a header
on every second request) followed by wrk_json.lua's done() hook. Requests are formatted once per wrk thread
(in init), so wrk's per-request Lua cost is one function call returning a prepared string.
"""

from __future__ import annotations

import hashlib
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
    bytes_read: int = 0  # response bytes, heads included

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.bad_statuses


ALTERNATE = """\
local plain, alternate = nil, nil
local count = 0
init = function(args)
  plain = wrk.format()
  local headers = {{}}
  for name, value in pairs(wrk.headers) do headers[name] = value end
{assignments}  alternate = wrk.format(nil, nil, headers)
end
request = function()
  count = count + 1
  if count % 2 == 0 then return alternate end
  return plain
end
"""


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(request: Request, directory: Path) -> Path:
    """The Lua script for `request`: its method, body and alternating headers, then the done() hook."""
    parts = [f"wrk.method = {lua_string(request.method)}\n"]
    if request.body_bytes:
        parts.append(f'wrk.body = string.rep("x", {request.body_bytes})\n')
    if request.alternate_headers:
        assignments = "".join(f"  headers[{lua_string(name)}] = {lua_string(value)}\n"
                              for name, value in request.alternate_headers.items())
        parts.append(ALTERNATE.format(assignments=assignments))
    parts.append(WRK_SCRIPT.read_text())
    text = "".join(parts)
    path = directory / f"wrk-{hashlib.sha1(text.encode()).hexdigest()[:12]}.lua"
    path.write_text(text)
    return path


def request_bytes(request: Request) -> int:
    """Bytes wrk sends per request (the head as wrk.format writes it, give or take a few, and the body)."""
    head = f"{request.method} {request.path} HTTP/1.1\r\nHost: {request.host}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    if request.body_bytes:
        head += f"Content-Length: {request.body_bytes}\r\n"
    return len(head) + 2 + request.body_bytes


def wrk_argv(wrk: str, target: Address, request: Request, load: Load, script: Path) -> list[str]:
    headers = {"Host": request.host, **request.headers}
    header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    return [
        wrk,
        f"--threads={load.threads}",
        f"--connections={max(load.connections, load.threads)}",
        f"--duration={load.duration_s}s",
        f"--timeout={WRK_REQUEST_TIMEOUT_SECONDS}s",
        f"--script={script}",
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
                bytes_read=int(data["bytes"]),
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
    argv = wrk_argv(wrk, target, request, load, wrk_script(request, log.parent))
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
