"""Network namespaces built by a test (root only): `Lab` makes pods on one bridge, and `inside(ns)` runs code
in a namespace: sockets made there stay there (a socket belongs to the namespace it was created in)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def missing() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    probe = f"mpprobe{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create a network namespace here"
    try:
        nat = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"], capture_output=True)
        if nat.returncode != 0:
            return "iptables' nat table is not available: " + nat.stderr.decode().strip()
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `ns`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def run(*cmd: str, ns: str | None = None) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    done = subprocess.run(full, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {done.stderr.strip()}")
    return done.stdout


class Lab:
    """Pods (namespaces) on one bridge, in a hub namespace: pod i has 10.<net>.0.<i>/24 on its eth0."""

    def __init__(self, pods: list[str], subnet: str = "10.200.0", subnet6: str | None = None) -> None:
        """`subnet6` (e.g. "fd00:200::") also gives pod i the address `subnet6 + i`/64 and ::6 on lo (dual stack,
        as Istio sets up an IPv6 pod)."""
        tag = secrets.token_hex(3)
        self.tag = tag
        self.hub = f"mphub{tag}"
        self.subnet = subnet
        self.ns: dict[str, str] = {}
        self.ip: dict[str, str] = {}
        self.ip6: dict[str, str] = {}
        self.made: list[str] = []
        try:
            self._add(self.hub)
            run("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
            run("ip", "link", "set", "br0", "up", ns=self.hub)
            for index, pod in enumerate(pods, start=1):
                ns = f"mp{pod}{tag}"
                self._add(ns)
                inner, outer = f"mpi{index}{tag}", f"mpo{index}{tag}"
                run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
                run("ip", "link", "set", inner, "netns", ns)
                run("ip", "link", "set", outer, "netns", self.hub)
                run("ip", "link", "set", inner, "name", "eth0", ns=ns)
                address = f"{subnet}.{index}"
                run("ip", "addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
                run("ip", "link", "set", "eth0", "up", ns=ns)
                run("ip", "link", "set", "lo", "up", ns=ns)
                run("ip", "route", "add", "default", "dev", "eth0", ns=ns)  # service VIPs are routed, as in a pod
                if subnet6 is not None:
                    self.ip6[pod] = f"{subnet6}{index}"
                    run("ip", "-6", "addr", "add", f"{subnet6}{index}/64", "dev", "eth0", "nodad", ns=ns)
                    run("ip", "-6", "addr", "add", "::6/128", "dev", "lo", ns=ns)
                    run("ip", "-6", "route", "add", "default", "dev", "eth0", ns=ns)
                run("ip", "link", "set", outer, "master", "br0", ns=self.hub)
                run("ip", "link", "set", outer, "up", ns=self.hub)
                self.ns[pod], self.ip[pod] = ns, address
        except Exception:
            self.close()
            raise

    def _add(self, ns: str) -> None:
        run("ip", "netns", "add", ns)
        self.made.append(ns)

    def iptables(self, pod: str, *rules: str, command: str = "iptables") -> None:
        """`iptables -t nat` (or ip6tables) rules in a pod, each given as one string of arguments."""
        for rule in rules:
            run(command, "-t", "nat", *rule.split(), ns=self.ns[pod])

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()
