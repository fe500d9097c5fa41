"""gRPC through the proxy with grpcio on both sides (generic handlers, bytes in and out): unary, streaming both ways,
many calls on one connection, gRPC-shaped local replies, faults, retries, deadlines, and the gRPC metric labels."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed")

from harness import ProxyProcess, write_config  # noqa: E402

SERVICE = "test.Echo"


class EchoServer:
    """A grpcio server: /test.Echo/Unary echoes, /ServerStream sends N copies, /ClientStream joins, /Bidi echoes
    each, /Slow sleeps (recording the deadline it was given), /Flaky fails UNAVAILABLE the first `fail` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: dict[str, int] = {}
        self.peers: set[str] = set()
        self.remaining: list[float | None] = []
        self.fail = fail
        self.lock = threading.Lock()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                                  handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _count(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.peers.add(context.peer())

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Unary", context)
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("ServerStream", context)
        for i in range(int(request)):
            yield b"%d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("ClientStream", context)
        return b"|".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Bidi", context)
        for request in requests:
            yield request.upper()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow", context)
        self.remaining.append(context.time_remaining())
        time.sleep(float(request))
        return b"late"

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Flaky", context)
        if self.calls["Flaky"] <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"ok"

    def close(self) -> None:
        self.server.stop(0).wait(5)


def config(port: int, http: str = " [{route: [{destination: {host: backend}}]}]") -> str:
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
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http:{http}
"""


@pytest.fixture
def server() -> Iterator[EchoServer]:
    s = EchoServer(fail=1)
    yield s
    s.close()


def channel(proxy: ProxyProcess, authority: str = "backend") -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.default_authority", authority),
                                                                      ("grpc.enable_http_proxy", 0)])


def method(chan: grpc.Channel, kind: str, name: str):  # noqa: ANN201
    return getattr(chan, kind)(f"/{SERVICE}/{name}")


def start(tmp_path: Path, server: EchoServer, http: str | None = None) -> ProxyProcess:
    docs = config(server.port) if http is None else config(server.port, http)
    return ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", docs))


def test_unary_and_streaming_calls_and_their_metrics(tmp_path: Path, server: EchoServer) -> None:
    proxy = start(tmp_path, server)
    try:
        with channel(proxy) as chan:
            assert method(chan, "unary_unary", "Unary")(b"hi", timeout=10) == b"echo:hi"
            assert list(method(chan, "unary_stream", "ServerStream")(b"200", timeout=10)) == \
                [b"%d" % i for i in range(200)]
            assert method(chan, "stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10) == b"a|b|c"
            assert list(method(chan, "stream_stream", "Bidi")(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]
        entries = proxy.access_entries(4)
        assert [e["protocol"] for e in entries] == ["HTTP/2"] * 4
        assert [e["response_code"] for e in entries] == [200] * 4
        assert [e["path"] for e in entries][0] == f"/{SERVICE}/Unary"
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=10) as response:
            metrics = response.read().decode()
        ok = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")
              and 'grpc_response_status="0"' in line]
        assert ok and 'request_protocol="grpc"' in ok[0] and ok[0].endswith(" 4.0")
        sent = [line for line in metrics.splitlines() if line.startswith("istio_request_messages_total{")]
        received = [line for line in metrics.splitlines() if line.startswith("istio_response_messages_total{")]
        assert len(sent) == 1 and sent[0].endswith(" 7.0")  # 1 + 1 + 3 + 2 messages from the client
        assert len(received) == 1 and received[0].endswith(" 204.0")  # 1 + 200 + 1 + 2 to it
    finally:
        proxy.stop()


def test_many_concurrent_calls_share_one_connection_each_way(tmp_path: Path, server: EchoServer) -> None:
    proxy = start(tmp_path, server)
    try:
        with channel(proxy) as chan:
            unary = method(chan, "unary_unary", "Unary")
            calls = [unary.future(b"%d" % i, timeout=60) for i in range(300)]
            assert [c.result() for c in calls] == [b"echo:%d" % i for i in range(300)]
        assert server.calls["Unary"] == 300
        assert len(server.peers) == 1  # the proxy multiplexed them over one upstream connection
    finally:
        proxy.stop()


def test_local_replies_are_grpc_statuses(tmp_path: Path, server: EchoServer) -> None:
    faulted = """
  - match: [{uri: {exact: /test.Echo/Unary}, headers: {x-fault: {exact: "yes"}}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: backend}}]
  - match: [{uri: {prefix: /test.Echo/}}]
    route: [{destination: {host: backend}}]
"""
    proxy = start(tmp_path, server, faulted)
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as aborted:
                method(chan, "unary_unary", "Unary")(b"x", metadata=[("x-fault", "yes")], timeout=10)
            assert aborted.value.code() == grpc.StatusCode.UNAVAILABLE
            assert aborted.value.details() == "fault filter abort"
        with channel(proxy, "nowhere") as chan:  # no route: 404 -> UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as missing:
                method(chan, "unary_unary", "Unary")(b"x", timeout=10)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        entries = proxy.access_entries(2)
        assert [(e["response_code"], e["response_flags"]) for e in entries] == [(200, "FI"), (200, "NR")]
        assert server.calls.get("Unary", 0) == 0
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=10) as response:
            metrics = response.read().decode()
        faults = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")
                  and 'response_flags="FI"' in line]
        assert faults and 'grpc_response_status="14"' in faults[0] and 'response_code="200"' in faults[0]
    finally:
        proxy.stop()


def test_route_timeout_is_unavailable_upstream_request_timeout(tmp_path: Path, server: EchoServer) -> None:
    proxy = start(tmp_path, server, " [{timeout: 0.3s, route: [{destination: {host: backend}}]}]")
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as timed_out:
                # No client deadline: no grpc-timeout, so the upstream has none to race the proxy's route timeout.
                method(chan, "unary_unary", "Slow")(b"3")
            assert timed_out.value.code() == grpc.StatusCode.UNAVAILABLE
            assert timed_out.value.details() == "upstream request timeout"
        entry = proxy.access_entries(1)[0]
        assert entry["response_flags"] == "UT" and entry["response_code"] == 200
    finally:
        proxy.stop()


def test_grpc_timeout_shortens_the_route_timeout_and_goes_upstream(tmp_path: Path, server: EchoServer) -> None:
    proxy = start(tmp_path, server, " [{timeout: 20s, route: [{destination: {host: backend}}]}]")
    try:
        with channel(proxy) as chan:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as expired:
                method(chan, "unary_unary", "Slow")(b"3", timeout=0.8)
            assert expired.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        entry = proxy.access_entries(1, timeout=10)[0]
        # the proxy's deadline, the client's reset just before it, or the server's own (it got the deadline)
        assert entry["response_flags"] in ("UT", "DR", "-")
        assert time.monotonic() - started < 2.9  # not the route's 20 s, nor the server's 3 s
        assert server.remaining and server.remaining[0] is not None and server.remaining[0] <= 0.8
    finally:
        proxy.stop()


def test_unavailable_before_any_message_is_retried(tmp_path: Path, server: EchoServer) -> None:
    proxy = start(tmp_path, server, " [{retries: {attempts: 2, retryOn: unavailable}, "
                                    "route: [{destination: {host: backend}}]}]")
    try:
        with channel(proxy) as chan:
            assert method(chan, "unary_unary", "Flaky")(b"", timeout=10) == b"ok"
        assert server.calls["Flaky"] == 2
        assert proxy.access_entries(1)[0]["upstream_request_attempt_count"] == 2
    finally:
        proxy.stop()


def test_routing_by_method_and_metadata_to_two_subsets(tmp_path: Path) -> None:
    v1, v2 = EchoServer(), EchoServer()
    docs = f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: grpc-echo}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc-echo: {v1.port}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{grpc-echo: {v2.port}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend}}
spec:
  host: backend
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http:
  - match: [{{uri: {{exact: /test.Echo/ServerStream}}}}, {{headers: {{x-canary: {{exact: "yes"}}}}}}]
    route: [{{destination: {{host: backend, subset: v2}}}}]
  - route: [{{destination: {{host: backend, subset: v1}}}}]
"""
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", docs))
    try:
        with channel(proxy) as chan:
            unary = method(chan, "unary_unary", "Unary")
            assert unary(b"a", timeout=10) == b"echo:a"
            assert unary(b"b", metadata=[("x-canary", "yes")], timeout=10) == b"echo:b"
            assert list(method(chan, "unary_stream", "ServerStream")(b"2", timeout=10)) == [b"0", b"1"]
        assert v1.calls == {"Unary": 1}
        assert v2.calls == {"Unary": 1, "ServerStream": 1}
    finally:
        proxy.stop()
        v1.close()
        v2.close()


def test_the_inbound_listener_reaches_a_grpc_app_over_http2(tmp_path: Path, server: EchoServer) -> None:
    """The inbound cluster follows the client's protocol (Istio's sniffed inbound port): gRPC in, HTTP/2 to the app."""
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", config(server.port)),
                         args=["--inbound", f"127.0.0.1:0=127.0.0.1:{server.port}"])
    try:
        name = next(n for n in proxy.addresses if n.startswith("inbound"))
        address = proxy.addresses[name]
        with grpc.insecure_channel(f"{address[0]}:{address[1]}", options=[("grpc.enable_http_proxy", 0)]) as chan:
            assert method(chan, "unary_unary", "Unary")(b"in", timeout=10) == b"echo:in"
            assert list(method(chan, "unary_stream", "ServerStream")(b"3", timeout=10)) == [b"0", b"1", b"2"]
    finally:
        proxy.stop()


def test_an_upstream_that_refuses_connections_is_unavailable(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", config(port)))
    try:
        with channel(proxy) as chan:
            with pytest.raises(grpc.RpcError) as failed:
                method(chan, "unary_unary", "Unary")(b"x", timeout=20)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert failed.value.details().startswith("upstream connect error or disconnect/reset before headers.")
        entry = proxy.access_entries(1, timeout=10)[0]
        assert entry["response_flags"] == "UF,URX" and entry["upstream_request_attempt_count"] == 3
    finally:
        proxy.stop()


def test_spans_carry_the_grpc_method_and_status(tmp_path: Path, server: EchoServer) -> None:
    from test_telemetry_mesh import OtlpReceiver, attributes

    receiver = OtlpReceiver()
    proxy = ProxyProcess(write_config(tmp_path / "cfg", "c.yaml", config(server.port)),
                         env={"OTEL_BSP_SCHEDULE_DELAY": "50"},
                         args=["--tracing-sampling", "100", "--otlp-endpoint", f"{receiver.base}/v1/traces"])
    try:
        with channel(proxy) as chan:
            assert method(chan, "unary_unary", "Unary")(b"t", metadata=[("x-request-id", "grpc-span-1")],
                                                         timeout=10) == b"echo:t"
        (_, span), = receiver.wait_for("grpc-span-1", 1)
        tags = attributes(span)
        assert tags["grpc.path"] == f"/{SERVICE}/Unary" and tags["grpc.status_code"] == "0"
        assert tags["grpc.authority"] == "backend" and tags["grpc.content_type"] == "application/grpc"
        assert tags["http.protocol"] == "HTTP/2"
    finally:
        proxy.stop()
        receiver.close()
