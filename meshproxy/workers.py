"""`meshproxy run --concurrency N`: a supervisor process and N worker processes, as Envoy's --concurrency.

Each worker is a whole proxy (ProxyApp: its own uvloop event loop, config load and hot-reload watch) started
as a fresh interpreter (`python -c ...`, never a fork of a running loop), with the Settings pickled on its stdin.
The workers' listeners all bind the same ports with SO_REUSEPORT and the kernel spreads connections among them.

The supervisor (this module's `supervise`) owns what the sidecar shows the outside:
- the listen ports: it binds each one first, with SO_REUSEPORT and without listening, so that a port 0 becomes
  one concrete port for every worker and the port stays reserved while a worker restarts;
- the admin port (`--admin`, served by admin.py's router, answered by `SupervisorAdmin`): each worker runs its
  own admin on an ephemeral loopback port and reports it on a pipe once it is serving. The supervisor's /ready
  is 200 only when every worker answers 200; /stats/prometheus is the workers' expositions merged
  (`merge_expositions`), so a scrape sees one sidecar with today's names and labels; POST /reload goes to every
  worker; POST /quitquitquit stops them all; /config_dump and /routes are worker 0's (every worker loads the
  same files); /workers lists them (index, pid, admin port, restarts);
- pilot-agent's health and status ports (`status_ports.py`), answered as its admin answers /ready and
  /stats/prometheus (the workers then get their loopback admin even when the sidecar's is off);
- signals: SIGTERM/SIGINT are forwarded as SIGTERM (each worker drains as a single process does), SIGHUP as
  SIGHUP (reload); it exits 0 when every worker exited 0;
- crashes: a worker that exits on its own is logged with its exit code or signal and started again, up to
  RESTART_LIMIT restarts in RESTART_WINDOW seconds, then everything stops and the supervisor exits 1. A worker
  that fails while the sidecar starts stops it at once (with that worker's exit code, as a single process).
Workers ask the kernel for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so a SIGKILLed supervisor
leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import operator
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .admin import AdminError, AdminServer, Handler, Reply, check_admin_address, serve_admin
from .lifecycle import handle_signals, ignore_stop_signals
from .messages import RequestHead
from .settings import GatewayPortSpec, InboundSpec, Settings

if TYPE_CHECKING:
    from .status_ports import StatusPorts

log = logging.getLogger("meshproxy.workers")

RESTART_LIMIT = 5  # restarts allowed in RESTART_WINDOW seconds; one more crash stops the sidecar
RESTART_WINDOW = 60.0
STOP_GRACE = 10.0  # seconds past --drain-time before a worker that has not exited is killed
PROBE_TIMEOUT = 3.0  # a worker's /ready must answer within this for the supervisor's /ready to be 200
FETCH_TIMEOUT = 10.0  # /stats/prometheus, /reload, /config_dump, /routes of one worker
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# --------------------------------------------------------------------------- metrics merge

# Gauges whose value is the same in every worker (a build, a config version): the merge keeps the largest, as
# a sum would count workers instead. Every other gauge is summed: connections, tasks, pool sizes of N workers add
# up to the sidecar's. Counters and histograms (buckets, _sum, _count) are summed; `_created` timestamps and
# process_start_time_seconds keep the earliest.
SAME_IN_EVERY_WORKER = frozenset({"istio_build", "meshproxy_config_version"})


def _combiner(family: Metric, sample_name: str) -> Callable[[float, float], float]:
    if sample_name.endswith("_created") or sample_name == "process_start_time_seconds":
        return min
    if family.type in ("info", "stateset") or (
            family.type == "gauge" and (family.name in SAME_IN_EVERY_WORKER or family.name.endswith("_info"))):
        return max
    return operator.add


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """Prometheus text expositions of the workers -> one set of families: samples with the same name and labels
    are combined (see above), others kept; families and samples stay in the order they first appear."""
    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], list[Any]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                samples[family.name] = {}
            known = samples[family.name]
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                entry = known.get(key)
                if entry is None:
                    known[key] = [sample.name, sample.labels, sample.value]
                else:
                    entry[2] = _combiner(merged, sample.name)(entry[2], sample.value)
    for name, merged in families.items():
        for sample_name, labels, value in samples[name].values():
            merged.add_sample(sample_name, labels, value)
    return list(families.values())


def render(families: Sequence[Metric]) -> bytes:
    """Families -> Prometheus text, exactly as a worker's admin writes its own."""
    from prometheus_client import CollectorRegistry, generate_latest

    class _Fixed:
        def collect(self) -> Sequence[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())  # type: ignore[arg-type]
    return generate_latest(registry)


# --------------------------------------------------------------------------- settings of the workers


def resolve_concurrency(value: int) -> int:
    """0: one worker per CPU this process may run on (as Envoy's default); else the value."""
    if value > 0:
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _reserve(address: tuple[str, int]) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: fixes a port 0 and keeps the port ours while workers come and go.
    A socket that does not listen gets no connections; the workers' listening sockets share the port with it."""
    host, port = address
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def reserve_ports(settings: Settings) -> tuple[Settings, list[socket.socket]]:
    """The listen addresses with concrete ports, and the sockets that hold them (close them at exit)."""
    held: list[socket.socket] = []
    try:
        def concrete(address: tuple[str, int]) -> tuple[str, int]:
            sock = _reserve(address)
            held.append(sock)
            return address[0], sock.getsockname()[1]

        listen = concrete(settings.listen) if settings.listen is not None else None
        inbound = tuple(InboundSpec(concrete(spec.listen), spec.app) for spec in settings.inbound)
        gateway_ports = tuple(GatewayPortSpec(spec.number, concrete(spec.listen)) for spec in settings.gateway_ports)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return dataclasses.replace(settings, listen=listen, inbound=inbound, gateway_ports=gateway_ports), held


def worker_settings(settings: Settings, index: int) -> Settings:
    """One worker's Settings: the sidecar's, with its own loopback admin on an ephemeral port and its share of
    --max-connections (a limit of the whole sidecar, split evenly: the kernel spreads connections evenly)."""
    limit = settings.max_connections
    asked = settings.admin is not None or settings.pod_ports != (None, None, None)
    return dataclasses.replace(
        settings, worker_index=index, status_port=None, health_port=None, prometheus_port=None,  # the supervisor's
        admin=("127.0.0.1", 0) if asked else None, admin_allow_remote=False,
        max_connections=math.ceil(limit / settings.concurrency) if limit > 0 else 0,
    )


# --------------------------------------------------------------------------- the worker process

# A fresh interpreter (-P: not the current folder first) that imports this very meshproxy: its folder goes first
# on the path unless it is already on it (an installed package: then the path's order stays as it is).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
WORKER_CODE = ("import sys; root = sys.argv.pop(1)\n"
               "if root not in sys.path: sys.path.insert(0, root)\n"
               "from meshproxy.workers import worker_main; worker_main()")


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def worker_main() -> None:
    """Entry of a worker process (WORKER_CODE), arguments INDEX REPORT_FD SUPERVISOR_PID, Settings on stdin."""
    index, report_fd, supervisor = (int(arg) for arg in sys.argv[1:4])
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != supervisor:
        sys.exit(0)  # the supervisor died before the line above: nobody wants this worker any more
    # Until the proxy's own handlers are in place: Ctrl-C reaches the whole process group, but the supervisor
    # forwards it once this worker has started; a reload is pointless while the config is being loaded anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings: Settings = pickle.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.set_inheritable(report_fd, False)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    from .app import ProxyApp
    from .istio.problems import ConfigError

    class WorkerApp(ProxyApp):
        async def start(self) -> None:
            await super().start()
            report = {"pid": os.getpid(), "admin": self.addresses.get("worker-admin")}
            os.write(report_fd, json.dumps(report).encode() + b"\n")  # report_fd stays open: EOF means "exited"

    import uvloop

    try:
        uvloop.run(WorkerApp(settings).run())
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        print(f"meshproxy worker {index}: configuration rejected, not starting", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"meshproxy worker {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


# --------------------------------------------------------------------------- the supervisor


@dataclasses.dataclass(slots=True)
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    report_fd: int
    buffer: bytes = b""
    admin: tuple[str, int] | None = None
    started: bool = False  # it reported: listening and serving

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def admin_url(self) -> str | None:
        return f"http://{self.admin[0]}:{self.admin[1]}" if self.admin is not None else None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # listen ports concrete; admin is the sidecar's
        self.count = settings.concurrency
        self.slots: list[Worker | None] = [None] * self.count
        self.restarts: deque[float] = deque()
        self.restarts_total = 0
        self.stopping = False
        self.exit_code = 0
        self.ever_all_started = False
        self.done: asyncio.Event | None = None
        self._kill_timer: asyncio.TimerHandle | None = None

    # ---- processes

    def spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]  # -X, -O, -W...
            process = subprocess.Popen(
                [sys.executable, *flags, "-P", "-c", WORKER_CODE, PACKAGE_ROOT, str(index), str(write_fd),
                 str(os.getpid())],
                stdin=subprocess.PIPE, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = Worker(index, process, read_fd)
        self.slots[index] = worker
        loop.add_reader(read_fd, self._on_report, worker)  # its end of file is the worker's exit, whatever happens
        assert process.stdin is not None
        try:
            with process.stdin:
                process.stdin.write(pickle.dumps(worker_settings(self.settings, index)))
        except BrokenPipeError:
            pass  # it died at once: its exit is reported like any other
        log.debug("worker %d started as pid %d", index, process.pid)

    def _on_report(self, worker: Worker) -> None:
        try:
            data = os.read(worker.report_fd, 4096)
        except OSError:
            data = b""
        if data:
            worker.buffer += data
            while b"\n" in worker.buffer:
                line, _, worker.buffer = worker.buffer.partition(b"\n")
                self._on_started(worker, json.loads(line))
            return
        asyncio.get_running_loop().remove_reader(worker.report_fd)  # EOF: the worker process is gone
        os.close(worker.report_fd)
        self._on_exit(worker, worker.process.wait())

    def _on_started(self, worker: Worker, report: dict[str, Any]) -> None:
        worker.started = True
        worker.admin = tuple(report["admin"]) if report.get("admin") else None  # type: ignore[assignment]
        log.info("worker %d (pid %d) serving", worker.index, worker.pid)
        if self.stopping:  # asked to stop while it was starting: now it can drain
            self._signal(worker, signal.SIGTERM)
            return
        if not self.ever_all_started and all(w is not None and w.started for w in self.slots):
            self.ever_all_started = True
            log.info("%d workers serving (pids %s)", self.count,
                     " ".join(str(w.pid) for w in self.slots if w is not None))

    def _on_exit(self, worker: Worker, code: int) -> None:
        if self.slots[worker.index] is worker:
            self.slots[worker.index] = None
        if self.stopping:
            if code != 0:
                log.error("worker %d (pid %d) stopped with %s", worker.index, worker.pid, describe_exit(code))
                self.exit_code = self.exit_code or 1
            else:
                log.info("worker %d (pid %d) stopped", worker.index, worker.pid)
            self._check_done()
            return
        if not worker.started and not self.ever_all_started:
            log.error("worker %d (pid %d) failed to start (%s): stopping", worker.index, worker.pid,
                      describe_exit(code))
            self.exit_code = code if code > 0 else 1
            self.stop("a worker failed to start")
            return
        now = time.monotonic()
        while self.restarts and self.restarts[0] <= now - RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= RESTART_LIMIT:
            log.error("worker %d (pid %d) exited unexpectedly (%s); %d restarts in the last %.0f s: giving up",
                      worker.index, worker.pid, describe_exit(code), len(self.restarts), RESTART_WINDOW)
            self.exit_code = 1
            self.stop("too many worker restarts")
            return
        log.error("worker %d (pid %d) exited unexpectedly (%s): restarting it", worker.index, worker.pid,
                  describe_exit(code))
        self.restarts.append(now)
        self.restarts_total += 1
        try:
            self.spawn(worker.index)
        except OSError as exc:  # no process can be made (fds, memory): do not go on with fewer workers
            log.error("cannot restart worker %d: %s", worker.index, exc)
            self.exit_code = 1
            self.stop("a worker cannot be restarted")

    def _signal(self, worker: Worker, sig: int) -> None:
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass  # exited: its report pipe says so

    def live(self) -> list[Worker]:
        return [w for w in self.slots if w is not None]

    def stop(self, reason: str) -> None:
        """Every worker drains and exits (one that is still starting, once it has started)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping %d workers (%s)", len(self.live()), reason)
        for worker in self.live():
            if worker.started:
                self._signal(worker, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(self.settings.drain_time + STOP_GRACE, self._kill_stragglers)
        self._check_done()

    def _kill_stragglers(self) -> None:
        for worker in self.live():
            log.error("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.pid)
            self._signal(worker, signal.SIGKILL)
            self.exit_code = self.exit_code or 1

    def _check_done(self) -> None:
        if self.stopping and not self.live() and self.done is not None:
            self.done.set()

    def reload_all(self, reason: str = "SIGHUP") -> None:
        """SIGHUP: every started worker reloads (one still starting reads the files as they are now anyway).
        A signal, not POST /reload: workers have no admin port when the sidecar has none."""
        log.info("%s: reloading %d workers", reason, len(self.live()))
        for worker in self.live():
            if worker.started:
                self._signal(worker, signal.SIGHUP)

    # ---- lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        admin = SupervisorAdmin(self)
        server: AdminServer | None = None
        status: StatusPorts | None = None  # pilot-agent's health and stats ports: answered for all workers
        try:
            if self.settings.admin is not None:
                server = await serve_admin(admin, self.settings.admin, self.settings.admin_allow_remote)
                log.info("admin listening on %s:%d", *server.address)
            if self.settings.pod_ports != (None, None, None):
                from .status_ports import StatusPorts, app_scrape_from

                status = StatusPorts(admin.ready, admin.metrics, app_scrape_from(os.environ, self.settings.status_port))
                for name, address in (await status.start(*self.settings.pod_ports)).items():
                    log.info("%s listening on %s:%d", name, *address)
            handle_signals(loop, self.stop, self.reload_all)
            log.info("starting %d workers", self.count)
            for index in range(self.count):
                self.spawn(index)
            await self.done.wait()
            ignore_stop_signals(loop)
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            for worker in self.live():  # only after an error in this coroutine: do not leave them running
                self._signal(worker, signal.SIGTERM)
            await admin.close()
            if status is not None:
                await status.close()
            if server is not None:
                await server.close()
        log.info("stopped" if self.exit_code == 0 else "stopped with errors")
        return self.exit_code


# --------------------------------------------------------------------------- the supervisor's admin


class SupervisorAdmin:
    """The sidecar's admin under --concurrency, answered from the workers' own admin ports (see the top)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.session: Any = None  # aiohttp.ClientSession, made on first use (inside the loop)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _fetch(self, worker: Worker, method: str, path: str, timeout: float) -> tuple[int, bytes, str]:
        import aiohttp

        if worker.admin_url is None:
            raise ConnectionError(f"worker {worker.index} has no admin port yet")
        if self.session is None:  # workers come and go: no keep-alive to their admin ports
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with self.session.request(method, worker.admin_url + path,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.read(), response.headers.get("Content-Type", "text/plain")

    async def _all(self, method: str, path: str, timeout: float) -> list[tuple[int, bytes, str] | BaseException]:
        """The same request to every slot, in slot order: a slot without a serving worker is an error."""
        async def one(worker: Worker | None, index: int) -> tuple[int, bytes, str]:
            if worker is None or not worker.started:
                raise ConnectionError(f"worker {index} is not serving")
            return await self._fetch(worker, method, path, timeout)

        return await asyncio.gather(*(one(w, i) for i, w in enumerate(self.supervisor.slots)), return_exceptions=True)

    async def _first_worker(self, path: str) -> Reply:
        """Worker 0's answer (or the first serving one's while it restarts): every worker loads the same files."""
        import aiohttp

        for worker in self.supervisor.slots:
            if worker is not None and worker.started:
                try:
                    status, body, content_type = await self._fetch(worker, "GET", path, FETCH_TIMEOUT)
                except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:  # as _all's callers: 503
                    raise AdminError(503, f"worker {worker.index}: {exc!s}\n") from None
                return Reply(status, body, content_type)
        raise AdminError(503, "no worker serving\n")

    async def ready(self) -> Reply:
        if self.supervisor.stopping:
            return Reply.text("DRAINING\n", 503)
        for answer in await self._all("GET", "/ready", PROBE_TIMEOUT):
            if isinstance(answer, BaseException):
                return Reply.text("PRE_INITIALIZING\n", 503)
            if answer[0] != 200:
                return Reply(503, answer[1], answer[2])  # its DRAINING or PRE_INITIALIZING
        return Reply.text("LIVE\n")

    async def config_dump(self) -> Reply:
        return await self._first_worker("/config_dump")

    async def routes(self) -> Reply:
        return await self._first_worker("/routes")

    async def metrics(self) -> Reply:
        texts = []
        for index, answer in enumerate(await self._all("GET", "/stats/prometheus", FETCH_TIMEOUT)):
            if isinstance(answer, BaseException) or answer[0] != 200:
                # A partial sum would look like a counter reset to Prometheus: fail the scrape instead.
                why = answer if isinstance(answer, BaseException) else f"status {answer[0]}"
                raise AdminError(503, f"worker {index}: {why!s}\n")
            texts.append(answer[1].decode())
        return Reply(200, render(merge_expositions(texts) + self.own_metrics()), CONTENT_TYPE_LATEST)

    async def reload(self) -> Reply:
        """Every worker reloads through its own POST /reload, so that their rejections come back here."""
        problems = []
        for index, answer in enumerate(await self._all("POST", "/reload", FETCH_TIMEOUT)):
            if isinstance(answer, BaseException):
                problems.append(f"worker {index}: {answer!s}\n")
            elif answer[0] != 200:
                problems.append(answer[1].decode(errors="replace"))
        if problems:
            return Reply.text(problems[0] if len(set(problems)) == 1 else "".join(problems), 400)
        return Reply.text("OK\n")

    async def quit(self) -> Reply:
        self.supervisor.stop("admin /quitquitquit")
        return Reply.text("OK\n")

    async def console(self, head: RequestHead) -> Reply:
        """Each worker keeps its own recent requests and spans: its admin port (GET /workers) serves its console."""
        raise AdminError(404, "the console is per worker under --concurrency: open a worker's admin port "
                              "(GET /workers lists them) at /console/\n")

    async def workers(self) -> Reply:
        supervisor = self.supervisor
        return Reply.json({"concurrency": supervisor.count, "restarts": supervisor.restarts_total,
                           "workers": self.workers_info()})

    def extra_endpoints(self) -> Sequence[tuple[str, str, Handler]]:
        return (("GET", "/workers", self.workers),)

    def own_metrics(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        supervisor = self.supervisor
        workers = GaugeMetricFamily("meshproxy_workers", "Worker processes serving (--concurrency)")
        workers.add_metric([], sum(1 for w in supervisor.live() if w.started))
        restarts = CounterMetricFamily("meshproxy_worker_restarts", "Worker processes restarted after an exit")
        restarts.add_metric([], supervisor.restarts_total)
        return [workers, restarts]

    def workers_info(self) -> list[dict[str, Any]]:
        return [{"index": i, "pid": w.pid if w else None, "admin": list(w.admin) if w and w.admin else None,
                 "serving": bool(w and w.started)} for i, w in enumerate(self.supervisor.slots)]


def supervise(settings: Settings) -> int:
    """Run `settings.concurrency` workers until SIGTERM/SIGINT; 0 when they all drained and exited cleanly.

    Raises as `app.run` does, before any worker starts: ConfigError for a rejected config, OSError for a port
    that cannot be bound, ValueError for a non-loopback admin without --admin-allow-remote.
    """
    import uvloop

    from .app import load_config

    load_config(settings)  # a rejected config is reported once, here, not by every worker
    if settings.admin is not None:
        check_admin_address(settings.admin[0], settings.admin_allow_remote)
    settings, held = reserve_ports(settings)
    try:
        return uvloop.run(Supervisor(settings).run())
    finally:
        for sock in held:
            sock.close()
