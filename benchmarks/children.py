"""Child processes of the harness: spawn (optionally pinned to a CPU), wait until ready, stop.

Every child runs in its own session, so a Ctrl-C at the terminal reaches only the harness, which
then stops the children itself (try/finally). Each child also gets PR_SET_PDEATHSIG, so it is
sent SIGTERM by the kernel if the harness dies without running its cleanup (SIGTERM rather than
SIGKILL, so that nginx stops its workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"
STOP_GRACE_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


class ChildError(Exception):
    """A child failed to start, to become ready, to stay up or to report; `log_tail` is its last output."""

    def __init__(self, name: str, reason: str, log_tail: str = "") -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.log_tail = log_tail


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port() -> int:
    """A currently free loopback port (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def free_address() -> Address:
    return Address(LOOPBACK, free_port())


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """`argv` prefixed with `taskset -c CPU` (taskset execs, so the pid stays the program's)."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return tail(self.log) if self.log else ""

    def check_alive(self) -> None:
        if not self.alive():
            raise self.died_error()

    def died_error(self) -> ChildError:
        self.process.poll()
        return ChildError(self.name, f"exited with code {self.process.returncode}", self.log_tail())


class Children:
    """Owns every process the harness starts; `close()` stops whatever is still running."""

    def __init__(self) -> None:
        self._running: list[Child] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        log: Path | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        stdout: int | IO[bytes]
        log_file = open(log, "wb") if log else None  # noqa: SIM115 - closed below, the child keeps its copy
        try:
            stdout = subprocess.PIPE if stdout_pipe else (log_file or subprocess.DEVNULL)
            process = subprocess.Popen(
                pinned(argv, cpu),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=stdout,
                stderr=log_file or subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as error:
            raise ChildError(name, f"cannot start {argv[0]}: {error}") from error
        finally:
            if log_file:
                log_file.close()
        child = Child(name, process, log)
        self._running.append(child)
        return child

    def start_ready(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_url: str,
        timeout: float,
        cpu: int | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Spawn, then wait until `ready_url` answers 200; a child that never does is stopped."""
        child = self.spawn(name, argv, cpu=cpu, log=log, cwd=cwd, env=env)
        try:
            wait_until_ready(child, ready_url, timeout)
        except ChildError:
            self.stop(child)
            raise
        return child

    def stop(self, child: Child) -> int:
        """SIGTERM to the child's process group, SIGKILL after a grace period; returns exit code."""
        if child in self._running:
            self._running.remove(child)
        return _terminate(child.process)

    def close(self) -> None:
        while self._running:
            self.stop(self._running[-1])


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _terminate(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    _signal_group(process, signal.SIGKILL)  # stragglers of the group (e.g. nginx workers)
    for stream in (process.stdout, process.stdin):
        if stream:
            with contextlib.suppress(OSError):
                stream.close()
    return process.returncode


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of a GET to a loopback `url`, or None when nothing answers."""
    without_scheme = url.removeprefix("http://")
    authority, _, path = without_scheme.partition("/")
    hostname, _, port = authority.partition(":")
    connection = http.client.HTTPConnection(hostname, int(port), timeout=timeout)
    try:
        connection.request("GET", "/" + path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def wait_until_ready(child: Child, url: str, timeout: float) -> None:
    """Poll `url` until it answers 200; raise ChildError if the child dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_status: int | None = None
    while time.monotonic() < deadline:
        child.check_alive()
        last_status = http_status(url)
        if last_status == 200:
            return
        time.sleep(POLL_INTERVAL_SECONDS)
    seen = f"last status {last_status}" if last_status else "no answer"
    raise ChildError(child.name, f"not ready after {timeout:.0f} s at {url} ({seen})", child.log_tail())
