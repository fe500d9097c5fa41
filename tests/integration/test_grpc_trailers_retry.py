"""The opt-in retry of a gRPC call whose status comes in trailers (meshproxy.io/retry-grpc-trailers), with a grpc.aio
server that fails after sending its initial metadata (so the status is in trailers, not trailers-only) and a grpcio
client through the proxy: retried with the annotation, not without; a response larger than the bound and a
server-streaming call go through untouched."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed")

from harness import ProxyProcess, write_config  # noqa: E402

SERVICE = "test.Trailers"
BIG = random.Random(18).randbytes(200_000)  # a response message far above any bound used here


class AioServer:
    """A grpc.aio server on its own loop (thread). /Flaky sends initial metadata, then fails UNAVAILABLE the first
    `fail` calls and answers `ok:<request>` after; /BigHead sends 3000 bytes of initial metadata then fails;
    /Big answers BIG; /Stream sends `first`, waits until the test has seen it (`seen`), then `second`, then fails;
    /Coded answers with a message but sets UNAVAILABLE the first `fail` calls (grpcio sends headers, an empty
    message and the status in one write); /Late sends initial metadata and then waits 30 s the first call."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: dict[str, int] = {}
        self.seen = threading.Event()
        self.waited: list[bool] = []  # /Stream: whether the client had `first` before `second` was sent
        self.attempt_counts: list[str | None] = []  # /Flaky: x-envoy-attempt-count of each call
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the grpc.aio server did not start"

    def _count(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    async def flaky(self, request: bytes, context: Any) -> bytes:
        n = self._count("Flaky")
        self.attempt_counts.append(dict(context.invocation_metadata()).get("x-envoy-attempt-count"))
        await context.send_initial_metadata((("x-call", str(n)),))
        if n <= self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not yet ({n})")
        return b"ok:" + request

    async def coded(self, request: bytes, context: Any) -> bytes:
        if self._count("Coded") <= self.fail:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("coded")
        return b"ok:" + request

    async def late(self, request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata(())
        if self._count("Late") == 1:
            await asyncio.sleep(30)  # past the per-try timeout by far: the proxy resets it first
        return b"in time"

    async def big_head(self, request: bytes, context: Any) -> bytes:
        self._count("BigHead")
        await context.send_initial_metadata((("x-big", "b" * 3000),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "too big to hold")

    async def big(self, request: bytes, context: Any) -> bytes:
        self._count("Big")
        return BIG

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self._count("Stream")
        yield b"first"
        self.waited.append(await asyncio.get_running_loop().run_in_executor(None, self.seen.wait, 10))
        yield b"second"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "stream ends badly")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        handlers = {
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            "BigHead": grpc.unary_unary_rpc_method_handler(self.big_head),
            "Big": grpc.unary_unary_rpc_method_handler(self.big),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Coded": grpc.unary_unary_rpc_method_handler(self.coded),
            "Late": grpc.unary_unary_rpc_method_handler(self.late),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def config(port: int, retries: str = "{attempts: 3, retryOn: unavailable}", annotation: str | None = '"1Ki"') -> str:
    annotations = f"\n  annotations: {{meshproxy.io/retry-grpc-trailers: {annotation}}}" if annotation else ""
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: backend{annotations}
spec:
  hosts: [backend]
  http:
  - name: calls
    retries: {retries}
    route: [{{destination: {{host: backend}}}}]
"""


def start(tmp_path: Path, server: AioServer, **kwargs: Any) -> ProxyProcess:
    return ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", config(server.port, **kwargs)),
                        args=["--console-requests", "10"])


def channel(proxy: ProxyProcess) -> Any:
    return grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[
        ("grpc.default_authority", "backend"), ("grpc.enable_http_proxy", 0),
        ("grpc.max_receive_message_length", 1 << 20)])


def call(chan: Any, name: str, request: bytes = b"x", kind: str = "unary_unary") -> Any:
    return getattr(chan, kind)(f"/{SERVICE}/{name}")(request, timeout=20)


def requests_seen(proxy: ProxyProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(proxy.admin + "/console/api/requests", timeout=10) as response:
        return json.loads(response.read())["requests"]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[AioServer]:
    s = AioServer(fail=getattr(request, "param", 2))
    yield s
    s.close()


def test_with_the_annotation_a_status_in_trailers_is_retried(tmp_path: Path, server: AioServer) -> None:
    proxy = start(tmp_path, server)
    try:
        with channel(proxy) as chan:
            response, rpc = chan.unary_unary(f"/{SERVICE}/Flaky").with_call(b"hi", timeout=20)
        assert response == b"ok:hi"
        assert dict(rpc.initial_metadata())["x-call"] == "3"  # only the answer that went downstream was seen
        assert server.calls["Flaky"] == 3  # two failures held and retried, then the answer
        assert server.attempt_counts == ["1", "2", "3"]
        entry = proxy.access_entries(1)[0]
        assert entry["upstream_request_attempt_count"] == 3 and entry["response_flags"] == "-"
        assert entry["response_code"] == 200
        (seen,) = requests_seen(proxy)
        assert seen["retry_reasons"] == ["retriable grpc-status 14 in trailers"] * 2
    finally:
        proxy.stop()


def test_a_small_response_with_a_message_before_its_status_is_retried(tmp_path: Path, server: AioServer) -> None:
    """The message and the status come in one upstream read (one write by the server): judged together."""
    proxy = start(tmp_path, server)
    try:
        with channel(proxy) as chan:
            assert call(chan, "Coded", b"m") == b"ok:m"
        assert server.calls["Coded"] == 3
        assert proxy.access_entries(1)[0]["upstream_request_attempt_count"] == 3
    finally:
        proxy.stop()


def test_a_held_attempt_past_its_per_try_timeout_is_retried(tmp_path: Path, server: AioServer) -> None:
    """Nothing went downstream yet: the per-try timeout is an attempt without a response, retried by policy."""
    proxy = start(tmp_path, server, retries="{attempts: 2, perTryTimeout: 1.5s, retryOn: 'unavailable,gateway-error'}")
    try:
        with channel(proxy) as chan:
            assert call(chan, "Late") == b"in time"
        assert server.calls["Late"] == 2
        entry = proxy.access_entries(1)[0]
        assert entry["upstream_request_attempt_count"] == 2 and entry["response_flags"] == "-"
    finally:
        proxy.stop()


def test_without_the_annotation_the_client_sees_the_status(tmp_path: Path, server: AioServer) -> None:
    proxy = start(tmp_path, server, annotation=None)
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                call(chan, "Flaky")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and failed.value.details() == "not yet (1)"
        assert server.calls["Flaky"] == 1  # Envoy's way: a status after the headers is not retried
        entry = proxy.access_entries(1)[0]
        assert entry["upstream_request_attempt_count"] == 1 and entry["response_flags"] == "-"
    finally:
        proxy.stop()


@pytest.mark.parametrize("server", [5], indirect=True)
def test_retries_exhausted_answer_the_last_status_with_urx(tmp_path: Path, server: AioServer) -> None:
    proxy = start(tmp_path, server, retries="{attempts: 2, retryOn: 'cancelled,unavailable'}")
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                call(chan, "Flaky")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and failed.value.details() == "not yet (3)"
        assert server.calls["Flaky"] == 3
        entry = proxy.access_entries(1)[0]
        assert entry["upstream_request_attempt_count"] == 3 and entry["response_flags"] == "URX"
    finally:
        proxy.stop()


def test_a_status_not_in_retry_on_is_not_retried(tmp_path: Path, server: AioServer) -> None:
    proxy = start(tmp_path, server, retries="{attempts: 3, retryOn: internal}")
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                call(chan, "Flaky")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls["Flaky"] == 1
        assert proxy.access_entries(1)[0]["response_flags"] == "-"
    finally:
        proxy.stop()


def test_a_response_larger_than_the_bound_is_not_retried_and_arrives_intact(tmp_path: Path,
                                                                            server: AioServer) -> None:
    proxy = start(tmp_path, server)  # 1Ki held at most
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                call(chan, "BigHead")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(failed.value.initial_metadata())["x-big"] == "b" * 3000
            assert call(chan, "Big") == BIG
        assert server.calls == {"BigHead": 1, "Big": 1}
        assert [e["upstream_request_attempt_count"] for e in proxy.access_entries(2)] == [1, 1]
    finally:
        proxy.stop()


def test_a_server_streaming_call_is_never_held(tmp_path: Path, server: AioServer) -> None:
    proxy = start(tmp_path, server)
    try:
        with channel(proxy) as chan:
            stream = call(chan, "Stream", kind="unary_stream")
            assert next(stream) == b"first"
            server.seen.set()  # the server sends its second message only now: `first` was not held for it
            assert next(stream) == b"second"
            with pytest.raises(grpc.RpcError) as failed:
                next(stream)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.waited == [True] and server.calls == {"Stream": 1}  # a status after messages: no retry
        assert proxy.access_entries(1)[0]["upstream_request_attempt_count"] == 1
    finally:
        proxy.stop()
