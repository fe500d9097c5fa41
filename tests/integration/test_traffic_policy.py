"""DestinationRule traffic policy over real sockets: circuit breaking, ejection, balancing, retry budget."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from aiohttp import web

from harness import ProxyProcess, Upstream, service_entry, write_config
from waiting import GENEROUS, wait_until


def config(tmp_path: Path, ports: list[int], traffic_policy: str, http: str = "[{route: [{destination: {host: backend}}]}]"
           ) -> Path:
    return write_config(tmp_path, "c.yaml", service_entry("backend", [(p, {}) for p in ports], port=80), f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend}}
spec:
  host: backend
  trafficPolicy: {traffic_policy}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http: {http}
""")


def get(port: int, path: str = "/echo", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", path, headers={"Host": "backend", **(headers or {})})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}


def test_circuit_breaker_overflows_at_the_exact_limit(tmp_path: Path) -> None:
    release = threading.Event()

    async def held(request: web.Request) -> web.Response:  # answers only once the test says so
        await asyncio.get_running_loop().run_in_executor(None, release.wait, GENEROUS)
        return web.Response(text="held")

    upstream = Upstream("held", held)
    p = ProxyProcess(config(tmp_path, [upstream.port],
                            "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}"))
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(get, p.port)
            wait_until(lambda: upstream.requests, what="the first request at the upstream")  # the one connection
            rest = [pool.submit(get, p.port) for _ in range(2)]  # one waits as pending, one overflows
            # the overflow is answered while the upstream still holds the first: refused, not served late
            done, _ = wait(rest, timeout=GENEROUS, return_when=FIRST_COMPLETED)
            assert done and not release.is_set()
            status, headers = done.pop().result()
            release.set()
            results = [f.result() for f in [first, *rest]]
        assert status == 503 and headers.get("x-envoy-overloaded") == "true"
        assert sorted(r[0] for r in results) == [200, 200, 503]
        assert len(upstream.requests) == 2
        flags = sorted(e["response_flags"] for e in p.access_entries(3))
        assert flags == ["-", "-", "UO"]
    finally:
        release.set()
        assert p.stop() == 0
        upstream.close()


def test_failing_endpoint_is_ejected_then_returns(tmp_path: Path) -> None:
    failing = {"on": True}

    async def flaky(request: web.Request) -> web.Response:
        return web.Response(status=503 if failing["on"] else 200, text="flaky")

    bad, good = Upstream("bad", flaky), Upstream("good")
    p = ProxyProcess(config(tmp_path, [bad.port, good.port],
                            # 3 s ejected: time enough for the 10 requests below on a loaded machine
                            "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, "
                            "interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}}",
                            "[{route: [{destination: {host: backend}}], retries: {attempts: 0}}]"))
    try:
        statuses = [get(p.port)[0] for _ in range(6)]  # round robin: 3 x 503 from the bad one, then ejected
        assert statuses.count(503) == 3
        before = len(bad.requests)
        assert all(get(p.port)[0] == 200 for _ in range(10))  # only the good endpoint while ejected
        assert len(bad.requests) == before
        failing["on"] = False
        # back in rotation once baseEjectionTime is over (at the next interval sweep)
        wait_until(lambda: get(p.port) and len(bad.requests) > before, what="the ejected endpoint back", interval=0.1)
    finally:
        assert p.stop() == 0
        bad.close()
        good.close()


def test_round_robin_and_consistent_hash_over_real_endpoints(tmp_path: Path) -> None:
    ups = [Upstream(f"u{i}") for i in range(3)]
    try:
        p = ProxyProcess(config(tmp_path / "rr", [u.port for u in ups], "{loadBalancer: {simple: ROUND_ROBIN}}"))
        try:
            names = Counter(get(p.port)[1]["x-upstream"] for _ in range(30))
            assert names == {"u0": 10, "u1": 10, "u2": 10}
        finally:
            assert p.stop() == 0
        p = ProxyProcess(config(tmp_path / "hash", [u.port for u in ups],
                                "{loadBalancer: {consistentHash: {httpHeaderName: end-user}}}"))
        try:
            for user in ("jason", "alice", "bob", "carol"):
                seen = {get(p.port, headers={"end-user": user})[1]["x-upstream"] for _ in range(8)}
                assert len(seen) == 1, (user, seen)
        finally:
            assert p.stop() == 0
    finally:
        for u in ups:
            u.close()


def test_retry_budget_keeps_concurrent_retries_within_the_budget(tmp_path: Path) -> None:
    in_flight = {"first": 0, "retries": 0, "max": 0}

    async def failing(request: web.Request) -> web.Response:
        retry = request.headers.get("x-envoy-attempt-count", "1") != "1"
        if retry:
            in_flight["retries"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["retries"])
            await asyncio.sleep(0.15)
            in_flight["retries"] -= 1
        else:  # all 20 first attempts fail together: 20 requests active, all wanting a retry at once
            in_flight["first"] += 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + GENEROUS
            while in_flight["first"] < 20 and loop.time() < deadline:
                await asyncio.sleep(0.01)
        return web.Response(status=503)

    server = Upstream("failing", failing)
    p = ProxyProcess(config(tmp_path, [server.port],
                            "{retryBudget: {percent: 20, minRetryConcurrency: 2}}",
                            "[{route: [{destination: {host: backend}}], retries: {attempts: 3, retryOn: 5xx}}]"))
    try:
        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: get(p.port)[0], range(20)))
        assert statuses == [503] * 20
        assert 1 <= in_flight["max"] <= 4  # max(2, 20 % of 20 active)
        flags = Counter(e["response_flags"] for e in p.access_entries(20))
        assert any("UO" in k for k in flags), flags  # some retries were refused by the budget
    finally:
        assert p.stop() == 0
        server.close()
