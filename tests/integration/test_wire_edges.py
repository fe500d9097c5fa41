"""Edges of the wire that Envoy and the RFCs settle, over real sockets: the reused-connection retry (and its
switch), a response without Date, an empty Host, and Envoy's flag order and details in the access log."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ProxyProcess, free_port, raw_exchange, service_entry, virtual_service, write_config

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class ResettingServer:
    """Answers the first request of each connection with keep-alive, then resets the connection when a second
    request arrives on it: a server that closed an idle connection just as the proxy reused it."""

    def __init__(self, reply: bytes = OK) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.resets = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        served = 0
        data = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
                while b"\r\n\r\n" in data:
                    _, _, data = data.partition(b"\r\n\r\n")
                    if served:
                        self.resets += 1
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed with RST
                    conn.sendall(self.reply)
                    served += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[ResettingServer]:
    s = ResettingServer()
    yield s
    s.close()


def proxy_for(tmp_path: Path, port: int, *args: str) -> ProxyProcess:
    config = write_config(tmp_path, "mesh.yaml", service_entry("backend", [(port, {})]), virtual_service("backend"))
    return ProxyProcess(config, args=["--default-retry-attempts", "0", *args])


def get(proxy: ProxyProcess, path: str = "/") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.port}{path}", headers={"Host": "backend"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def reused_retries_metric(proxy: ProxyProcess) -> float:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("meshproxy_upstream_reused_connection_retries_total "):
                return float(line.split()[1])
    raise AssertionError("meshproxy_upstream_reused_connection_retries_total is not exported")


def test_a_reset_reused_connection_is_retried_once_and_counted(tmp_path: Path, server: ResettingServer) -> None:
    proxy = proxy_for(tmp_path, server.port)
    try:
        assert get(proxy) == (200, b"ok")
        assert get(proxy) == (200, b"ok")  # the kept-alive connection is reset; the request goes again on a new one
        first, second = proxy.access_entries(2)
        assert server.resets == 1 and server.connections == 2
        assert (first["reused_connection_retries"], second["reused_connection_retries"]) == (0, 1)
        assert second["response_flags"] == "-" and second["upstream_request_attempt_count"] == 1
        assert reused_retries_metric(proxy) == 1
    finally:
        proxy.stop()


def test_no_retry_reused_connection_answers_as_envoy(tmp_path: Path, server: ResettingServer) -> None:
    proxy = proxy_for(tmp_path, server.port, "--no-retry-reused-connection")
    try:
        assert get(proxy) == (200, b"ok")
        status, body = get(proxy)
        assert (status, body) == (503, b"upstream connect error or disconnect/reset before headers. reset reason: "
                                       b"connection termination")
        entry = proxy.access_entries(2)[1]
        assert (entry["response_flags"], entry["response_code_details"], entry["reused_connection_retries"]) == (
            "UC", "upstream_reset_before_response_started{connection_termination}", 0)
        assert reused_retries_metric(proxy) == 0
    finally:
        proxy.stop()


def test_a_response_without_date_gets_one_and_one_with_date_keeps_it(tmp_path: Path) -> None:
    undated = ResettingServer(OK)
    dated = ResettingServer(b"HTTP/1.1 200 OK\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: 2\r\n\r\nok")
    config = write_config(tmp_path, "mesh.yaml", service_entry("undated", [(undated.port, {})]),
                          service_entry("dated", [(dated.port, {})]), virtual_service("undated"),
                          virtual_service("dated"))
    proxy = ProxyProcess(config)
    try:
        for host, expected in ((b"undated", None), (b"dated", b"Tue, 01 Dec 2026 00:00:00 GMT")):
            reply = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nhost: " + host + b"\r\nconnection: close\r\n\r\n")
            head = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
            dates = [line.partition(b": ")[2] for line in head if line.lower().startswith(b"date:")]
            assert len(dates) == 1, reply
            assert dates[0] == expected if expected else dates[0].endswith(b" GMT")
    finally:
        proxy.stop()
        undated.close()
        dated.close()


def test_an_empty_host_is_400_and_closes(tmp_path: Path) -> None:
    config = write_config(tmp_path, "mesh.yaml", service_entry("backend", [(free_port(), {})]),
                          virtual_service("backend"))
    proxy = ProxyProcess(config)
    try:
        reply = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nhost: \r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()
    finally:
        proxy.stop()


def test_connect_failure_flags_in_envoys_order_with_envoys_details(tmp_path: Path) -> None:
    config = write_config(tmp_path, "mesh.yaml", service_entry("backend", [(free_port(), {})]),
                          virtual_service("backend"))
    proxy = ProxyProcess(config)  # Istio's default retry policy: 2 retries on connect-failure
    try:
        assert get(proxy)[0] == 503
        entry = proxy.access_entries(1)[0]
        assert entry["response_flags"] == "UF,URX"
        assert entry["response_code_details"] == (
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}")
        with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5) as response:
            assert 'response_flags="UF,URX"' in response.read().decode()
    finally:
        proxy.stop()
