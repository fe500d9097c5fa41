"""Runs the capture rules in the current network namespace: apply (atomic reconcile) and cleanup.

Each family is changed by one `iptables-restore --noflush` transaction: the Istio chains and jumps already
there (read from `iptables-save`) are deleted and the new ones added in the same commit, so a re-run never
leaves a window without capture, and running it twice gives the same rules as running it once. `iptables` is
whichever backend the system's alternatives name (nft or legacy), as in the pod's image.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .iptables import BUILT_IN_CHAINS, CaptureConfig, Family, Rule, RuleSet, build, render_restore, restore_lines

TOOLS: dict[Family, tuple[str, str]] = {4: ("iptables-save", "iptables-restore"),
                                        6: ("ip6tables-save", "ip6tables-restore")}


class NetfilterError(RuntimeError):
    """iptables could not be read or changed; the message has the command and its error output."""


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise NetfilterError(f"{argv[0]}: not found (install iptables)") from None
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        raise NetfilterError(f"{' '.join(argv)} failed with status {done.returncode}: {detail}")
    return done.stdout


def saved_rules(saved: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """iptables-save output -> (table -> Istio chains declared, table -> its `-A` lines)."""
    chains: dict[str, list[str]] = {}
    rules: dict[str, list[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":ISTIO_"):
            chains.setdefault(table, []).append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.setdefault(table, []).append(line)
    return chains, rules


def _as_appended(rule: Rule) -> str:
    """A planned rule as iptables-save lists it: `-I CHAIN 1 spec` is saved as `-A CHAIN spec`."""
    params = list(rule.params)
    if params[0] == "-I":
        del params[2]
        params[0] = "-A"
    return " ".join(params)


def cleanup_lines(saved: str, planned: Sequence[Rule]) -> dict[str, list[str]]:
    """table -> restore lines removing every Istio chain, every jump to one, and the planned built-in rules.

    Built-in chains keep everything else; the planned rules that live there without jumping to an Istio chain
    (the interface RETURNs of -c/-k) are removed when iptables-save lists them as they were written.
    """
    chains, rules = saved_rules(saved)
    ours = Counter((r.table, _as_appended(r)) for r in planned if r.chain in BUILT_IN_CHAINS)
    lines: dict[str, list[str]] = {}
    for table in sorted(set(chains) | set(rules)):
        deletions = []
        for line in rules.get(table, []):
            if line.split()[1] not in BUILT_IN_CHAINS:
                continue
            jump = line.split(" -j ", 1)[1].split()[0] if " -j " in line else ""
            if jump.startswith("ISTIO_") or ours[(table, line)] > 0:
                ours[(table, line)] -= 1
                deletions.append("-D" + line[2:])
        istio = chains.get(table, [])
        lines[table] = deletions + [f"-F {c}" for c in istio] + [f"-X {c}" for c in istio]
    return {table: found for table, found in lines.items() if found}


def _merge(first: dict[str, list[str]], then: dict[str, list[str]]) -> dict[str, list[str]]:
    merged = {table: list(lines) for table, lines in first.items()}
    for table, lines in then.items():
        merged.setdefault(table, []).extend(lines)
    return merged


def _families(ipv6: bool) -> tuple[Family, ...]:
    return (4, 6) if ipv6 else (4,)


def apply(config: CaptureConfig) -> RuleSet:
    """Replace whatever Istio rules exist by the ones for `config`, one atomic transaction per family."""
    rules = build(config)
    for family in _families(config.ipv6):
        save, restore = TOOLS[family]
        planned = rules.rules(family)
        text = render_restore(_merge(cleanup_lines(_run([save]), planned), restore_lines(planned)))
        _run([restore, "--noflush"], text)
    return rules


def cleanup(config: CaptureConfig) -> list[str]:
    """Remove the Istio chains and jumps of both families (IPv6 when ip6tables exists); idempotent.

    Returns the commands that changed something (empty when nothing was there)."""
    planned = build(dataclasses.replace(config, ipv6=True))
    changed = []
    for family in (4, 6):
        save, restore = TOOLS[family]
        if family == 6 and shutil.which(save) is None:
            continue
        lines = cleanup_lines(_run([save]), planned.rules(family))
        if lines:
            _run([restore, "--noflush"], render_restore(lines))
            changed.append(restore)
    return changed


def istio_chains(family: Family = 4) -> dict[str, list[str]]:
    """table -> the Istio chains present now (for checks and tests)."""
    return saved_rules(_run([TOOLS[family][0]]))[0]


def detect_ipv6(dual_stack: bool, proc: Path = Path("/proc")) -> bool:
    """Istio's choice (config.getLocalIP): IPv6 rules when the pod's address is IPv6.

    istio-iptables takes the first non-loopback, non-link-local address of the pod; in a pod that is its one
    address. Here: IPv6 when a global IPv6 address exists and either no IPv4 one does or `dual_stack` is set.
    """
    has_v6 = False
    try:
        for line in (proc / "net/if_inet6").read_text().splitlines():
            fields = line.split()
            address = ipaddress.IPv6Address(int(fields[0], 16))
            if fields[5] != "lo" and not address.is_loopback and not address.is_link_local:
                has_v6 = True
    except OSError:
        return False
    if not has_v6 or dual_stack:
        return has_v6
    return not _has_global_ipv4(proc)


def _has_global_ipv4(proc: Path) -> bool:
    """A local (`/32 host LOCAL`) IPv4 address outside 127/8 and 169.254/16, from the FIB trie."""
    try:
        lines = (proc / "net/fib_trie").read_text().splitlines()
    except OSError:
        return True  # cannot tell: keep IPv4 only, the common case
    address: ipaddress.IPv4Address | None = None
    for line in lines:
        if "|--" in line:
            address = ipaddress.IPv4Address(line.split("|--")[1].strip())
        elif "+--" in line or not line.startswith(" "):
            address = None
        elif "/32 host LOCAL" in line and address is not None:
            if not address.is_loopback and not address.is_link_local:
                return True
    return False
