"""`meshproxy iptables` applied for real, in network namespaces this test makes (root only).

A "pod" namespace and an "outside" one joined by a veth pair. After `meshproxy iptables` in the pod:
- the pod's outbound TCP (any process but UID 1337) lands on port 15001, and SO_ORIGINAL_DST there still
  names the address and port it was sent to;
- UID 1337 (the proxy) reaches the outside directly;
- inbound TCP to the pod lands on 15006 with its original destination, except the excluded ports (15021);
- applying twice leaves the same rules; `--cleanup` removes every Istio chain and jump, twice without error,
  and traffic flows directly again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
POD_IP, OUTSIDE_IP = "10.231.0.1", "10.231.0.2"
POD_IP6, OUTSIDE_IP6 = "fd31::1", "fd31::2"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and iptables"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("ip", "iptables-save", "iptables-restore",
                                                             "ip6tables-save", "ip6tables-restore")),
                       reason="needs ip (iproute2) and iptables (with ip6tables)"),
]

# Listens on the given ports, IPv4 and IPv6; answers each connection with one line: who answered, on which port,
# the connection's SO_ORIGINAL_DST (what the client dialled before any REDIRECT; "none" without a conntrack entry).
LISTENER = r"""
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h) is 80 too
label, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
selector = selectors.DefaultSelector()
for port in ports:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        server = socket.socket(family)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        server.bind((host, port))
        server.listen(16)
        selector.register(server, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in selector.select():
        conn, peer = key.fileobj.accept()
        try:
            if conn.family == socket.AF_INET:
                port, address = struct.unpack("!2xH4s8x", conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
                original = f"{socket.inet_ntoa(address)}:{port}"
            else:
                raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
                port, address = struct.unpack("!2xH4x16s4x", raw)
                original = f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"
        except OSError:
            original = "none"
        conn.sendall(f"{label} port={key.fileobj.getsockname()[1]} original={original}\n".encode())
        conn.close()
"""

# Connects as the given UID (0: stay root) and prints the line the listener sent.
CLIENT = r"""
import encodings.idna, os, socket, sys  # imported as root: UID 1337 may not read the Python install
host, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if uid:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
with socket.create_connection((host, port), timeout=10) as conn:
    print(conn.makefile().readline().strip())
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


class Namespaces:
    def __init__(self) -> None:
        tag = os.getpid()
        self.pod, self.outside = f"mp-pod-{tag}", f"mp-out-{tag}"
        self.listeners: list[subprocess.Popen[str]] = []

    def up(self, ipv4: bool = True) -> None:
        """Two namespaces on a veth pair, with IPv6 addresses (no duplicate detection delay) and, unless told
        otherwise, IPv4 ones."""
        sh("ip", "netns", "add", self.pod)
        sh("ip", "netns", "add", self.outside)
        pod_end, outside_end = f"mpp{os.getpid()}"[:15], f"mpo{os.getpid()}"[:15]
        sh("ip", "link", "add", pod_end, "netns", self.pod, "type", "veth", "peer", "name", outside_end,
           "netns", self.outside)
        for ns, dev, ip, ip6 in ((self.pod, pod_end, POD_IP, POD_IP6),
                                 (self.outside, outside_end, OUTSIDE_IP, OUTSIDE_IP6)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            if ipv4:
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def listen(self, ns: str, label: str, *ports: int) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, label,
                                 *map(str, ports)], stdout=subprocess.PIPE, text=True)
        self.listeners.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening", f"{label} listener did not start"

    def connect(self, ns: str, host: str, port: int, uid: int = 0) -> str:
        return sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port), str(uid)).strip()

    def meshproxy(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        return subprocess.run(["ip", "netns", "exec", self.pod, sys.executable, "-m", "meshproxy", "iptables", *args],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)

    def saved(self, family: int = 4) -> list[str]:
        """The pod's rules and chains, without iptables-save's comments and counters."""
        save = "iptables-save" if family == 4 else "ip6tables-save"
        lines = sh("ip", "netns", "exec", self.pod, save).splitlines()
        return [line.split(" [")[0] if line.startswith(":") else line for line in lines if not line.startswith("#")]

    def down(self) -> None:
        for proc in self.listeners:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in (self.pod, self.outside):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        spaces.up()
        yield spaces
    finally:
        spaces.down()


@pytest.fixture
def ipv6_only() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        spaces.up(ipv4=False)
        yield spaces
    finally:
        spaces.down()


def test_capture_redirects_outbound_and_inbound_keeps_the_original_destination(namespaces: Namespaces) -> None:
    ns = namespaces
    ns.listen(ns.pod, "proxy", 15001, 15006, 15021)
    ns.listen(ns.outside, "outside", 8080, 9080)
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080).startswith("outside port=8080")  # before: direct

    applied = ns.meshproxy("--no-ipv6")
    assert applied.returncode == 0, applied.stderr
    saved = ns.saved()
    for chain in ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"):
        assert f":{chain} -" in saved
    assert "-A OUTPUT -j ISTIO_OUTPUT" in saved
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in saved

    # The app's outbound call lands on the outbound listener, which can still tell where it was going.
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080) == f"proxy port=15001 original={OUTSIDE_IP}:8080"
    # The proxy's own (UID 1337) call goes out as it is.
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080, uid=1337).startswith("outside port=8080")
    # Inbound: to the inbound listener with the pod's address and port; the health port is left alone.
    assert ns.connect(ns.outside, POD_IP, 9080) == f"proxy port=15006 original={POD_IP}:9080"
    assert ns.connect(ns.outside, POD_IP, 15021).startswith("proxy port=15021")

    again = ns.meshproxy("--no-ipv6")  # reconciled in one transaction: the same rules, not twice
    assert again.returncode == 0, again.stderr
    assert ns.saved() == saved

    cleaned = ns.meshproxy("--cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not [line for line in ns.saved() if "ISTIO" in line]
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080).startswith("outside port=8080")
    twice = ns.meshproxy("--cleanup")
    assert twice.returncode == 0, twice.stderr
    assert "no Istio rules found" in twice.stderr


def test_reapplying_with_other_options_replaces_the_rules(namespaces: Namespaces) -> None:
    ns = namespaces
    ns.listen(ns.pod, "proxy", 15001, 15006)
    ns.listen(ns.outside, "outside", 8080, 9080)
    assert ns.meshproxy("--no-ipv6").returncode == 0
    changed = ns.meshproxy("--no-ipv6", "-o", "8080", "-b", "")  # 8080 out direct, nothing captured inbound
    assert changed.returncode == 0, changed.stderr
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080).startswith("outside port=8080")
    assert ns.connect(ns.pod, OUTSIDE_IP, 9080) == f"proxy port=15001 original={OUTSIDE_IP}:9080"
    with pytest.raises(subprocess.CalledProcessError):  # inbound 9080 no longer captured: nothing listens
        ns.connect(ns.outside, POD_IP, 9080)
    assert not [line for line in ns.saved() if "PREROUTING" in line and "ISTIO" in line]


def test_apply_fails_clearly_without_iptables_rights() -> None:
    """Not as root (UID 1337 here): a clear error naming the command, exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", "import os, sys, encodings.idna, meshproxy.sidecar.netfilter; "
                             "from meshproxy.cli import main; os.setgroups([]); os.setgid(1337); os.setuid(1337); "
                             "sys.argv = ['meshproxy', 'iptables', '--no-ipv6']; main()"],
                            capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert result.returncode == 1
    assert "iptables-save" in result.stderr and "failed" in result.stderr


def test_an_ipv6_pod_is_captured_with_ip6tables(ipv6_only: Namespaces) -> None:
    """No --ipv6 given: as istio-iptables, the pod's IPv6 address turns the ip6tables rules on."""
    ns = ipv6_only
    ns.listen(ns.pod, "proxy", 15001, 15006)
    ns.listen(ns.outside, "outside", 8080, 9080)
    applied = ns.meshproxy()
    assert applied.returncode == 0, applied.stderr
    assert "IPv4 and IPv6" in applied.stderr
    saved = ns.saved(6)
    assert ":ISTIO_OUTPUT -" in saved and "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in saved  # as saved
    assert ns.connect(ns.pod, OUTSIDE_IP6, 8080) == f"proxy port=15001 original=[{OUTSIDE_IP6}]:8080"
    assert ns.connect(ns.pod, OUTSIDE_IP6, 8080, uid=1337).startswith("outside port=8080")
    assert ns.connect(ns.outside, POD_IP6, 9080) == f"proxy port=15006 original=[{POD_IP6}]:9080"

    cleaned = ns.meshproxy("--cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not [line for line in ns.saved(4) + ns.saved(6) if "ISTIO" in line]
    assert ns.connect(ns.pod, OUTSIDE_IP6, 8080).startswith("outside port=8080")


def test_the_injected_init_containers_arguments_capture_as_the_annotations_say(namespaces: Namespaces) -> None:
    """What `meshproxy inject` writes into istio-init, run for real: excludeOutboundPorts and
    excludeInboundPorts hold."""
    from meshproxy.sidecar.inject import InjectOptions, inject_text

    manifest = yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "annotations": {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "8080",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9080"}}, "spec": {"containers": [{"name": "web",
                                                                                          "image": "web"}]}})
    pod = yaml.safe_load(inject_text(manifest, "pod.yaml", InjectOptions())[0])
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")
    assert init["command"] == ["meshproxy"] and init["args"][0] == "iptables"

    ns = namespaces
    ns.listen(ns.pod, "proxy", 15001, 15006, 9080)
    ns.listen(ns.outside, "outside", 8080, 8081)
    applied = ns.meshproxy(*init["args"][1:])
    assert applied.returncode == 0, applied.stderr
    assert ns.connect(ns.pod, OUTSIDE_IP, 8080).startswith("outside port=8080")  # excluded outbound port
    assert ns.connect(ns.pod, OUTSIDE_IP, 8081) == f"proxy port=15001 original={OUTSIDE_IP}:8081"
    assert ns.connect(ns.outside, POD_IP, 9080).startswith("proxy port=9080")  # excluded inbound port
    assert ns.connect(ns.outside, POD_IP, 8000) == f"proxy port=15006 original={POD_IP}:8000"


def test_cleanup_removes_the_interface_rules_in_built_in_chains(namespaces: Namespaces) -> None:
    """-k and -c add RETURN rules to PREROUTING/OUTPUT that jump to no Istio chain: cleanup removes them too,
    and leaves a rule of someone else's alone."""
    ns = namespaces
    sh("ip", "netns", "exec", ns.pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j", "RETURN")
    applied = ns.meshproxy("--no-ipv6", "-k", "vm0,vm1", "-c", "mgmt0")
    assert applied.returncode == 0, applied.stderr
    assert sum("vm0" in line or "vm1" in line or "mgmt0" in line for line in ns.saved()) == 6
    cleaned = ns.meshproxy("--cleanup", "-k", "vm0,vm1", "-c", "mgmt0")
    assert cleaned.returncode == 0, cleaned.stderr
    left = [line for line in ns.saved() if line.startswith("-A")]
    assert left == ["-A OUTPUT -o lo -j RETURN"]
