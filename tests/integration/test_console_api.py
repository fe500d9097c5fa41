"""The console's JSON endpoints on a real proxy's admin port, against known traffic to real upstreams.

Counts are exact; a rate is checked against the console's own interval (`seconds`, the time between the two scrapes
it compares) to 0.1 %, and that interval against the test's own clock around the two calls (it must lie inside).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, ProxyProcess, Upstream, free_port, service_entry, write_config

ROUTING = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: [backend.default.svc.cluster.local]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: backend.default.svc.cluster.local, subset: v2}}]
  - name: broken
    match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: backend.default.svc.cluster.local, subset: v1}}]
  - name: flaky
    match: [{uri: {prefix: /status}}]
    retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: backend.default.svc.cluster.local, subset: v1}}]
  - name: everyone
    route: [{destination: {host: backend.default.svc.cluster.local, subset: v1}}]
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    v1, v2 = Upstream("v1"), Upstream("v2")
    yield v1, v2
    v1.close()
    v2.close()


def start(tmp_path: Path, upstreams: tuple[Upstream, Upstream], *args: str) -> ProxyProcess:
    v1, v2 = upstreams
    folder = tmp_path / "config"
    write_config(folder, "backend.yaml",
                 service_entry("backend", [(v1.port, {"version": "v1"}), (v2.port, {"version": "v2"})],
                               location="MESH_INTERNAL"),
                 ROUTING)
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"  # spans are kept for the console whatever the collector does
    return ProxyProcess(folder, args=["--workload", "web-v1", "--label", "app=web", "--label", "version=v1",
                                      "--tracing-sampling", "100", "--otlp-endpoint", dead, "--seed", "7",
                                      "--console-requests", "200", *args])


def send(proxy: ProxyProcess, path: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "backend:9080", **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def api(proxy: ProxyProcess, endpoint: str, **query: Any) -> Any:
    url = f"{proxy.admin}{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query, doseq=True)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.read())


def test_requests_traces_graph_and_routes_tell_what_happened(tmp_path: Path,
                                                             upstreams: tuple[Upstream, Upstream]) -> None:
    v1, v2 = upstreams
    proxy = start(tmp_path, upstreams)
    try:
        api(proxy, "/console/api/graph")  # the baseline sample
        began = time.time()
        statuses = [send(proxy, "/echo") for _ in range(6)]
        statuses += [send(proxy, "/echo", {"end-user": "jason"}) for _ in range(4)]
        statuses += [send(proxy, "/fault") for _ in range(3)]
        statuses += [send(proxy, "/status/503") for _ in range(2)]
        assert statuses == [200] * 10 + [500] * 3 + [503] * 2

        records = api(proxy, "/console/api/requests")["requests"]
        assert len(records) == 15
        assert [r["status"] for r in records] == list(reversed(statuses))  # newest first
        jason = [r for r in records if r["route"]["name"] == "jason"]
        assert len(jason) == 4
        assert {(r["destination"]["subset"], r["endpoint"]) for r in jason} == {("v2", f"127.0.0.1:{v2.port}")}
        everyone = [r for r in records if r["route"]["name"] == "everyone"]
        assert {(r["destination"]["subset"], r["endpoint"]) for r in everyone} == {("v1", f"127.0.0.1:{v1.port}")}

        aborted = api(proxy, "/console/api/requests", flag="FI")["requests"]
        assert len(aborted) == 3
        for r in aborted:
            assert r["status"] == 500 and r["flags"] == "FI" and r["details"] == "fault_filter_abort"
            assert r["route"]["fault"]["abort_status"] == 500 and r["attempts"] == 0
            assert r["explanation"][0] == ("fault injection aborted the request with 500 "
                                           "(route 'broken' of VirtualService default/backend http[1])")
        retried = api(proxy, "/console/api/requests", status="503")["requests"]
        assert len(retried) == 2
        for r in retried:
            assert r["attempts"] == 3 and r["flags"] == "URX"
            assert r["retry_reasons"] == ["retriable status 503", "retriable status 503"]
            assert "retries exhausted after 3 attempt(s): URX" in r["explanation"]
        assert len(api(proxy, "/console/api/requests", status="5xx")["requests"]) == 5
        assert len(api(proxy, "/console/api/requests", status="error")["requests"]) == 5
        assert len(api(proxy, "/console/api/requests", status="2xx", limit=4)["requests"]) == 4

        graph = api(proxy, "/console/api/graph", window=300)
        ended = time.time()
        [edge] = [e for e in graph["edges"] if e["source"] == "workload:default/web-v1"]
        assert edge["target"] == "service:backend.default.svc.cluster.local"
        assert edge["requests"] == 15 and edge["codes"] == {"200": 10, "500": 3, "503": 2}
        assert edge["flags"] == {"FI": 3, "URX": 2}
        assert edge["errors"] == 5 and edge["error_rate"] == pytest.approx(33.33)
        assert edge["health"] == "failure"  # 5xx above Kiali's 10 %
        seconds = graph["seconds"]
        assert 0 < seconds <= ended - began + 1.0
        assert edge["rate"] == pytest.approx(15 / seconds, rel=1e-3)
        assert edge["p50_ms"] is not None and 0 < edge["p50_ms"] <= edge["p99_ms"]
        nodes = {n["id"]: n for n in graph["nodes"]}
        assert nodes["workload:default/web-v1"]["label"] == "web v1"
        assert nodes["service:backend.default.svc.cluster.local"]["label"] == "backend"

        traces = api(proxy, "/console/api/traces")["traces"]
        assert len(traces) == 15 and all(t["spans"] == 1 for t in traces)
        failed = api(proxy, "/console/api/traces", error="true")["traces"]
        assert len(failed) == 5
        fi_trace = next(r["trace_id"] for r in aborted)
        detail = api(proxy, f"/console/api/traces/{fi_trace}")
        [span] = detail["spans"]
        assert span["flags"] == "FI" and span["error"] and span["fault"]["abort_status"] == 500
        assert span["route"]["name"] == "broken" and span["proxy"] == "web-v1"
    finally:
        assert proxy.stop() == 0, proxy.log


def test_traces_are_searched_by_duration_service_and_operation(tmp_path: Path,
                                                               upstreams: tuple[Upstream, Upstream]) -> None:
    proxy = start(tmp_path, upstreams)
    try:
        assert send(proxy, "/echo") == 200
        assert send(proxy, "/slow?delay=0.3") == 200
        slow = api(proxy, "/console/api/traces", min_ms=250)["traces"]
        assert len(slow) == 1 and slow[0]["duration_ms"] >= 300
        assert len(api(proxy, "/console/api/traces", service="web")["traces"]) == 2
        assert api(proxy, "/console/api/traces", service="nothing-like-it")["traces"] == []
        assert len(api(proxy, "/console/api/traces", operation="backend")["traces"]) == 2
        with pytest.raises(urllib.error.HTTPError) as missing:
            api(proxy, "/console/api/traces/" + "0" * 32)
        assert missing.value.code == 404
        missing.value.close()
        with pytest.raises(urllib.error.HTTPError) as bad:
            api(proxy, "/console/api/traces", min_ms="soon")
        assert bad.value.code == 400
        bad.value.close()
    finally:
        assert proxy.stop() == 0, proxy.log


def test_routes_and_which_route_answer_as_the_cli(tmp_path: Path, upstreams: tuple[Upstream, Upstream]) -> None:
    proxy = start(tmp_path, upstreams)
    try:
        [mine] = api(proxy, "/console/api/routes")["proxies"]
        assert mine["proxy"] == "web-v1" and mine["files"] == [str(tmp_path / "config" / "backend.yaml")]
        [vhost] = [v for v in mine["virtual_hosts"] if v["name"].startswith("backend.default.svc.cluster.local")]
        assert [r["name"] for r in vhost["routes"]] == ["jason", "broken", "flaky", "everyone"]
        assert vhost["routes"][1]["fault"]["abort_percent"] == 100.0

        answer = api(proxy, "/console/api/route", authority="backend:9080", path="/reviews/1",
                     header=["end-user: jason"])
        assert answer["chosen"]["name"] == "jason" and answer["chosen"]["index"] == 0
        cli = subprocess.run([sys.executable, "-m", "meshproxy", "route", "-c", str(tmp_path / "config"),
                              "--label", "app=web", "--label", "version=v1", "-H", "end-user: jason",
                              "http://backend:9080/reviews/1"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == "\n".join([f"request: {answer['request']}", *answer["lines"]]) + "\n"
        nowhere = api(proxy, "/console/api/route", authority="elsewhere:80", path="/")
        assert nowhere["chosen"] is None and nowhere["lines"][-1].endswith("404 NR")
    finally:
        assert proxy.stop() == 0, proxy.log


def test_the_page_is_served_and_the_buffers_can_be_off(tmp_path: Path, upstreams: tuple[Upstream, Upstream]) -> None:
    proxy = start(tmp_path, upstreams, "--console-requests", "0", "--console-spans", "0")
    try:
        with urllib.request.urlopen(proxy.admin + "/console/", timeout=10) as response:
            page = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
        assert 'src="/console/static/console.js"' in page and 'href="/console/static/console.css"' in page
        assert "http://" not in page and "https://" not in page  # nothing from the network
        for name in ("console.js", "console.css"):
            with urllib.request.urlopen(f"{proxy.admin}/console/static/{name}", timeout=10) as response:
                text = response.read().replace(b"http://www.w3.org/2000/svg", b"")  # the SVG namespace: a name
                assert response.status == 200 and b"http://" not in text and b"https://" not in text
        assert send(proxy, "/echo") == 200
        assert api(proxy, "/console/api/requests")["requests"] == []
        assert api(proxy, "/console/api/traces")["traces"] == []
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(urllib.request.Request(proxy.admin + "/console/api/requests", method="POST"),
                                   timeout=10)
        assert wrong.value.code == 405
        wrong.value.close()
    finally:
        assert proxy.stop() == 0, proxy.log
