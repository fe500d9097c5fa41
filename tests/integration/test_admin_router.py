"""admin.serve_admin: the one router of every admin port (a single proxy's and the --concurrency supervisor's).

The router owns the address check, the paths and methods, and the writing of replies and errors; a backend only
answers. Here with a stand-in backend over a real loopback socket, then both real backends' paths; and the
reload entry point as the outside sees it: SIGHUP and POST /reload reload and count the same way.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import BACKEND_VS, ProxyProcess, write_config
from meshproxy.admin import AdminError, Handler, ProxyAdmin, Reply, endpoints, serve_admin
from meshproxy.workers import SupervisorAdmin


class StandIn:
    """Each answer names itself, so that a test sees which handler the router called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def _answer(self, name: str) -> Reply:
        self.calls.append(name)
        return Reply.text(f"{name}\n")

    async def ready(self) -> Reply:
        return await self._answer("ready")

    async def config_dump(self) -> Reply:
        return Reply.json({"a": 1}, indent=2)

    async def routes(self) -> Reply:
        return await self._answer("routes")

    async def metrics(self) -> Reply:
        raise AdminError(503, "worker 1: not serving\n")

    async def reload(self) -> Reply:
        return Reply.text("bad.yaml:0: spec: wrong\n", 400)

    async def quit(self) -> Reply:
        return await self._answer("quit")

    async def extra(self) -> Reply:
        return await self._answer("extra")

    async def console(self, head: Any) -> Reply:  # every path under /console, with its query
        return await self._answer(f"console {head.path.decode()}?{head.query.decode()}")

    def extra_endpoints(self) -> Sequence[tuple[str, str, Handler]]:
        return (("GET", "/extra", self.extra),)


def exchange(port: int, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_the_router_maps_paths_and_writes_replies_and_errors() -> None:
    backend = StandIn()

    async def body() -> list[tuple[int, bytes, dict[str, str]]]:
        server = await serve_admin(backend, ("127.0.0.1", 0), allow_remote=False)
        try:
            assert server.address[0] == "127.0.0.1" and server.address[1] > 0
            asks = [("GET", "/ready"), ("HEAD", "/ready"), ("GET", "/config_dump"), ("GET", "/stats/prometheus"),
                    ("POST", "/reload"), ("POST", "/quitquitquit"), ("GET", "/extra"), ("GET", "/nope"),
                    ("POST", "/ready"), ("GET", "/reload"), ("GET", "/console/api/graph?window=5"),
                    ("POST", "/console/api/graph"), ("GET", "/consoles")]
            return [await asyncio.to_thread(exchange, server.address[1], m, p) for m, p in asks]
        finally:
            await server.close()

    (ready, head, dump, metrics, reload, quit_, extra, unknown, post_ready, get_reload, console, post_console,
     not_console) = asyncio.run(body())
    assert ready[:2] == (200, b"ready\n") and ready[2]["content-type"] == "text/plain; charset=utf-8"
    assert head[:2] == (200, b"")
    assert dump[:2] == (200, b'{\n  "a": 1\n}') and dump[2]["content-type"] == "application/json; charset=utf-8"
    assert metrics[:2] == (503, b"worker 1: not serving\n")  # an AdminError answers, it does not trace back
    assert reload[:2] == (400, b"bad.yaml:0: spec: wrong\n")
    assert quit_[:2] == (200, b"quit\n") and extra[:2] == (200, b"extra\n")
    assert unknown[:2] == (404, b"404: Not Found")
    assert post_ready[0] == 405 and post_ready[2]["allow"] == "GET,HEAD"
    assert get_reload[0] == 405 and get_reload[2]["allow"] == "POST"
    assert console[:2] == (200, b"console /console/api/graph?window=5\n")
    assert post_console[0] == 405 and post_console[2]["allow"] == "GET,HEAD"
    assert not_console[:2] == (404, b"404: Not Found")
    assert backend.calls == ["ready", "ready", "quit", "extra", "console /console/api/graph?window=5"]


def test_the_router_refuses_a_non_loopback_address_before_binding() -> None:
    async def body() -> None:
        await serve_admin(StandIn(), ("0.0.0.0", 0), allow_remote=False)

    with pytest.raises(ValueError, match="--admin-allow-remote"):
        asyncio.run(body())


def test_a_proxy_and_the_supervisor_answer_the_same_paths() -> None:
    proxy: Any = SimpleNamespace(telemetry=SimpleNamespace(metrics=None))
    single = [(m, p) for m, p, _ in endpoints(ProxyAdmin(proxy))]
    supervisor = [(m, p) for m, p, _ in endpoints(SupervisorAdmin(SimpleNamespace()))]  # type: ignore[arg-type]
    assert supervisor == single + [("GET", "/workers")]
    assert ("POST", "/reload") in single and ("GET", "/stats/prometheus") in single


def metric(p: ProxyProcess, name: str, result: str) -> float:
    status, body, _ = exchange(p.addresses["admin"][1], "GET", "/stats/prometheus")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f'{name}{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}{{result={result}}}")


def wait_for_log(p: ProxyProcess, text: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while p.log.count(text) < count:
        assert time.monotonic() < deadline, f"no {count}x {text!r} in:\n{p.log}"
        time.sleep(0.05)


def test_sighup_and_admin_reload_go_through_one_entry_point_and_count_the_same(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write_config(folder, "vs.yaml", BACKEND_VS)
    p = ProxyProcess(folder, args=["--watch-interval", "0"])  # no polling: only the two triggers below
    try:
        port = p.addresses["admin"][1]
        p.proc.send_signal(signal.SIGHUP)
        wait_for_log(p, "config version 2 loaded (SIGHUP)", 1)
        assert exchange(port, "POST", "/reload")[:2] == (200, b"OK\n")
        wait_for_log(p, "config version 3 loaded (admin request)", 1)  # the reply can come before the log line
        assert metric(p, "meshproxy_config_reloads_total", "accepted") == 2

        write_config(folder, "vs.yaml", BACKEND_VS.replace("http:", "htp:"))
        p.proc.send_signal(signal.SIGHUP)
        wait_for_log(p, "config rejected (SIGHUP), keeping version 3: ", 1)
        status, body, _ = exchange(port, "POST", "/reload")
        assert status == 400 and b"vs.yaml:0: spec.htp: unknown field 'htp'" in body
        wait_for_log(p, "config rejected (admin request), keeping version 3: ", 1)  # the reply can come first
        assert metric(p, "meshproxy_config_reloads_total", "rejected") == 2
        dump = json.loads(exchange(port, "GET", "/config_dump")[1])
        assert (dump["version"], dump["reloads"]) == (3, {"accepted": 2, "rejected": 2})
        assert "spec.htp: unknown field 'htp'" in dump["last_rejected"]
    finally:
        assert p.stop() == 0
