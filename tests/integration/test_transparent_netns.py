"""Transparent interception end to end, in network namespaces the test builds (root): two pods and an outside
host on one bridge, iptables REDIRECT rules as istio-iptables writes them (written here directly), a meshproxy
sidecar in each pod running `--transparent` with group 1337 (the owner exception that keeps its own connections
out of the redirect).

- pod `a` (the client): its app calls a ServiceEntry address with no proxy settings; the sidecar routes HTTP by
  Host (jason to v2) and TCP by port, passes an unknown destination through (ALLOW_ANY) or refuses it
  (REGISTRY_ONLY: 502 BlackHoleCluster, TCP closed);
- pod `b` (the server): its apps listen only on the pod's address; the inbound sidecar reaches them from 127.0.0.6;
- host `c`: outside the registry.
The TCP metrics are checked exactly after a known transfer, on both sides.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO, write_config
from netns import Lab, inside, missing, run
from tcp_servers import TcpServer, echo, exchange, metric, read_all
from waiting import wait_until

SKIP = missing()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"transparent interception test: {SKIP}")

PROXY_GID = 1337
WEB_VIP, DB_VIP, SILENT_VIP = "10.96.0.10", "10.96.0.20", "10.96.0.30"
LISTENING = re.compile(r"(\S+) listening on (\S+):(\d+)")


def config(b: str, web_vip: str = WEB_VIP, db_vip: str = DB_VIP, c: str = "10.200.0.3") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-flagged, namespace: default}}
spec:
  action: DENY
  # on the HTTP ports only: for TCP, istiod drops the header condition and the rule would deny every connection
  rules:
  - to: [{{operation: {{ports: ["8080", "8081"]}}}}]
    when: [{{key: "request.headers[x-deny]", values: ["yes"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.default.svc.cluster.local]
  addresses: ["{web_vip}"]
  location: MESH_INTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: "{b}", ports: {{http: 8080}}, labels: {{version: v1}}}}
  - {{address: "{b}", ports: {{http: 8081}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: web, subset: v2}}}}]
  - route: [{{destination: {{host: web, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db}}
spec:
  hosts: [db.default.svc.cluster.local]
  addresses: ["{db_vip}"]
  location: MESH_INTERNAL
  ports: [{{number: 5432, name: tcp-pg, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: "{b}", ports: {{tcp-pg: 9000}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db}}
spec:
  hosts: [db]
  tcp:
  - match: [{{port: 5432}}]
    route: [{{destination: {{host: db, port: {{number: 5432}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: silent}}
spec:
  hosts: [silent.default.svc.cluster.local]
  addresses: ["{SILENT_VIP}"]
  location: MESH_INTERNAL
  ports: [{{number: 5433, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: "{c}", ports: {{tcp: 9999}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: silent}}
spec:
  host: silent
  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: 500ms}}}}}}
"""


# istio-iptables' rules, reduced to what the test needs (meshproxy iptables writes the full set)
OUTBOUND_RULES = (
    "-N MP_OUTPUT",
    "-A OUTPUT -p tcp -j MP_OUTPUT",
    "-A MP_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",  # the inbound sidecar's connections to its app
    f"-A MP_OUTPUT -m owner --gid-owner {PROXY_GID} -j RETURN",  # the sidecar's own connections
    "-A MP_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A MP_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
)
INBOUND_RULES = (
    "-N MP_INBOUND",
    "-A PREROUTING -p tcp -j MP_INBOUND",
    "-A MP_INBOUND -p tcp --dport 15000 -j RETURN",
    "-A MP_INBOUND -p tcp -j REDIRECT --to-ports 15006",
)


class Sidecar:
    """`meshproxy run --transparent` in a pod's namespace, with group 1337."""

    def __init__(self, ns: str, config: Path, workload: str, *args: str) -> None:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "meshproxy", "run", "--transparent",
               "--config", str(config), "--admin", "127.0.0.1:15000", "--access-log", "json", "--workload", workload,
               "--label", f"app={workload}", "--watch-interval", "0",
               "--min-drain-time", "0", *args]  # stop as soon as nothing is open, not after Istio's 5 s
        self.ns = ns
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     group=PROXY_GID, extra_groups=[], env=os.environ.copy())
        self.lines: list[str] = []
        self.access: list[dict] = []
        self.listening: set[str] = set()
        self.readers = [threading.Thread(target=self._stderr, daemon=True),
                        threading.Thread(target=self._stdout, daemon=True)]
        for reader in self.readers:
            reader.start()
        wait_until(lambda: {"virtualOutbound", "virtualInbound", "admin"} <= self.listening or self.proc.poll() is not None,
                   what=f"the sidecar in {ns}")
        assert self.proc.poll() is None, "".join(self.lines)

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.listening.add(match.group(1))

    def _stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.access.append(json.loads(line))

    def scrape(self) -> str:
        with inside(self.ns):
            conn = http.client.HTTPConnection("127.0.0.1", 15000, timeout=10)
            conn.connect()
        conn.request("GET", "/stats/prometheus")
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        for reader in self.readers:
            reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code


def http_app(version: str) -> object:
    """A tiny HTTP/1.1 app: answers its version and the address its client came from."""
    def handler(conn: socket.socket, server: TcpServer) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            piece = conn.recv(4096)
            if not piece:
                return
            head += piece
        peer = conn.getpeername()[0]
        body = json.dumps({"version": version, "peer": peer,
                           "host": re.search(rb"(?im)^host:\s*(\S+)", head).group(1).decode()}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
    return handler


def tcp_echo_with_peers(conn: socket.socket, server: TcpServer) -> None:
    server.keep(conn.getpeername()[0].encode())
    echo(conn, server)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    made = Lab(["a", "b", "c"])
    try:
        run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP", ns=made.ns["c"])  # SYNs vanish
        made.iptables("a", *OUTBOUND_RULES)
        made.iptables("b", *OUTBOUND_RULES, *INBOUND_RULES)
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    """The apps of pod b (bound only to the pod address), host c's servers, pod b's sidecar, the mesh config."""
    folder = tmp_path_factory.mktemp("mesh")
    path = write_config(folder, "mesh.yaml", config(lab.ip["b"]))
    servers: list[TcpServer] = []
    with inside(lab.ns["b"]):
        servers += [TcpServer(http_app("v1"), host=lab.ip["b"], port=8080),
                    TcpServer(http_app("v2"), host=lab.ip["b"], port=8081),
                    TcpServer(tcp_echo_with_peers, host=lab.ip["b"], port=9000)]
        servers.append(TcpServer(echo, host="127.0.0.1", port=9200))  # bound to localhost only
    with inside(lab.ns["c"]):
        servers += [TcpServer(http_app("outside"), host=lab.ip["c"], port=8000),
                    TcpServer(echo, host=lab.ip["c"], port=9100)]
    b = Sidecar(lab.ns["b"], path, "db-server")
    try:
        yield {"config": path, "b": b, "servers": servers}
    finally:
        assert b.stop() == 0, "".join(b.lines)
        for server in servers:
            server.close()


@pytest.fixture
def client_sidecar(lab: Lab, world):
    made: list[Sidecar] = []

    def start(*args: str) -> Sidecar:
        sidecar = Sidecar(lab.ns["a"], world["config"], "client", *args)
        made.append(sidecar)
        return sidecar

    yield start
    for sidecar in made:
        assert sidecar.stop() == 0, "".join(sidecar.lines)


def get(lab: Lab, address: str, port: int, host: str, headers: dict[str, str] | None = None
        ) -> tuple[int, bytes]:
    """An HTTP GET from pod a's app: it connects to `address` itself, knowing nothing of the proxy."""
    with inside(lab.ns["a"]):
        conn = http.client.HTTPConnection(address, port, timeout=15)
        conn.connect()
    conn.request("GET", "/", headers={"Host": host, **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def tcp(lab: Lab, address: str, port: int, data: bytes) -> bytes:
    with inside(lab.ns["a"]):
        sock = socket.create_connection((address, port), timeout=15)
    with sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_http_to_a_service_address_is_routed_by_host_and_reaches_the_app_from_127_0_0_6(lab: Lab, world,
                                                                                       client_sidecar) -> None:
    a = client_sidecar()
    status, body = get(lab, WEB_VIP, 80, "web")
    assert status == 200 and json.loads(body) == {"version": "v1", "peer": "127.0.0.6", "host": "web"}
    status, body = get(lab, WEB_VIP, 80, "web", {"end-user": "jason"})
    assert status == 200 and json.loads(body)["version"] == "v2"
    outbound = wait_until(lambda: [e for e in a.access if e["listener"] == "virtualOutbound"][:2] if len(a.access) >= 2
                          else None, what="pod a's access log")
    assert [e["upstream_cluster"] for e in outbound] == ["outbound|80|v1|web.default.svc.cluster.local",
                                                         "outbound|80|v2|web.default.svc.cluster.local"]
    assert outbound[0]["downstream_local_address"] == f"{WEB_VIP}:80"
    b = world["b"]
    inbound = wait_until(lambda: [e for e in b.access if e.get("method") == "GET"][-2:] or None,
                         what="pod b's access log")
    assert {e["upstream_cluster"] for e in inbound} == {"inbound|8080||", "inbound|8081||"}
    inbound_text = b.scrape()  # the callee's sidecar reports the same requests as their destination
    assert metric(inbound_text, "istio_requests_total", reporter="destination", destination_service_name="web",
                  destination_workload="db-server", response_code="200") >= 2
    text = a.scrape()
    assert metric(text, "istio_requests_total", reporter="source", destination_service_name="web",
                  response_code="200") == 2


def test_the_inbound_sidecar_enforces_the_workloads_authorization_policy(lab: Lab, world, client_sidecar) -> None:
    """AuthorizationPolicy applies to the traffic a workload receives: on pod b's transparent inbound listener, not
    on pod a's outbound one (the request reaches b's sidecar, which answers Envoy's 403)."""
    client_sidecar()
    status, body = get(lab, WEB_VIP, 80, "web", {"x-deny": "yes"})
    assert (status, body) == (403, b"RBAC: access denied")
    b = world["b"]
    denied = wait_until(lambda: [e for e in b.access if e.get("response_code") == 403] or None,
                        what="pod b's access log of the denied request")
    assert denied[-1]["response_code_details"] == \
        "rbac_access_denied_matched_policy[ns[default]-policy[deny-flagged]-rule[0]]"
    status, _ = get(lab, WEB_VIP, 80, "web", {"x-deny": "no"})
    assert status == 200


def test_tcp_to_a_service_address_routed_by_port_with_exact_metrics(lab: Lab, world, client_sidecar) -> None:
    a = client_sidecar()
    b = world["b"]
    before_b = b.scrape()
    inbound_labels = {"reporter": "destination", "request_protocol": "tcp", "destination_service_name": "db"}
    opened_b = metric(before_b, "istio_tcp_connections_opened_total", **inbound_labels)
    received_b = metric(before_b, "istio_tcp_received_bytes_total", **inbound_labels)
    payload = random.Random(5).randbytes(3 << 20)
    assert hashlib.sha256(tcp(lab, DB_VIP, 5432, payload)).digest() == hashlib.sha256(payload).digest()
    labels = {"reporter": "source", "request_protocol": "tcp", "destination_service_name": "db",
              "destination_service": "db.default.svc.cluster.local", "response_flags": "-"}
    text = wait_until(lambda: (t := a.scrape()) and metric(t, "istio_tcp_connections_closed_total", **labels) and t,
                      what="pod a's TCP connection counted closed")
    assert metric(text, "istio_tcp_connections_opened_total", **labels) == 1
    assert metric(text, "istio_tcp_connections_closed_total", **labels) == 1
    assert metric(text, "istio_tcp_received_bytes_total", **labels) == len(payload)
    assert metric(text, "istio_tcp_sent_bytes_total", **labels) == len(payload)
    # the callee's sidecar saw the same connection inbound, and its app saw it come from 127.0.0.6
    text_b = wait_until(lambda: (t := b.scrape()) and metric(t, "istio_tcp_connections_closed_total",
                                                             **inbound_labels) > opened_b and t,
                        what="pod b's inbound TCP connection counted closed")
    assert metric(text_b, "istio_tcp_connections_opened_total", **inbound_labels) == opened_b + 1
    assert metric(text_b, "istio_tcp_received_bytes_total", **inbound_labels) == received_b + len(payload)
    echo_server = world["servers"][2]
    assert echo_server.received[0] == b"127.0.0.6"
    entry = wait_until(lambda: [e for e in a.access if e["method"] == "-"] or None, what="the TCP access-log line")[0]
    assert entry["route_name"] == "default/db:tcp[0]" and entry["downstream_local_address"] == f"{DB_VIP}:5432"


def test_an_app_bound_to_localhost_only_is_not_exposed(lab: Lab, world, client_sidecar) -> None:
    """Istio >= 1.10: the inbound side connects to the pod's address, where nothing listens on that port."""
    client_sidecar()
    private = world["servers"][3]
    assert tcp(lab, lab.ip["b"], 9200, b"let me in") == b""
    b = world["b"]
    entry = wait_until(lambda: [e for e in b.access if e.get("downstream_local_address") == f"{lab.ip['b']}:9200"]
                       or None, what="pod b's inbound line for port 9200")[0]
    assert entry["upstream_cluster"] == "InboundPassthroughClusterIpv4"  # no service declares port 9200
    assert entry["response_flags"] == "UF" and entry["upstream_host"] == f"{lab.ip['b']}:9200"
    assert private.peers == []


def test_the_destination_rule_connect_timeout_applies_to_tcp(lab: Lab, world, client_sidecar) -> None:
    a = client_sidecar()
    started = time.monotonic()
    assert tcp(lab, SILENT_VIP, 5433, b"anyone?") == b""  # the SYN is dropped: closed after connectTimeout
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 5.0, elapsed  # 500ms, not the 10 s default
    entry = wait_until(lambda: [e for e in a.access if e["upstream_cluster"].endswith("silent.default.svc.cluster.local")]
                       or None, what="the silent service's line")[0]
    assert entry["response_flags"] == "UF" and entry["upstream_host"] == f"{lab.ip['c']}:9999"


def test_unknown_destination_passes_through_with_allow_any(lab: Lab, world, client_sidecar) -> None:
    a = client_sidecar()
    c = lab.ip["c"]
    status, body = get(lab, c, 8000, f"{c}:8000")
    assert status == 200 and json.loads(body)["version"] == "outside"
    assert tcp(lab, c, 9100, b"ping outside") == b"ping outside"
    text = wait_until(lambda: (t := a.scrape()) and metric(t, "istio_tcp_connections_closed_total",
                                                           destination_service_name="PassthroughCluster") and t,
                      what="the passthrough connection counted")
    assert metric(text, "istio_requests_total", destination_service_name="PassthroughCluster",
                  response_code="200") == 1
    assert metric(text, "istio_tcp_received_bytes_total", destination_service_name="PassthroughCluster") == 12


def test_unknown_destination_is_refused_with_registry_only(lab: Lab, world, client_sidecar) -> None:
    a = client_sidecar("--outbound-traffic-policy", "REGISTRY_ONLY")
    c = lab.ip["c"]
    status, body = get(lab, c, 8000, f"{c}:8000")
    assert status == 502 and body == b""
    assert tcp(lab, c, 9100, b"ping outside") == b""
    # registered services still work
    assert get(lab, WEB_VIP, 80, "web")[0] == 200
    text = wait_until(lambda: (t := a.scrape()) and metric(t, "istio_tcp_connections_closed_total",
                                                           destination_service_name="BlackHoleCluster") and t,
                      what="the refused connection counted")
    assert metric(text, "istio_requests_total", destination_service_name="BlackHoleCluster",
                  response_code="502") == 1


OUTBOUND_RULES_V6 = tuple(r.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128") for r in OUTBOUND_RULES)
WEB_VIP6, DB_VIP6 = "fd00:96::10", "fd00:96::20"


def test_ipv6_original_destination_and_inbound_from_colon_colon_6(tmp_path: Path) -> None:
    """IP6T_SO_ORIGINAL_DST: an IPv6 pod's calls to IPv6 service addresses, and the inbound side's ::6."""
    if shutil.which("ip6tables") is None:
        pytest.skip("needs the ip6tables command")
    lab6 = Lab(["a", "b"], subnet="10.201.0", subnet6="fd00:201::")
    servers: list[TcpServer] = []
    sidecars: list[Sidecar] = []
    try:
        lab6.iptables("a", *OUTBOUND_RULES_V6, command="ip6tables")
        lab6.iptables("b", *OUTBOUND_RULES_V6, *INBOUND_RULES, command="ip6tables")
        b6 = lab6.ip6["b"]
        path = write_config(tmp_path, "mesh.yaml", config(b6, WEB_VIP6, DB_VIP6))
        with inside(lab6.ns["b"]):
            servers += [TcpServer(http_app("v1"), host=b6, port=8080), TcpServer(http_app("v2"), host=b6, port=8081),
                        TcpServer(tcp_echo_with_peers, host=b6, port=9000)]
        sidecars.append(Sidecar(lab6.ns["b"], path, "db-server"))
        a = Sidecar(lab6.ns["a"], path, "client")
        sidecars.append(a)
        assert tcp(lab6, DB_VIP6, 5432, b"over IPv6") == b"over IPv6"
        assert servers[2].received[0] == b"::6"
        status, body = get(lab6, WEB_VIP6, 80, "web", {"end-user": "jason"})
        assert status == 200 and json.loads(body)["version"] == "v2" and json.loads(body)["peer"] == "::6"
        entry = wait_until(lambda: [e for e in a.access if e["method"] == "-"] or None, what="the TCP line")[0]
        assert entry["downstream_local_address"] == f"[{DB_VIP6}]:5432"
        assert entry["upstream_cluster"] == "outbound|5432||db.default.svc.cluster.local"
    finally:
        for sidecar in sidecars:
            assert sidecar.stop() == 0, "".join(sidecar.lines)
        for server in servers:
            server.close()
        lab6.close()
