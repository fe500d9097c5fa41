"""A sidecar as the kubelet and Prometheus see it: pilot-agent's health (15021) and merged stats (15020) ports, Envoy's
own stats port (15090), and
the drain on SIGTERM (listeners kept open, `connection: close`, exit at zero connections or at the drain time).

The proxies run with `--transparent` (whose listeners, on loopback port 0 here, need no iptables to start) plus an
explicit `--listen` outbound and `--inbound` listener, which the tests' clients use: the drain is the process's."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from harness import ProxyProcess, Upstream, service_entry, virtual_service, write_config
from waiting import wait_until

APP_METRICS = (b"# HELP app_orders_total Orders taken by the app.\n# TYPE app_orders_total counter\n"
               b"app_orders_total{kind=\"book\"} 7.0\n# EOF\n")  # OpenMetrics' trailer: dropped by the merge


def sidecar(tmp_path: Path, upstream: Upstream, app: Any, *args: str, env: dict[str, str] | None = None
            ) -> ProxyProcess:
    config = write_config(tmp_path / "config", "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                          virtual_service("backend"))
    return ProxyProcess(config, args=["--transparent", "--transparent-outbound", "127.0.0.1:0",
                                      "--transparent-inbound", "127.0.0.1:0",
                                      "--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}", "--prometheus-port", "off",
                                      *args], env=env)  # a later --prometheus-port wins (click takes the last)


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("content-type", "")


def wait_for_port(proxy: ProxyProcess, name: str) -> int:
    return wait_until(lambda: proxy.addresses.get(name, (None, 0))[1], what=f"the {name} port in the log")


def test_health_and_merged_stats_ports(tmp_path: Path) -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=APP_METRICS, content_type="text/plain")

    upstream, app = Upstream("backend"), Upstream("app", handler=metrics)
    proxy = sidecar(tmp_path, upstream, app, "--health-port", "0", "--status-port", "0", "--prometheus-port", "0",
                    "--listen", "127.0.0.1:0", env={"ISTIO_PROMETHEUS_ANNOTATIONS": f'{{"scrape":"true","port":"{app.port}","path":"/metrics"}}'})
    try:
        health, status = wait_for_port(proxy, "health"), wait_for_port(proxy, "status")
        assert proxy.addresses["health"][0] == "0.0.0.0" and proxy.addresses["status"][0] == "0.0.0.0"
        assert wait_until(lambda: get(health, "/healthz/ready")[0] == 200, what="ready")
        code, body, content_type = get(status, "/stats/prometheus")
        assert code == 200 and content_type.startswith("text/plain")
        text = body.decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}  # one valid exposition
        assert families["app_orders"].samples[0].value == 7.0  # the app's, merged
        assert "meshproxy_config_version" in families  # the proxy's own
        assert "# EOF" not in text
        assert app.requests[-1]["path"] == "/metrics"
        # Only these paths: the admin's controls stay on the loopback admin port.
        assert get(health, "/stats/prometheus")[0] == 404
        assert get(status, "/quitquitquit", "POST")[0] == 404
        assert get(status, "/config_dump")[0] == 404
        assert get(status, "/healthz/ready")[0] == 200  # pilot-agent's status port answers it too
        # Envoy's 15090: the proxy's metrics alone, nothing else.
        prometheus = wait_for_port(proxy, "prometheus")
        code, body, _ = get(prometheus, "/stats/prometheus")
        own = {f.name for f in text_string_to_metric_families(body.decode())}
        assert code == 200 and "meshproxy_config_version" in own and "app_orders" not in own
        assert get(prometheus, "/healthz/ready")[0] == 404
        # The app gone: the proxy's metrics are still served (pilot-agent logs the failed scrape).
        app.close()
        code, body, _ = get(status, "/stats/prometheus")
        assert code == 200 and b"meshproxy_config_version" in body and b"app_orders_total" not in body
        assert "app metrics" in proxy.log
    finally:
        assert proxy.stop() == 0
        upstream.close()


def test_standalone_run_has_no_health_or_status_port(tmp_path: Path) -> None:
    upstream = Upstream("backend")
    config = write_config(tmp_path / "config", "c.yaml", service_entry("backend", [(upstream.port, {})], port=80))
    proxy = ProxyProcess(config)
    try:
        assert "health" not in proxy.addresses and "status" not in proxy.addresses
        assert "health listening" not in proxy.log
    finally:
        assert proxy.stop() == 0
        upstream.close()


class Caller:
    """HTTP/1.1 requests in a loop, every `pause` s, until `stop_at` (monotonic): on one keep-alive connection at a
    time, reconnecting after `connection: close` (or leaving then: a caller that has seen the endpoint go), or on a
    new connection each (`fresh`). Every request must get 200: anything else is a failure."""

    def __init__(self, port: int, path: str, host: str, pause: float, *, fresh: bool = False,
                 leave_on_close: bool = False) -> None:
        self.port, self.path, self.host, self.pause = port, path, host, pause
        self.fresh, self.leave_on_close = fresh, leave_on_close
        self.stop_at = float("inf")
        self.ok = self.closes = self.ok_after_sigterm = 0
        self.sigterm_at = float("inf")
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < self.stop_at:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                conn.request("GET", self.path, headers={"Host": self.host})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = None
                continue
            if response.status != 200:
                self.failures.append(f"status {response.status}")
            else:
                self.ok += 1
                self.ok_after_sigterm += time.monotonic() > self.sigterm_at
            told = response.getheader("connection", "").lower() == "close"
            self.closes += told
            if told or self.fresh:
                conn.close()
                conn = None
            if told and self.leave_on_close:
                break
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def join(self) -> None:
        self.thread.join(30)


def test_sigterm_drains_as_istio_no_request_fails_and_exit_at_zero_connections(tmp_path: Path) -> None:
    """The app keeps calling out through the proxy while it shuts down (on a kept-alive connection, and on new ones),
    callers hold keep-alive connections to the app: every request gets 200; readiness turns 503 at once; the inbound
    callers are told `connection: close` and go; the outbound listener keeps accepting and its connections are not
    drained (pilot-agent drains inbound listeners only); the proxy exits once the app's last connection is gone,
    before the drain time."""
    upstream, app = Upstream("backend"), Upstream("app")
    drain = 8.0
    proxy = sidecar(tmp_path, upstream, app, "--listen", "127.0.0.1:0", "--health-port", "0", "--status-port", "off",
                    "--drain-time", str(drain), "--min-drain-time", "1")
    try:
        health = wait_for_port(proxy, "health")
        assert wait_until(lambda: get(health, "/healthz/ready")[0] == 200, what="ready")
        inbound = proxy.addresses["inbound:%d" % app.port][1]
        kept = Caller(proxy.port, "/slow?delay=0.02", "backend", pause=0.01)  # the app's own calls, kept alive
        fresh = Caller(proxy.port, "/echo", "backend", pause=0.05, fresh=True)  # and on new connections
        callers = [Caller(inbound, "/echo", "app", pause=0.2, leave_on_close=True) for _ in range(4)]
        everyone = [kept, fresh, *callers]
        wait_until(lambda: all(c.ok >= 2 for c in everyone), what="traffic on every connection")
        sigterm_at = time.monotonic()
        for caller in everyone:
            caller.sigterm_at = sigterm_at
        proxy.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: get(health, "/healthz/ready")[0] == 503, timeout=5, what="readiness 503")
        for caller in (kept, fresh):  # the app shuts down over 2 s, calling out all along, then closes its connections
            caller.stop_at = sigterm_at + 2.0
        for caller in everyone:
            caller.join()
        code = proxy.proc.wait(drain + 10)
        exited_after = time.monotonic() - sigterm_at
    finally:
        proxy.stop()
        upstream.close()
        app.close()
    assert code == 0, proxy.log
    for caller in everyone:
        assert caller.failures == [], caller.failures[:5]
    assert kept.ok_after_sigterm > 10 and kept.closes == 0  # outbound connections are not drained
    assert fresh.ok_after_sigterm > 5  # the outbound listener kept accepting
    assert all(c.closes == 1 and c.ok_after_sigterm >= 1 for c in callers)  # told to close after a response
    assert "drain time over" not in proxy.log  # exited because no connection was left
    assert 1.5 < exited_after < drain, exited_after  # not before the app was done


def test_an_idle_keep_alive_connection_holds_the_drain_until_the_drain_time(tmp_path: Path) -> None:
    """Zero active connections never comes while a client holds an idle connection: the proxy exits at the drain time,
    closing it (Istio's terminationDrainDuration bounds the drain)."""
    upstream, app = Upstream("backend"), Upstream("app")
    drain = 2.0
    proxy = sidecar(tmp_path, upstream, app, "--listen", "127.0.0.1:0", "--health-port", "off",
                    "--status-port", "off", "--drain-time", str(drain), "--min-drain-time", "0")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=15)
        conn.request("GET", "/echo", headers={"Host": "backend"})
        assert conn.getresponse().read()
        sigterm_at = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = proxy.proc.wait(drain + 10)
        exited_after = time.monotonic() - sigterm_at
        conn.close()
    finally:
        proxy.stop()
        upstream.close()
        app.close()
    assert code == 0, proxy.log
    assert drain - 0.5 < exited_after < drain + 5, exited_after
    assert "drain time over: closing 1 connections" in proxy.log


def test_under_concurrency_the_supervisor_serves_the_health_and_stats_ports(tmp_path: Path) -> None:
    """--concurrency 2: one health and one stats port for the sidecar, answered from every worker (ready when all are;
    the workers' metrics merged, then the app's)."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=APP_METRICS, content_type="text/plain")

    upstream, app = Upstream("backend"), Upstream("app", handler=metrics)
    proxy = sidecar(tmp_path, upstream, app, "--concurrency", "2", "--health-port", "0", "--status-port", "0",
                    "--listen", "127.0.0.1:0",
                    env={"ISTIO_PROMETHEUS_ANNOTATIONS": f'{{"scrape":"true","port":"{app.port}"}}'})
    try:
        health, status = wait_for_port(proxy, "health"), wait_for_port(proxy, "status")
        assert wait_until(lambda: get(health, "/healthz/ready")[0] == 200, what="every worker ready")
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/echo", headers={"Host": "backend"})
            assert conn.getresponse().status == 200
            conn.close()
        code, body, _ = get(status, "/stats/prometheus")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["meshproxy_workers"].samples[0].value == 2
        requests = sum(s.value for s in families["istio_requests"].samples if s.name == "istio_requests_total")
        assert requests == 4  # both workers' counts, summed
        assert families["app_orders"].samples[0].value == 7.0
        proxy.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: proxy.proc.poll() is not None or get(health, "/healthz/ready")[0] == 503,
                          timeout=5, what="readiness 503 while the workers drain")
    finally:
        assert proxy.stop() == 0, proxy.log
        upstream.close()
        app.close()


def test_http2_inbound_gets_goaway_and_the_apps_outbound_http2_goes_on(tmp_path: Path) -> None:
    """On SIGTERM the inbound listener's HTTP/2 connection gets GOAWAY (its stream in flight finishes), while the app's
    own HTTP/2 connection on the outbound listener gets none and opens new streams during the drain."""
    from h2peer import H2Peer
    from h2upstream import H2Upstream

    upstream, app = Upstream("backend"), H2Upstream("app")  # the inbound cluster speaks the client's protocol
    proxy = sidecar(tmp_path, upstream, app, "--listen", "127.0.0.1:0", "--health-port", "off",
                    "--status-port", "off", "--drain-time", "8", "--min-drain-time", "0")
    inbound_peer = H2Peer(proxy.addresses["inbound:%d" % app.port][1])
    outbound_peer = H2Peer(proxy.port)
    try:
        inflight = inbound_peer.request("/slow?delay=1", authority="app")
        wait_until(lambda: any(r["path"].startswith("/slow") for r in app.requests), what="the inbound request")
        assert outbound_peer.finished(outbound_peer.request("/echo")).status == 200
        proxy.proc.send_signal(signal.SIGTERM)
        inbound_peer.wait(lambda: inbound_peer.goaway is not None)
        assert inbound_peer.goaway.last_stream_id == inflight
        got = inbound_peer.finished(inflight)
        assert got.status == 200 and json.loads(bytes(got.body))["path"] == "/slow"  # finished, not cut
        for _ in range(3):  # the app's calls during the drain, on its kept HTTP/2 connection
            assert outbound_peer.finished(outbound_peer.request("/echo")).status == 200
        assert outbound_peer.goaway is None
        assert proxy.proc.poll() is None  # its connection keeps the sidecar up
    finally:
        inbound_peer.close()
        outbound_peer.close()
    try:
        assert proxy.proc.wait(8 + 5) == 0  # the app's connection gone: no connection left, exit
        assert "drain time over" not in proxy.log
    finally:
        proxy.stop()
        upstream.close()
        app.close()
