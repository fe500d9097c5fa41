"""Faults, route timeouts and retries over real sockets, with upstreams that count attempts."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from harness import ProxyProcess, Upstream, service_entry, virtual_service, write_config


def vs(http_yaml: str) -> str:
    return virtual_service("backend", http=http_yaml)


def request(port: int, path: str = "/", method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request(method, path, body=body, headers={"Host": "backend", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}


class Scripted:
    """An upstream answering each request with the next status of a script (then the last one forever)."""

    def __init__(self, statuses: list[int], hang_first: float = 0.0) -> None:
        self.statuses = statuses
        self.hang_first = hang_first
        self.attempts: list[str] = []
        self.server = Upstream("scripted", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.attempts.append(request.headers.get("x-envoy-attempt-count", ""))
        n = len(self.attempts)
        if n == 1 and self.hang_first:
            await asyncio.sleep(self.hang_first)
        status = self.statuses[min(n, len(self.statuses)) - 1]
        return web.Response(status=status, text=f"answer {n}")


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator:
    started: list[ProxyProcess] = []

    def start(upstream_ports: list[int], http_yaml: str) -> ProxyProcess:
        docs = [service_entry("backend", [(p, {}) for p in upstream_ports], port=80), vs(http_yaml)]
        proxy = ProxyProcess(write_config(tmp_path / f"cfg{len(started)}", "c.yaml", *docs), args=["--seed", "7"])
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        assert proxy.stop() == 0, proxy.log


def test_abort_fault_replies_without_calling_the_upstream(make_proxy, upstream: Upstream) -> None:
    p = make_proxy([upstream.port], """  - fault: {abort: {httpStatus: 555, percentage: {value: 100}}}
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: backend}}]""")
    status, body, _ = request(p.port)
    assert (status, body) == (555, b"fault filter abort")
    assert upstream.requests == []  # never retried, never forwarded
    assert p.access_entries(1)[0]["response_flags"] == "FI"


def test_abort_percentage_is_honoured_statistically(make_proxy, upstream: Upstream) -> None:
    p = make_proxy([upstream.port], """  - fault: {abort: {httpStatus: 500, percentage: {value: 30}}}
    route: [{destination: {host: backend}}]""")
    aborted = sum(request(p.port, "/echo")[0] == 500 for _ in range(300))
    assert 50 <= aborted <= 130  # 30 % of 300 = 90, seeded


def test_missing_percentage_never_fires(make_proxy, upstream: Upstream) -> None:
    p = make_proxy([upstream.port], """  - fault: {abort: {httpStatus: 500}}
    route: [{destination: {host: backend}}]""")
    assert all(request(p.port, "/echo")[0] == 200 for _ in range(20))


def test_delay_fault_holds_the_request_and_the_route_timeout_starts_after_it(make_proxy, upstream: Upstream) -> None:
    p = make_proxy([upstream.port], """  - fault: {delay: {fixedDelay: 0.6s, percentage: {value: 100}}}
    timeout: 0.3s
    route: [{destination: {host: backend}}]""")
    started = time.monotonic()
    status, _, _ = request(p.port, "/echo")
    assert status == 200  # a 0.6 s delay does not trip a 0.3 s route timeout (Envoy)
    assert time.monotonic() - started >= 0.6
    assert p.access_entries(1)[0]["response_flags"] == "DI"


def test_route_timeout_gives_504_UT(make_proxy) -> None:
    release = threading.Event()

    async def held(request: web.Request) -> web.Response:  # answers only once the test has its reply
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        return web.Response(text="too late")

    upstream = Upstream("held", held)
    try:
        p = make_proxy([upstream.port], """  - timeout: 0.3s
    route: [{destination: {host: backend}}]""")
        status, body, _ = request(p.port, "/")
        # answered at the timeout while the upstream still holds the request (released only below)
        assert (status, body) == (504, b"upstream request timeout")
        assert p.access_entries(1)[0]["response_flags"] == "UT"
    finally:
        release.set()
        upstream.close()


def test_retry_on_5xx_until_success_with_attempt_count(make_proxy) -> None:
    script = Scripted([503, 502, 200])
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: backend}}]""")
        status, body, headers = request(p.port)
        assert (status, body) == (200, b"answer 3")
        assert script.attempts == ["1", "2", "3"]
        assert "x-envoy-upstream-service-time" in headers
    finally:
        script.server.close()


def test_retries_exhausted_forward_the_last_answer_with_URX(make_proxy) -> None:
    script = Scripted([503])
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 2, retryOn: gateway-error}
    route: [{destination: {host: backend}}]""")
        status, body, _ = request(p.port)
        assert (status, body) == (503, b"answer 3")
        assert len(script.attempts) == 3
        assert p.access_entries(1)[0]["response_flags"] == "URX"
    finally:
        script.server.close()


def test_istio_default_policy_does_not_retry_a_503(make_proxy) -> None:
    script = Scripted([503, 200])
    try:
        p = make_proxy([script.server.port], """  - route: [{destination: {host: backend}}]""")
        status, _, _ = request(p.port)
        assert status == 503 and len(script.attempts) == 1
    finally:
        script.server.close()


def test_bare_status_codes_in_retry_on(make_proxy) -> None:
    script = Scripted([409, 418, 200])
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 3, retryOn: "retriable-4xx,418"}
    route: [{destination: {host: backend}}]""")
        assert request(p.port)[0] == 200 and len(script.attempts) == 3
    finally:
        script.server.close()


def test_per_try_timeout_is_retried_under_reset(make_proxy) -> None:
    script = Scripted([200], hang_first=3.0)
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 2, perTryTimeout: 0.3s, retryOn: reset}
    route: [{destination: {host: backend}}]""")
        status, body, _ = request(p.port)
        assert (status, body) == (200, b"answer 2")
    finally:
        script.server.close()


def test_per_try_timeout_without_a_matching_policy_is_504(make_proxy) -> None:
    script = Scripted([200], hang_first=3.0)
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 2, perTryTimeout: 0.3s, retryOn: connect-failure}
    route: [{destination: {host: backend}}]""")
        status, body, _ = request(p.port)
        assert (status, body) == (504, b"upstream request timeout")
        assert len(script.attempts) == 1
    finally:
        script.server.close()


def test_body_larger_than_the_retry_buffer_is_not_retried(make_proxy) -> None:
    script = Scripted([503, 200])
    try:
        p = make_proxy([script.server.port], """  - retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: backend}}]""")
        assert request(p.port, method="POST", body=b"x" * 1000)[0] == 200  # small: replayed
        script.attempts.clear()
        script.statuses = [503, 200]
        status, _, _ = request(p.port, method="POST", body=b"x" * (200 * 1024))
        assert status == 503 and len(script.attempts) == 1
    finally:
        script.server.close()


def test_retry_avoids_the_host_that_failed(make_proxy) -> None:
    bad, good = Scripted([503]), Scripted([200])
    try:
        p = make_proxy([bad.server.port, good.server.port], """  - retries: {attempts: 1, retryOn: 5xx}
    route: [{destination: {host: backend}}]""")
        assert all(request(p.port)[0] == 200 for _ in range(10))
    finally:
        bad.server.close()
        good.server.close()


def test_mesh_wide_default_retry_policy_is_configurable(tmp_path: Path) -> None:
    script = Scripted([503, 200])
    docs = [service_entry("backend", [(script.server.port, {})], port=80), vs("  - route: [{destination: {host: backend}}]")]
    p = ProxyProcess(write_config(tmp_path, "c.yaml", *docs), args=["--default-retry-on", "5xx"])
    try:
        assert request(p.port)[0] == 200 and script.attempts == ["1", "2"]
    finally:
        assert p.stop() == 0
        script.server.close()


class HeaderScript(Scripted):
    """Answers 200 with a given header first, then a plain 200: for retry policies that look at headers."""

    def __init__(self, first_headers: dict[str, str]) -> None:
        self.first_headers = first_headers
        super().__init__([200])

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(request.headers.get("x-envoy-attempt-count", ""))
        headers = self.first_headers if len(self.attempts) == 1 else {}
        return web.Response(status=200, text=f"answer {len(self.attempts)}", headers=headers)


@pytest.mark.parametrize(
    ("retry_on", "first_headers", "request_headers", "retried"),
    [
        ("unavailable", {"grpc-status": "14"}, {}, True),  # gRPC status in response headers
        ("cancelled", {"grpc-status": "14"}, {}, False),  # another gRPC code: not this policy
        ("envoy-ratelimited", {"x-envoy-ratelimited": "true"}, {}, True),
        ("retriable-headers", {"x-retry-me": "1"}, {"x-envoy-retriable-header-names": "x-retry-me"}, True),
        ("retriable-headers", {"x-retry-me": "1"}, {}, False),  # no header names asked for
    ],
)
def test_retry_on_response_headers(make_proxy, retry_on: str, first_headers: dict[str, str],
                                   request_headers: dict[str, str], retried: bool) -> None:
    script = HeaderScript(first_headers)
    try:
        p = make_proxy([script.server.port], f"""  - retries: {{attempts: 2, retryOn: "{retry_on}"}}
    route: [{{destination: {{host: backend}}}}]""")
        status, body, _ = request(p.port, headers=request_headers)
        assert status == 200
        assert body == (b"answer 2" if retried else b"answer 1")
    finally:
        script.server.close()


def test_reset_before_request_retries_connect_failures_but_not_a_reset_after_sending(make_proxy) -> None:
    closing = Scripted([200])

    async def close_connection(request: web.Request) -> web.Response:
        closing.attempts.append(request.headers.get("x-envoy-attempt-count", ""))
        assert request.transport is not None
        request.transport.close()  # the request reached the app: reset-before-request must not replay it
        return web.Response(text="never sent")

    closing.server.close()
    closing.server = Upstream("closing", close_connection)
    try:
        p = make_proxy([closing.server.port], """  - retries: {attempts: 2, retryOn: reset-before-request}
    route: [{destination: {host: backend}}]""")
        status, _, _ = request(p.port, method="POST", body=b"pay once")
        assert status == 503 and closing.attempts == ["1"]
    finally:
        closing.server.close()
