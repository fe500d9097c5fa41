"""No open proxy, in network namespaces the test builds (root): what another pod sends to this pod's app through the
transparent inbound listener (iptables REDIRECT to 15006) loses Envoy's control headers and the peer metadata
headers, as Envoy strips them from requests that are not internal (`ConnectionManagerUtility::cleanInternalHeaders`:
retry, timeout, force-trace... set by an outside client must not steer the proxy), while the app's own headers pass.
The kubelet's readiness probe reaches 15021 from outside the pod (the port istio-iptables leaves out of the redirect).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO, write_config
from netns import Lab, inside, missing
from tcp_servers import TcpServer
from waiting import wait_until

SKIP = missing()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"sidecar edge test: {SKIP}")

LISTENING = re.compile(r"(\S+) listening on (\S+):(\d+)")
INBOUND_RULES = (  # istio-iptables' inbound capture, reduced: everything but the health port goes to 15006
    "-N MP_INBOUND",
    "-A PREROUTING -p tcp -j MP_INBOUND",
    "-A MP_INBOUND -p tcp --dport 15021 -j RETURN",
    "-A MP_INBOUND -p tcp -j REDIRECT --to-ports 15006",
)
CONTROL = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "9", "x-envoy-upstream-rq-timeout-ms": "1",
           "x-envoy-upstream-rq-per-try-timeout-ms": "1", "x-envoy-force-trace": "true",
           "x-envoy-retriable-status-codes": "200"}
PEER = {"x-envoy-peer-metadata": "CgsKBE5BTUUSAxoBeA==",
        "x-envoy-peer-metadata-id": "sidecar~10.0.0.9~spoof.default~default.svc.cluster.local"}


def echo_headers(conn: socket.socket, server: TcpServer) -> None:
    """An HTTP/1.1 app answering the header names it received, as JSON."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = conn.recv(4096)
        if not piece:
            return
        head += piece
    names = [line.split(b":", 1)[0].decode().lower() for line in head.split(b"\r\n")[1:] if b":" in line]
    body = json.dumps(names).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, subprocess.Popen[str], list[str]]]:
    lab = Lab(["a", "b"], subnet="10.201.0")
    lines: list[str] = []
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    server: TcpServer | None = None
    try:
        lab.iptables("b", *INBOUND_RULES)
        with inside(lab.ns["b"]):
            server = TcpServer(echo_headers, host=lab.ip["b"], port=8080)
        config = write_config(tmp_path_factory.mktemp("edge"), "empty.yaml", "")
        # --no-metrics: the peer metadata headers must go even when no metrics read them
        proc = subprocess.Popen(["ip", "netns", "exec", lab.ns["b"], sys.executable, "-m", "meshproxy", "run",
                                 "--transparent", "--config", str(config), "--admin", "127.0.0.1:15000",
                                 "--no-metrics", "--watch-interval", "0", "--drain-time", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        listening: set[str] = set()

        def read() -> None:
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                match = LISTENING.search(line)
                if match:
                    listening.add(match.group(1))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: {"virtualInbound", "health"} <= listening or proc.poll() is not None, what="the sidecar")
        assert proc.poll() is None, "".join(lines)
        yield lab, proc, lines
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if reader is not None:
                reader.join(5)
            if proc.stderr is not None:
                proc.stderr.close()
        if server is not None:
            server.close()
        lab.close()


def request_from_a(lab: Lab, port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    with inside(lab.ns["a"]):
        conn = http.client.HTTPConnection(lab.ip["b"], port, timeout=15)
        conn.connect()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_the_transparent_inbound_listener_strips_envoy_control_and_peer_headers(pods) -> None:
    lab, _, lines = pods
    status, body = request_from_a(lab, 8080, "/", {"Host": "b", **CONTROL, **PEER, "x-app-header": "kept"})
    assert status == 200, "".join(lines)
    received = json.loads(body)
    assert "x-app-header" in received
    assert not set(CONTROL) & set(received), received
    assert not set(PEER) & set(received), received


def test_the_health_port_answers_from_outside_the_pod(pods) -> None:
    lab, _, _ = pods
    status, body = request_from_a(lab, 15021, "/healthz/ready", {})
    assert (status, body) == (200, b"LIVE\n")
    assert request_from_a(lab, 15021, "/quitquitquit", {})[0] == 404
