"""Route actions over real sockets: rewrite, redirect, direct response, header operations, mirror, CORS."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest

from harness import ProxyProcess, Upstream, service_entry, virtual_service, write_config


def start(tmp_path: Path, upstream: Upstream, http_yaml: str, *extra: str) -> ProxyProcess:
    vs = virtual_service("backend", http=http_yaml)
    return ProxyProcess(write_config(tmp_path, "c.yaml", service_entry("backend", [(upstream.port, {})], port=80),
                                     *extra, vs))


def request(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
            ) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers={"Host": "backend", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}


@pytest.fixture
def proxies():
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        assert p.stop() == 0, p.log


def test_prefix_rewrite_authority_and_original_path(tmp_path: Path, upstream: Upstream, proxies) -> None:
    p = start(tmp_path, upstream, """  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/, authority: backend.internal}
    route: [{destination: {host: backend}}]""")
    proxies.append(p)
    status, body, _ = request(p.port, "/api/users?id=7")
    assert status == 200
    assert json.loads(body)["path"] == "/v2/users?id=7"
    assert upstream.header_values(-1, "host") == ["backend.internal"]
    assert upstream.header_values(-1, "x-envoy-original-path") == ["/api/users?id=7"]


def test_regex_rewrite(tmp_path: Path, upstream: Upstream, proxies) -> None:
    p = start(tmp_path, upstream, r"""  - match: [{uri: {regex: "/products/[0-9]+/reviews"}}]
    rewrite: {uriRegexRewrite: {match: "^/products/([0-9]+)/reviews", rewrite: "/reviews/\\1"}}
    route: [{destination: {host: backend}}]""")
    proxies.append(p)
    status, body, _ = request(p.port, "/products/42/reviews")
    assert status == 200 and json.loads(body)["path"] == "/reviews/42"


def test_redirect_and_direct_response(tmp_path: Path, upstream: Upstream, proxies) -> None:
    p = start(tmp_path, upstream, """  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: example.com, redirectCode: 308}
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 503, body: {string: "down for maintenance"}}
  - route: [{destination: {host: backend}}]""")
    proxies.append(p)
    status, _, headers = request(p.port, "/old")
    assert status == 308 and headers["location"] == "http://example.com/new"
    status, body, _ = request(p.port, "/health")
    assert (status, body) == (503, b"down for maintenance")
    assert upstream.requests == []


def test_header_operations_in_envoys_order(tmp_path: Path, upstream: Upstream, proxies) -> None:
    p = start(tmp_path, upstream, """  - headers:
      request: {set: {x-set: route}, add: {x-add: one}, remove: [x-secret]}
      response: {set: {x-served-by: mesh}, remove: [x-upstream]}
    route:
    - destination: {host: backend}
      headers: {request: {set: {x-set: destination}}}""")
    proxies.append(p)
    status, _, headers = request(p.port, "/echo", headers={"X-Secret": "s", "X-Add": "zero"})
    assert status == 200
    assert upstream.header_values(-1, "x-secret") == []
    assert upstream.header_values(-1, "x-set") == ["destination"]  # one destination: its `set` wins
    assert upstream.header_values(-1, "x-add") == ["zero", "one"]
    assert headers["x-served-by"] == "mesh" and "x-upstream" not in headers


def test_mirror_gets_a_shadow_copy_and_never_delays_the_request(tmp_path: Path, upstream: Upstream, proxies) -> None:
    shadow = Upstream("shadow")
    try:
        p = start(tmp_path, upstream, """  - route: [{destination: {host: backend}}]
    mirror: {host: shadow}""", service_entry("shadow", [(shadow.port, {})], port=80))
        proxies.append(p)
        status, _, _ = request(p.port, "/echo?n=1")
        assert status == 200
        deadline = time.monotonic() + 5
        while not shadow.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shadow.requests and shadow.requests[0]["path"] == "/echo?n=1"
        assert shadow.header_values(0, "host") == ["backend-shadow"]
    finally:
        shadow.close()


def test_a_mirror_outside_the_mesh_gets_no_peer_metadata(tmp_path: Path, upstream: Upstream) -> None:
    """Judged by the mirror's own cluster, not the primary's: Istio never gives peer metadata to MESH_EXTERNAL."""
    shadow = Upstream("shadow")
    vs = virtual_service("backend", http="  - {route: [{destination: {host: backend}}], mirror: {host: shadow}}")
    p = ProxyProcess(write_config(tmp_path, "c.yaml",
                                  service_entry("backend", [(upstream.port, {})], port=80, location="MESH_INTERNAL"),
                                  service_entry("shadow", [(shadow.port, {})], port=80), vs))  # MESH_EXTERNAL
    try:
        assert request(p.port, "/echo")[0] == 200
        deadline = time.monotonic() + 5
        while not shadow.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(upstream.header_values(-1, "x-envoy-peer-metadata")) == 1  # inside the mesh: sent
        assert shadow.requests and shadow.header_values(0, "x-envoy-peer-metadata") == []
    finally:
        assert p.stop() == 0
        shadow.close()


def test_cors_preflight_answered_and_simple_request_gets_headers(tmp_path: Path, upstream: Upstream, proxies) -> None:
    p = start(tmp_path, upstream, """  - corsPolicy:
      allowOrigins: [{exact: "https://app.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: backend}}]""")
    proxies.append(p)
    status, _, headers = request(p.port, "/echo", "OPTIONS", {"Origin": "https://app.example",
                                                              "Access-Control-Request-Method": "POST"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "GET,POST" and headers["access-control-max-age"] == "86400"
    assert upstream.requests == []  # the proxy answered the preflight
    status, _, headers = request(p.port, "/echo", headers={"Origin": "https://app.example"})
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-credentials"] == "true"
    status, _, headers = request(p.port, "/echo", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_cors_headers_survive_the_destinations_response_header_operations(tmp_path: Path, upstream: Upstream,
                                                                          proxies) -> None:
    p = start(tmp_path, upstream, """  - corsPolicy:
      allowOrigins: [{exact: "https://app.example"}]
    route:
    - destination: {host: backend}
      headers: {response: {set: {x-served-by: backend}}}""")
    proxies.append(p)
    status, _, headers = request(p.port, "/echo", headers={"Origin": "https://app.example"})
    assert status == 200 and headers["x-served-by"] == "backend"
    assert headers["access-control-allow-origin"] == "https://app.example"  # was dropped by the destination's set
