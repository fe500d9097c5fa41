"""`meshproxy demo` as a test fixture: the real command in a subprocess, driven the way a user drives it.

Used by tests/integration/test_bookinfo_walkthrough.py and tests/browser/. Start it once per module: it is
14 processes and takes a few seconds to get ready.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "bookinfo"  # the Istio sample files as the repo ships them (copied unchanged)
LEGACY = REPO / "tests" / "corpus" / "istio-samples" / "legacy"  # v1alpha3 files of Istio 1.0.0 and 1.5.0
BANNER_END = "Press Ctrl-C to stop."
START_TIMEOUT = 60.0
SYNC_TIMEOUT = 15.0
PORT_BLOCK = 100  # the demo uses base .. base+99
WORKLOADS = ("productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1")

_SERVED_BY = re.compile(r"Reviews served by: reviews-(v\d)-0")
_FILLED_STAR = re.compile(r'<svg class="star-filled text-(\w+)-500"')
_RATING_ERROR = re.compile(r'<p class="rating-error[^"]*"[^>]*>([^<]*)</p>')
_USER = re.compile(r'<p class="user">([^<]*)</p>')
_ADMIN = re.compile(r"^\s+(\S+) (?:sidecar|admin):\s+http://127\.0\.0\.1:(\d+)", re.MULTILINE)
_PRODUCT_PAGE = re.compile(r"product page:\s+(http://\S+)")


# --------------------------------------------------------------------------- ports


def free_port_block(size: int = PORT_BLOCK, low: int = 20000, high: int = 32000) -> int:
    """A base port such that base .. base+size-1 are all free on 127.0.0.1 (below the ephemeral range)."""
    bases = list(range(low, high - size, size))
    random.shuffle(bases)
    for base in bases:
        if all(_port_free(port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in {low}..{high}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- what a page shows


@dataclass(frozen=True)
class Page:
    """What a reader of /productpage sees, read from the HTML the way a test can."""

    status: int
    html: str
    elapsed: float

    @property
    def user(self) -> str | None:
        match = _USER.search(self.html)
        return match.group(1) if match else None

    @property
    def version(self) -> str | None:
        """The reviews version that served the page ("Reviews served by: reviews-v2-0"), None if none did."""
        versions = set(_SERVED_BY.findall(self.html))
        assert len(versions) <= 1, versions
        return versions.pop() if versions else None

    @property
    def stars(self) -> Counter[str]:
        """Filled stars by colour."""
        return Counter(_FILLED_STAR.findall(self.html))

    @property
    def rating_errors(self) -> list[str]:
        return _RATING_ERROR.findall(self.html)

    @property
    def reviews_error(self) -> bool:
        return "Error fetching product reviews" in self.html

    @property
    def details_ok(self) -> bool:
        return "<h4>Book Details</h4>" in self.html and "Error fetching product details" not in self.html

    def describe(self) -> str:
        return (f"status {self.status} in {self.elapsed:.2f}s, user {self.user}, reviews {self.version}, "
                f"stars {dict(self.stars)}, rating errors {self.rating_errors}, reviews error {self.reviews_error}, "
                f"details ok {self.details_ok}")


# --------------------------------------------------------------------------- the demo


@dataclass
class Demo:
    """A running `python -m meshproxy demo --dir DIR --port P --base-port B`."""

    demo_dir: Path
    base_port: int
    ingress_port: int
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    admins: dict[str, int] = field(default_factory=dict)
    children: list[psutil.Process] = field(default_factory=list)
    _banner: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        cmd = [sys.executable, "-m", "meshproxy", "demo", "--dir", str(self.demo_dir), "--port", str(self.ingress_port),
               "--base-port", str(self.base_port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._banner.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.interrupt()
            raise RuntimeError(f"meshproxy demo did not start:\n{self.text}\n{self.logs_tail()}")
        banner = self.text
        self.admins = {name: int(port) for name, port in _ADMIN.findall(banner)}
        self.admins["istio-ingressgateway"] = self.admins.pop("ingress")
        page = _PRODUCT_PAGE.search(banner)
        assert page and page.group(1) == f"http://127.0.0.1:{self.ingress_port}/productpage", banner
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if line.strip() == BANNER_END:
                self._banner.set()
        self._banner.set()

    @property
    def text(self) -> str:
        return "".join(self.output)

    def logs_tail(self, lines: int = 20) -> str:
        out = []
        for log in sorted((self.demo_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C: SIGINT to the demo; its exit status. Kills it (and what it started) if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            code = self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def leftovers(self) -> list[psutil.Process]:
        """Processes the demo started that are still running."""
        return [p for p in self.children if _running(p)]

    def kill_all(self) -> None:
        for p in [*self.leftovers()]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    # -- the routing state, changed as a user does

    def cli(self, action: str, *files: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshproxy", "demo", "--dir", str(self.demo_dir), action,
                               *map(str, files)], capture_output=True, text=True, cwd=REPO, timeout=60)

    def apply(self, *files: Path | str) -> str:
        """`meshproxy demo apply FILES`, then wait until every proxy runs the new state; the command's output."""
        done = self.cli("apply", *files)
        assert done.returncode == 0, done.stdout + done.stderr
        self.wait_synced()
        return done.stdout

    def delete(self, *files: Path | str) -> str:
        done = self.cli("delete", *files)
        assert done.returncode == 0, done.stdout + done.stderr
        self.wait_synced()
        return done.stdout

    def reset_routing(self) -> None:
        """Delete every VirtualService but the gateway's `bookinfo`: reviews back to v1/v2/v3 in turn."""
        extra = [p for p in self.state_files() if p.name.startswith("virtualservice.") and
                 p.name != "virtualservice.default.bookinfo.yaml"]
        if extra:
            self.delete(*extra)

    def state_files(self) -> list[Path]:
        return sorted((self.demo_dir / "config").glob("*.yaml"))

    def state(self) -> dict[str, list[tuple[str, str, Any]]]:
        """The resources of the state folder: kind → [(namespace, name, spec)], sorted."""
        kinds: dict[str, list[tuple[str, str, Any]]] = {}
        for path in self.state_files():
            for doc in yaml.safe_load_all(path.read_text()):
                meta = doc["metadata"]
                kinds.setdefault(doc["kind"], []).append((meta.get("namespace", "default"), meta["name"], doc["spec"]))
        return {kind: sorted(items, key=lambda item: item[:2]) for kind, items in kinds.items()}

    # -- the proxies

    def config_dump(self, workload: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admins[workload]}/config_dump", timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def running_state(self, workload: str) -> dict[str, list[tuple[str, str, Any]]]:
        dump = self.config_dump(workload)
        running = {}
        for kind, key in (("VirtualService", "virtual_services"), ("DestinationRule", "destination_rules"),
                          ("ServiceEntry", "service_entries"), ("Gateway", "gateways")):
            items = [(r["namespace"], r["name"], r["spec"]) for r in dump[key]]
            if items:
                running[kind] = sorted(items, key=lambda item: item[:2])
        return running

    def wait_synced(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Until every sidecar and the ingress run exactly the state folder's resources (hot reload)."""
        expected = self.state()
        deadline = time.monotonic() + timeout
        pending = set(self.admins)
        while pending:
            pending = {w for w in pending if self.running_state(w) != expected}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not reloaded after {timeout}s: {sorted(pending)}")
            time.sleep(0.1)

    def metrics(self, workload: str) -> str:
        url = f"http://127.0.0.1:{self.admins[workload]}/stats/prometheus"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    def metric(self, workload: str, name: str, **labels: str) -> float:
        """The sum of the samples `name` of the workload's /stats/prometheus whose labels include `labels`."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics(workload)):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    # -- the product page, through the ingress gateway

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                timeout: float = 30.0) -> tuple[http.client.HTTPResponse, bytes, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ingress_port, timeout=timeout)
        try:
            start = time.monotonic()
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response, data, time.monotonic() - start
        finally:
            conn.close()

    def login(self, user: str) -> str:
        """POST /login as the page's form does; the session cookie ("session=...")."""
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Referer": f"http://127.0.0.1:{self.ingress_port}/productpage"}
        response, _, _ = self.request("POST", "/login", headers, f"username={user}&passwd=password".encode())
        assert response.status == 302, response.status
        cookie = response.getheader("Set-Cookie") or ""
        assert cookie.startswith("session="), cookie
        return cookie.split(";", 1)[0]

    def page(self, cookie: str | None = None) -> Page:
        response, body, elapsed = self.request("GET", "/productpage", {"Cookie": cookie} if cookie else {})
        return Page(response.status, body.decode(), elapsed)

    def pages(self, count: int, cookie: str | None = None, *, parallel: int = 1) -> list[Page]:
        if parallel == 1:
            return [self.page(cookie) for _ in range(count)]
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda _: self.page(cookie), range(count)))


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def running_demo(demo_dir: Path) -> Iterator[Demo]:
    """Start the demo on a free block of ports; on exit stop it with Ctrl-C if a test has not already."""
    base = free_port_block()
    demo = Demo(demo_dir, base, ingress_port=base + 90)  # base+90 is in the block and used by no workload
    demo.start()
    try:
        yield demo
    finally:
        if demo.proc is not None and demo.proc.poll() is None:
            demo.interrupt()
        left = demo.leftovers()
        demo.kill_all()
        assert not left, f"processes left running after the demo stopped: {left}"


# --------------------------------------------------------------------------- steady traffic


class Traffic:
    """Anonymous page loads in a thread, every one checked: a reload must not fail any of them."""

    def __init__(self, demo: Demo, pause: float = 0.02) -> None:
        self.demo = demo
        self.pause = pause
        self.count = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                page = self.demo.page()
            except OSError as exc:
                self.failures.append(f"request {self.count}: {exc!r}")
            else:
                if page.status != 200 or not page.details_ok or page.reviews_error or page.version is None:
                    self.failures.append(f"request {self.count}: {page.describe()}")
            self.count += 1
            self._stop.wait(self.pause)


def versions(pages: Iterable[Page]) -> Counter[str | None]:
    return Counter(p.version for p in pages)
