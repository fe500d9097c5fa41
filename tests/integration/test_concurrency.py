"""`meshproxy run --concurrency N`: a supervisor and N workers sharing the listen ports (SO_REUSEPORT).

Real processes, real loopback sockets. Which worker served what is read from each worker's own admin port
(the supervisor lists them at /workers) and checked against the supervisor's merged /stats/prometheus.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import BACKEND_VS, REPO, ProxyProcess, Upstream, free_port, service_entry, write_config
from waiting import wait_until
from meshproxy.workers import merge_expositions, render

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT and PR_SET_PDEATHSIG")

WAIT = 30.0  # generous: two cores shared with benchmarks; nothing below asserts a duration


# --------------------------------------------------------------------------- helpers


def request(port: int, method: str, path: str, host: str = "127.0.0.1", timeout: float = 20.0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def admin_port(p: ProxyProcess) -> int:
    return p.addresses["admin"][1]


def admin(p: ProxyProcess, path: str, method: str = "GET") -> tuple[int, bytes]:
    status, body, _ = request(admin_port(p), method, path)
    return status, body


def ready(p: ProxyProcess) -> bool:
    try:
        return admin(p, "/ready")[0] == 200
    except OSError:
        return False


def workers(p: ProxyProcess) -> list[dict[str, Any]]:
    status, body = admin(p, "/workers")
    assert status == 200, body
    return json.loads(body)["workers"]


def start(*config: Path, args: tuple[str, ...] = ()) -> ProxyProcess:
    p = ProxyProcess(*config, args=["--concurrency", "2", *args])
    try:
        wait_until(lambda: ready(p), what="/ready 200")
        wait_until(lambda: "outbound" in p.addresses, what="the outbound listener's log line")
    except BaseException:
        p.stop(signal.SIGKILL)
        raise
    return p


def metrics(port: int) -> str:
    status, body, _ = request(port, "GET", "/stats/prometheus")
    assert status == 200, body
    return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def kill_left(pids: list[int]) -> None:
    """After a failed test: no worker may outlive it."""
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def listens_on(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def get_many(port: int, count: int, path: str = "/echo") -> list[tuple[int, bytes, dict[str, str]]]:
    """`count` requests, each on its own new connection (the kernel picks a worker per connection)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: request(port, "GET", f"{path}?n={i}", "backend"), range(count)))


@pytest.fixture
def config(tmp_path: Path, upstream: Upstream) -> Path:
    return write_config(tmp_path / "config", "backend.yaml",
                        service_entry("backend", [(upstream.port, {})], port=80), BACKEND_VS).parent


# --------------------------------------------------------------------------- merge (pure)

WORKER_A = """# HELP istio_requests_total Counter of requests
# TYPE istio_requests_total counter
istio_requests_total{code="200"} 3.0
istio_requests_total{code="503"} 1.0
# HELP istio_request_duration_milliseconds Duration
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{code="200",le="1.0"} 1.0
istio_request_duration_milliseconds_bucket{code="200",le="+Inf"} 3.0
istio_request_duration_milliseconds_count{code="200"} 3.0
istio_request_duration_milliseconds_sum{code="200"} 7.5
# HELP meshproxy_downstream_connections Open downstream connections
# TYPE meshproxy_downstream_connections gauge
meshproxy_downstream_connections{listener="outbound"} 2.0
# HELP meshproxy_config_version Version of the running config
# TYPE meshproxy_config_version gauge
meshproxy_config_version 3.0
# HELP istio_build Istio component build info
# TYPE istio_build gauge
istio_build{component="proxy",tag="meshproxy-0.1.0"} 1.0
"""
WORKER_B = """# HELP istio_requests_total Counter of requests
# TYPE istio_requests_total counter
istio_requests_total{code="200"} 4.0
istio_requests_total{code="404"} 2.0
# HELP istio_request_duration_milliseconds Duration
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{code="200",le="1.0"} 4.0
istio_request_duration_milliseconds_bucket{code="200",le="+Inf"} 4.0
istio_request_duration_milliseconds_count{code="200"} 4.0
istio_request_duration_milliseconds_sum{code="200"} 2.25
# HELP meshproxy_downstream_connections Open downstream connections
# TYPE meshproxy_downstream_connections gauge
meshproxy_downstream_connections{listener="outbound"} 5.0
# HELP meshproxy_config_version Version of the running config
# TYPE meshproxy_config_version gauge
meshproxy_config_version 3.0
# HELP istio_build Istio component build info
# TYPE istio_build gauge
istio_build{component="proxy",tag="meshproxy-0.1.0"} 1.0
"""


def test_merge_of_one_exposition_is_that_exposition() -> None:
    assert render(merge_expositions([WORKER_A])).decode() == WORKER_A


def test_merge_sums_counters_histograms_and_gauges_but_not_per_process_values() -> None:
    merged = samples(render(merge_expositions([WORKER_A, WORKER_B])).decode())

    def code(c: str) -> frozenset[tuple[str, str]]:
        return frozenset({("code", c)})

    assert merged[("istio_requests_total", code("200"))] == 7
    assert merged[("istio_requests_total", code("503"))] == 1  # a label set of one worker only is kept
    assert merged[("istio_requests_total", code("404"))] == 2
    assert merged[("istio_request_duration_milliseconds_bucket", code("200") | {("le", "1.0")})] == 5
    assert merged[("istio_request_duration_milliseconds_bucket", code("200") | {("le", "+Inf")})] == 7
    assert merged[("istio_request_duration_milliseconds_count", code("200"))] == 7
    assert merged[("istio_request_duration_milliseconds_sum", code("200"))] == 9.75
    assert merged[("meshproxy_downstream_connections", frozenset({("listener", "outbound")}))] == 7
    assert merged[("meshproxy_config_version", frozenset())] == 3  # the same in every worker: not summed
    assert merged[("istio_build", frozenset({("component", "proxy"), ("tag", "meshproxy-0.1.0")}))] == 1


# --------------------------------------------------------------------------- processes


def test_requests_spread_over_both_workers_and_the_merged_counters_are_their_exact_sum(
        config: Path, upstream: Upstream) -> None:
    p = start(config)
    try:
        port = p.port
        listening = set(re.findall(r"outbound listening on 127\.0\.0\.1:(\d+)", p.log))
        assert listening == {str(port)}  # port 0 was made one concrete port, shared by both workers
        procs = workers(p)
        assert len(procs) == 2 and all(w["serving"] for w in procs)
        children = {c.pid for c in psutil.Process(p.proc.pid).children()}
        for w in procs:
            assert w["pid"] in children and listens_on(w["pid"], port)

        sent = 120
        replies = get_many(port, sent)
        for i, (status, body, _) in enumerate(replies):
            assert status == 200, body
            assert json.loads(body)["path"] == f"/echo?n={i}"
        assert len(upstream.requests) == sent

        wait_until(lambda: total(metrics(admin_port(p)), "istio_requests_total") == sent, what="all requests counted")
        own = [metrics(w["admin"][1]) for w in workers(p)]
        merged = metrics(admin_port(p))
        per_worker = [total(text, "istio_requests_total") for text in own]
        assert all(n > 0 for n in per_worker), per_worker  # both PIDs served some
        assert sum(per_worker) == sent

        # every counter and histogram sample of the merge is the sum of the workers' samples
        kinds = {s.name: f.type for f in text_string_to_metric_families(merged) for s in f.samples}
        parts = [samples(text) for text in own]
        checked = 0
        for (name, labels), value in samples(merged).items():
            if kinds[name] in ("counter", "histogram") and not name.startswith("meshproxy_worker"):
                assert value == sum(part.get((name, labels), 0.0) for part in parts), name
                checked += 1
        assert checked > 10
        assert total(merged, "istio_request_duration_milliseconds_count") == sent
        assert total(merged, "istio_build") == 1
        assert total(merged, "meshproxy_workers") == 2
    finally:
        assert p.stop() == 0, p.log


def test_ready_only_when_every_worker_is_ready(config: Path) -> None:
    p = ProxyProcess(config, args=["--concurrency", "2"])  # returns once the supervisor's admin listens
    try:
        def check() -> bool:
            if not ready(p):
                return False
            own = [request(w["admin"][1], "GET", "/ready")[0] for w in workers(p)]  # each worker's own admin
            assert own == [200, 200], own
            return True

        wait_until(check, what="/ready 200")
        wait_until(lambda: "outbound" in p.addresses, what="the outbound listener's log line")
        stopped = workers(p)[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)  # one worker that does not answer its own /ready
        try:
            wait_until(lambda: not ready(p), what="/ready 503 with a worker stopped")
        finally:
            os.kill(stopped, signal.SIGCONT)
        wait_until(lambda: ready(p), what="/ready 200 again")
    finally:
        assert p.stop() == 0, p.log


def test_sigterm_drains_in_flight_requests_and_leaves_no_worker(config: Path, upstream: Upstream) -> None:
    p = start(config)
    pids = [w["pid"] for w in workers(p)]
    result: dict[str, Any] = {}

    def slow() -> None:
        result["reply"] = request(p.port, "GET", "/slow?delay=2", "backend", timeout=30)

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_until(lambda: any(r["path"].startswith("/slow") for r in upstream.requests),
                   what="the slow request upstream")
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: admin(p, "/ready")[0] == 503, what="/ready 503 while draining", timeout=10)
        thread.join(30)
        status, body, _ = result["reply"]
        assert (status, body) == (200, b"slow done")
        assert p.proc.wait(30) == 0, p.log
        assert all(gone(pid) for pid in pids)
        assert "stopping 2 workers (SIGTERM)" in p.log
    finally:
        p.stop()
        kill_left(pids)


def test_sigkill_of_the_supervisor_leaves_no_worker(config: Path) -> None:
    p = start(config)
    pids = [w["pid"] for w in workers(p)]
    try:
        p.proc.kill()
        p.proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in pids), what="workers gone after their supervisor", timeout=15)
    finally:
        kill_left(pids)
        p.stop()


def test_a_killed_worker_is_restarted_and_traffic_continues(config: Path) -> None:
    p = start(config)
    try:
        before = workers(p)
        victim = before[1]["pid"]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = workers(p)[1]
            return bool(now["serving"] and now["pid"] != victim)

        wait_until(replaced, what="worker 1 restarted")
        wait_until(lambda: ready(p), what="/ready 200 after the restart")
        after = workers(p)
        assert after[0]["pid"] == before[0]["pid"]
        assert listens_on(after[1]["pid"], p.port)
        assert f"worker 1 (pid {victim}) exited unexpectedly (killed by SIGKILL): restarting it" in p.log
        replies = get_many(p.port, 40)
        assert [r[0] for r in replies] == [200] * 40
        wait_until(lambda: total(metrics(admin_port(p)), "istio_requests_total") == 40, what="requests counted")
        merged = metrics(admin_port(p))
        assert total(merged, "meshproxy_worker_restarts_total") == 1
        assert all(total(metrics(w["admin"][1]), "istio_requests_total") > 0 for w in workers(p))
    finally:
        assert p.stop() == 0, p.log


def test_a_crash_loop_stops_the_sidecar_after_five_restarts(config: Path) -> None:
    p = start(config)
    first = [w["pid"] for w in workers(p)]
    victims = [first[1]]
    try:
        for restarts in range(5):  # each one killed as soon as it exists, started or not
            os.kill(victims[-1], signal.SIGKILL)
            victims.append(wait_until(lambda: (pid := workers(p)[1]["pid"]) not in (None, *victims) and pid,
                                      what=f"restart {restarts + 1} of worker 1"))
        os.kill(victims[-1], signal.SIGKILL)  # the sixth exit in a minute
        assert p.proc.wait(WAIT) == 1, p.log
        assert "5 restarts in the last 60 s: giving up" in p.log
        assert gone(first[0])  # the other worker was stopped too
    finally:
        p.stop()
        kill_left(first + victims)


def test_a_config_change_reaches_every_worker(tmp_path: Path) -> None:
    first, second = Upstream("first"), Upstream("second")
    folder = tmp_path / "config"
    write_config(folder, "backend.yaml", service_entry("backend", [(first.port, {})], port=80), BACKEND_VS)
    p = start(folder)
    try:
        def accepted() -> float:
            return total(metrics(admin_port(p)), "meshproxy_config_reloads_total", result="accepted")

        def served_by() -> set[str]:
            return {headers["x-upstream"] for _, _, headers in get_many(p.port, 30)}

        assert served_by() == {"first"}
        write_config(folder, "backend.yaml", service_entry("backend", [(second.port, {})], port=80), BACKEND_VS)
        wait_until(lambda: accepted() == 2, what="both workers reloaded the edited file")
        assert served_by() == {"second"}
        assert all(json.loads(request(w["admin"][1], "GET", "/config_dump")[1])["version"] == 2 for w in workers(p))

        assert admin(p, "/reload", "POST") == (200, b"OK\n")  # the admin reload goes to every worker
        assert accepted() == 4
        p.proc.send_signal(signal.SIGHUP)  # and so does SIGHUP
        wait_until(lambda: accepted() == 6, what="both workers reloaded on SIGHUP")

        write_config(folder, "backend.yaml", "---\nkind: VirtualService\napiVersion: networking.istio.io/v1\n"
                                             "metadata: {name: bad}\nspec: {hosts: [backend], http: 7}\n")
        wait_until(lambda: total(metrics(admin_port(p)), "meshproxy_config_reloads_total", result="rejected") == 2,
                   what="both workers rejected the bad file")
        assert served_by() == {"second"}  # the running config stays
        status, body = admin(p, "/config_dump")
        assert status == 200 and json.loads(body)["last_rejected"]
    finally:
        assert p.stop() == 0, p.log
        first.close()
        second.close()


def test_a_rejected_config_stops_the_start_with_exit_2(tmp_path: Path) -> None:
    bad = write_config(tmp_path, "bad.yaml", "---\nkind: VirtualService\napiVersion: networking.istio.io/v1\n"
                                             "metadata: {name: bad}\nspec: {hosts: [backend], http: 7}\n")
    run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--concurrency", "2", "--listen", "127.0.0.1:0",
                          "--admin", "127.0.0.1:0", "--config", str(bad)],
                         check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("configuration rejected, not starting") == 1


def test_a_listen_port_taken_by_another_program_is_an_error_before_any_worker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--concurrency", "2",
                              "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}"],
                             check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr
    assert "starting 2 workers" not in run.stderr


def test_concurrency_1_is_one_process(config: Path) -> None:
    p = ProxyProcess(config, args=["--concurrency", "1"])
    try:
        assert psutil.Process(p.proc.pid).children() == []
        assert request(p.port, "GET", "/echo", "backend")[0] == 200
        assert admin(p, "/workers")[0] == 404  # the single process's admin, as before
    finally:
        assert p.stop() == 0, p.log



def test_a_single_proxy_and_the_supervisor_answer_mistakes_alike(config: Path) -> None:
    """One admin router serves both: unknown paths and wrong methods get the same answers."""
    mistakes = [("GET", "/nope"), ("POST", "/ready"), ("GET", "/reload"), ("GET", "/quitquitquit")]
    answers = []
    for args in (("--concurrency", "1"), ("--concurrency", "2")):
        p = ProxyProcess(config, args=list(args))
        try:
            wait_until(lambda: ready(p), what="/ready 200")
            replies = [request(admin_port(p), method, path) for method, path in mistakes]
            answers.append([(status, body, headers.get("allow")) for status, body, headers in replies])
        finally:
            assert p.stop() == 0, p.log
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0]] == [404, 405, 405, 405]

def test_concurrency_0_is_a_worker_per_cpu_and_quitquitquit_stops_them_all(config: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one CPU: --concurrency 0 is a single process")
    p = start(config, args=("--concurrency", "0"))
    pids = [w["pid"] for w in workers(p)]
    try:
        assert len(pids) == cpus
        assert admin(p, "/quitquitquit", "POST")[0] == 200
        assert p.proc.wait(30) == 0, p.log
        assert all(gone(pid) for pid in pids)
    finally:
        p.stop()
        kill_left(pids)
