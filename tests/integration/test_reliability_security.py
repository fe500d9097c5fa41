"""R14: security defaults. Admin on loopback unless opened; never an open proxy; x-envoy-* control
headers stripped at the mesh edge (inbound listener: Envoy's control headers; gateway: every
x-envoy-*; outbound: the local app is trusted); RE2 with a program-size cap; YAML size limits."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import BACKEND_VS, ProxyProcess, REPO, Upstream, free_port, service_entry, write_config
from meshproxy.istio.load import load
from meshproxy.istio.read import MAX_FILE_BYTES
from meshproxy.istio.values import compile_regex
from meshproxy.istio.problems import ConfigError

VS = BACKEND_VS
CONTROL = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "9", "x-envoy-upstream-rq-timeout-ms": "1",
           "x-envoy-force-trace": "true", "x-envoy-internal": "true", "x-envoy-decorator-operation": "evil"}
INFORMATIONAL = {"x-envoy-peer-metadata-id": "sidecar~10.0.0.1~caller.default~default.svc.cluster.local"}


def received(port: int, headers: dict[str, str], host: str = "backend") -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/echo", headers={"Host": host, **headers})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200, body
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_admin_is_loopback_and_cannot_be_opened_by_accident(tmp_path: Path) -> None:
    p = ProxyProcess()
    try:
        assert p.addresses["admin"][0] == "127.0.0.1"
    finally:
        assert p.stop() == 0
    for workers in ("1", "2"):  # one process, and the supervisor of --concurrency
        run = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--listen", "127.0.0.1:0", "--admin",
                              f"0.0.0.0:{free_port()}", "--concurrency", workers],
                             capture_output=True, text=True, timeout=30, cwd=REPO)
        assert run.returncode == 2, run.stderr
        assert "--admin-allow-remote" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_never_an_open_proxy(tmp_path: Path, upstream: Upstream) -> None:
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80), VS))
    try:
        for request in (
            b"GET http://127.0.0.1:%d/echo HTTP/1.1\r\nHost: backend\r\n\r\n" % upstream.port,  # a host from the request
            b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % upstream.port,
            b"GET /echo HTTP/1.1\r\nHost: evil.example.com\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
                sock.sendall(request)
                assert sock.recv(65536).startswith(b"HTTP/1.1 404")
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (upstream.port, upstream.port))
            assert sock.recv(65536).startswith(b"HTTP/1.1 403")
        # a barrier instead of a sleep: a request the proxy may forward, answered after everything above
        assert received(p.port, {"x-barrier": "1"})["x-barrier"] == "1"
        assert [r["path"] for r in upstream.requests] == ["/echo"]  # only the barrier: nothing else was dialled
        assert len(upstream.connections) == 1
    finally:
        assert p.stop() == 0


def test_outbound_forwards_the_local_apps_envoy_headers(tmp_path: Path, upstream: Upstream) -> None:
    p = ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80), VS))
    try:
        got = received(p.port, {**CONTROL, **INFORMATIONAL})
        assert all(got.get(k) == v for k, v in CONTROL.items())  # the app is trusted (and the next hop strips)
    finally:
        assert p.stop() == 0


def test_inbound_strips_envoy_control_headers(upstream: Upstream) -> None:
    listen = free_port()
    p = ProxyProcess(args=["--listen", "off", "--inbound", f"127.0.0.1:{listen}=127.0.0.1:{upstream.port}"])
    try:
        got = received(listen, {**CONTROL, "x-envoy-attempt-count": "3", "x-app": "kept"}, host="reviews:9080")
        assert not set(CONTROL) & set(got), got
        assert got["x-envoy-attempt-count"] == "1" and got["x-app"] == "kept"  # this hop's own count
    finally:
        assert p.stop() == 0


def test_gateway_strips_every_envoy_header(tmp_path: Path, upstream: Upstream) -> None:
    docs = [service_entry("backend", [(upstream.port, {})], port=80), """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{route: [{destination: {host: backend}}]}]
"""]
    p = ProxyProcess(write_config(tmp_path, "c.yaml", *docs), args=["--gateway", "edge"])
    try:
        got = received(p.port, {**CONTROL, **INFORMATIONAL, "x-envoy-anything": "1", "x-envoyish": "kept"},
                       host="shop.example.com")
        own = {"x-envoy-attempt-count", "x-envoy-peer-metadata", "x-envoy-peer-metadata-id"}  # this proxy's
        assert [k for k in got if k.startswith("x-envoy-") and k not in own] == [], got
        assert got.get("x-envoy-peer-metadata-id") != INFORMATIONAL["x-envoy-peer-metadata-id"]
        assert got["x-envoyish"] == "kept"
    finally:
        assert p.stop() == 0


def test_regexes_are_re2_and_capped(tmp_path: Path) -> None:
    evil = compile_regex("(a+)+$")
    text = "a" * 100_000 + "b"
    started = time.perf_counter()
    assert not evil.fullmatch(text)
    # linear time: about a millisecond; Python's re takes seconds on 30 characters and would never end on 100,001
    assert time.perf_counter() - started < 2.0
    big = write_config(tmp_path, "vs.yaml", VS.replace(
        "http: [{route:", "http: [{match: [{uri: {regex: '.{1000}.{1000}.{1000}.{1000}.{1000}'}}], route:"))
    with pytest.raises(ConfigError) as info:
        load([big])
    assert "program size" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load([write_config(tmp_path, "bad.yaml", VS.replace("prefix", "x").replace(
            "http: [{route:", "http: [{match: [{uri: {regex: '(?=lookahead)'}}], route:"))])
    assert "RE2" in str(info.value)


def test_yaml_size_and_tags_are_refused(tmp_path: Path) -> None:
    huge = write_config(tmp_path, "huge.yaml", VS + "# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load([huge])
    tagged = write_config(tmp_path, "tag.yaml", VS.replace("metadata: {name: backend}",
                                                           "metadata: {name: !!python/object/apply:os.system [id]}"))
    with pytest.raises(ConfigError):
        load([tagged])
