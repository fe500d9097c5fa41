"""Load generation over HTTP/2 with h2load (Debian's nghttp2-client): one bounded run, parsed into the same
result as a wrk run.

h2load prints totals (requests done, succeeded, failed, errored, timed out; status classes) but only the mean
and deviation of request times: the percentiles come from its --log-file, one line per request (start time,
status, microseconds to the end of the response).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from children import Address, ChildError, Children
from loadgen import WRK_EXIT_GRACE_SECONDS, Load, WrkResult
from scenarios import Request

REQUESTS_LINE = re.compile(r"^requests: (?P<total>\d+) total, \d+ started, (?P<done>\d+) done, (?P<ok>\d+) succeeded, "
                           r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout", re.M)
STATUS_LINE = re.compile(r"^status codes: \d+ 2xx, \d+ 3xx, (?P<c4>\d+) 4xx, (?P<c5>\d+) 5xx", re.M)
TRAFFIC_LINE = re.compile(r"^traffic: .*?\((?P<bytes>\d+)\) total", re.M)
FINISHED_LINE = re.compile(r"^finished in (?P<value>[\d.]+)(?P<unit>ms|s),", re.M)


def h2load_argv(h2load: str, target: Address, request: Request, load: Load, streams: int, body: Path | None,
                log_file: Path) -> list[str]:
    headers = {":authority": request.host, **request.headers}
    argv = [h2load, f"--clients={max(load.connections, load.threads)}", f"--threads={load.threads}",
            f"--max-concurrent-streams={streams}", f"--duration={load.duration_s}", f"--log-file={log_file}",
            *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}"))]
    if body is not None:
        argv.append(f"--data={body}")  # h2load sends POST with it
    return [*argv, target.url + request.path]


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile (as wrk reports its own)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


def request_times_us(log_file: Path) -> list[int]:
    times = []
    with log_file.open() as lines:
        for line in lines:
            fields = line.split("\t")
            if len(fields) >= 3:
                times.append(int(fields[2]))
    times.sort()
    return times


def parse_h2load_output(stdout: str, times_us: list[int]) -> WrkResult | None:
    requests, statuses = REQUESTS_LINE.search(stdout), STATUS_LINE.search(stdout)
    finished = FINISHED_LINE.search(stdout)
    if requests is None or statuses is None or finished is None:
        return None
    seconds = float(finished["value"]) / (1000 if finished["unit"] == "ms" else 1)
    traffic = TRAFFIC_LINE.search(stdout)
    bad_statuses = int(statuses["c4"]) + int(statuses["c5"])
    return WrkResult(
        requests=int(requests["done"]),
        seconds=seconds,
        p50_ms=percentile(times_us, 0.50) / 1e3,
        p99_ms=percentile(times_us, 0.99) / 1e3,
        # "failed" counts the 4xx/5xx answers too; errored (reset, cut) and timed-out requests had none
        socket_errors=int(requests["errored"]) + int(requests["timeout"]),
        bad_statuses=bad_statuses,
        bytes_read=int(traffic["bytes"]) if traffic else 0,
    )


def run_h2load(children: Children, h2load: str, target: Address, request: Request, load: Load, streams: int, *,
               cpu: int | None, log: Path) -> WrkResult:
    """One h2load run of `load.duration_s` seconds; the harness waits a bounded time for it to finish."""
    body = None
    if request.body:
        body = log.parent / "h2load-body.bin"
        body.write_bytes(request.body)
    log_file = log.parent / "h2load-requests.tsv"
    log_file.unlink(missing_ok=True)
    argv = h2load_argv(h2load, target, request, load, streams, body, log_file)
    child = children.spawn("h2load", argv, cpu=cpu, stdout_pipe=True, log=log)
    try:
        stdout, _ = child.process.communicate(timeout=load.duration_s + WRK_EXIT_GRACE_SECONDS)
    except subprocess.TimeoutExpired as error:
        reason = f"still running {WRK_EXIT_GRACE_SECONDS} s after its duration"
        raise ChildError("h2load", reason, child.log_tail()) from error
    finally:
        children.stop(child)
    text = stdout.decode(errors="replace")
    times = request_times_us(log_file) if log_file.exists() else []
    result = parse_h2load_output(text, times)
    if result is None:
        raise ChildError("h2load", f"exited {child.process.returncode} without a result",
                         (text[-2000:] + "\n" + child.log_tail()).strip())
    return result
