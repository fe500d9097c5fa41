"""The traffic-capture rules Istio's `istio-iptables` writes (REDIRECT mode), as iptables-restore input.

Rule for rule and in the same order as istio/istio `tools/istio-iptables/pkg/capture/run.go` (`Run`) and its
builder (`builder/iptables_builder_impl.go`, `buildRestore`), so that `meshproxy iptables --dry-run` prints what
`istio-iptables --dry-run` prints for the same options (tests/corpus/iptables/ holds Istio's own golden files).
Pure: no I/O here; `netfilter.py` runs the result.

Not carried over: TPROXY interception (meshproxy's inbound listener is not transparent-bind) and DNS capture
(no DNS proxy on 15053); asking for either is an error, never silently ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Family = Literal[4, 6]

# Istio's chains (constants.go).
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_DROP = "ISTIO_DROP"
# constants.BuiltInChainsAndTargetsMap: never created with -N.
BUILT_IN = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"})
BUILT_IN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})

# The ports istio-init never captures inbound (the injector's `-d`): Envoy's Prometheus port, the health port
# and the agent's status port (merged Prometheus stats). 15008 (HBONE tunnel) is returned by its own rule.
DEFAULT_INBOUND_PORTS_EXCLUDE = ("15090", "15021", "15020")
PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}  # the inbound listener's source address to the app
IPV6_LOOPBACK = "::1/128"


class CaptureConfigError(ValueError):
    """An option istio-iptables would reject (or meshproxy cannot honour); the message names the option."""


@dataclass(frozen=True, slots=True)
class Cidrs:
    """One family's share of an IP range list (config.NetworkRange): `*`, or CIDRs as written."""

    wildcard: bool = False
    cidrs: tuple[str, ...] = ()
    has_loopback: bool = False


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """istio-iptables' options (tools/common/config.Config), by the same meaning; lists are already split.

    The defaults are what Istio's injector passes to istio-init (`-i '*' -b '*' -d 15090,15021,15020`), not
    istio-iptables' own empty defaults (which capture nothing inbound or outbound).
    """

    proxy_port: str = "15001"
    inbound_capture_port: str = "15006"
    inbound_tunnel_port: str = "15008"
    proxy_uids: tuple[str, ...] = ("1337",)
    proxy_gids: tuple[str, ...] = ("1337",)
    inbound_ports_include: str = "*"  # "*", "" (no inbound capture) or a comma list
    inbound_ports_exclude: tuple[str, ...] = DEFAULT_INBOUND_PORTS_EXCLUDE
    outbound_ports_include: tuple[str, ...] = ()
    outbound_ports_exclude: tuple[str, ...] = ()
    outbound_ip_ranges_include: str = "*"
    outbound_ip_ranges_exclude: str = ""
    reroute_virtual_interfaces: tuple[str, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    owner_groups_include: str = "*"
    owner_groups_exclude: tuple[str, ...] = ()
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"
    drop_invalid: bool = False
    ipv6: bool = False


def split(value: str) -> tuple[str, ...]:
    """config.Split: comma list, empty items dropped (so "6000,7000," is two ports)."""
    return tuple(item for item in value.split(",") if item)


def check_ports(option: str, ports: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(ports)
    for port in checked:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise CaptureConfigError(f"{option}: {port!r} is not a port number (1-65535)")
    return checked


def separate_v4_v6(option: str, value: str) -> tuple[Cidrs, Cidrs]:
    """config.SeparateV4V6: split a CIDR list by family; `*` is a wildcard for both."""
    if value == "*":
        return Cidrs(wildcard=True), Cidrs(wildcard=True)
    found: dict[int, list[str]] = {4: [], 6: []}
    loopback = {4: False, 6: False}
    for item in split(value):
        try:
            prefix = ipaddress.ip_interface(item if "/" in item else "?")
        except ValueError:
            raise CaptureConfigError(f"{option}: {item!r} is not an IP range in CIDR form (e.g. 10.0.0.0/8)") from None
        # Go's netip.Prefix.String() keeps the address as written (no masking): so does ip_interface.
        found[prefix.version].append(f"{prefix.ip}/{prefix.network.prefixlen}")
        loopback[prefix.version] |= prefix.ip.is_loopback
    return (Cidrs(cidrs=tuple(found[4]), has_loopback=loopback[4]),
            Cidrs(cidrs=tuple(found[6]), has_loopback=loopback[6]))


def check_loopback_cidr(value: str) -> str:
    """config.ValidateIPv4LoopbackCidr."""
    try:
        prefix = ipaddress.ip_interface(value if "/" in value else "?")
    except ValueError:
        raise CaptureConfigError(f"--host-ipv4-loopback-cidr: failed to parse CIDR {value!r}") from None
    if prefix.version != 4 or not prefix.ip.is_loopback:
        raise CaptureConfigError(f"--host-ipv4-loopback-cidr: expected an IPv4 loopback address in CIDR {value}")
    if not 8 <= prefix.network.prefixlen <= 32:
        raise CaptureConfigError(f"--host-ipv4-loopback-cidr: expected CIDR {value} to have a mask in [8, 32]")
    return value


def check(config: CaptureConfig) -> CaptureConfig:
    """Everything Istio validates (and what meshproxy cannot do), before any rule is built."""
    for option, port in (("--envoy-port", config.proxy_port), ("--inbound-capture-port", config.inbound_capture_port),
                         ("--inbound-tunnel-port", config.inbound_tunnel_port)):
        check_ports(option, (port,))
    if config.inbound_ports_include != "*":
        check_ports("--inbound-ports", split(config.inbound_ports_include))
    check_ports("--inbound-ports-exclude", config.inbound_ports_exclude)
    check_ports("--outbound-ports", config.outbound_ports_include)
    check_ports("--outbound-ports-exclude", config.outbound_ports_exclude)
    separate_v4_v6("--outbound-ip-ranges", config.outbound_ip_ranges_include)
    v4_exclude, _ = separate_v4_v6("--outbound-ip-ranges-exclude", config.outbound_ip_ranges_exclude)
    if v4_exclude.wildcard:
        raise CaptureConfigError("--outbound-ip-ranges-exclude: '*' is not allowed (it would exclude everything)")
    check_loopback_cidr(config.host_ipv4_loopback_cidr)
    if not config.proxy_uids and not config.proxy_gids:
        raise CaptureConfigError("--proxy-uid: the proxy's own traffic must be exempt (give a UID or GID)")
    if config.owner_groups_include != "*" and len(split(config.owner_groups_include)) > 64:
        raise CaptureConfigError("--outbound-owner-groups: at most 64 groups")
    return config


@dataclass(frozen=True, slots=True)
class Rule:
    table: str
    chain: str
    params: tuple[str, ...]  # as iptables-restore reads them: "-A CHAIN ..." or "-I CHAIN N ..."

    def jump_target(self) -> str | None:
        return self.params[-1] if len(self.params) >= 2 and self.params[-2] == "-j" else None


@dataclass(slots=True)
class RuleSet:
    """The builder (IptablesRuleBuilder): rules per family in the order they were added."""

    ipv6: bool
    v4: list[Rule] = field(default_factory=list)
    v6: list[Rule] = field(default_factory=list)

    def append(self, chain: str, table: str, *params: str, family: Family | None = None) -> None:
        rule = Rule(table, chain, ("-A", chain, *params))
        if family in (None, 4):
            self.v4.append(rule)
        if family in (None, 6) and self.ipv6:
            self.v6.append(rule)

    def insert(self, chain: str, table: str, position: int, *params: str, family: Family | None = None) -> None:
        rule = Rule(table, chain, ("-I", chain, str(position), *params))
        if family in (None, 4):
            self.v4.append(rule)
        if family in (None, 6) and self.ipv6:
            self.v6.append(rule)

    def append_versioned(self, ipv4: str, ipv6: str, chain: str, table: str, *params: str) -> None:
        """AppendVersionedRule: `{ip}` in params becomes the family's address."""
        self.append(chain, table, *(ipv4 if p == "{ip}" else p for p in params), family=4)
        self.append(chain, table, *(ipv6 if p == "{ip}" else p for p in params), family=6)

    def rules(self, family: Family) -> list[Rule]:
        return self.v4 if family == 4 else self.v6


def build(config: CaptureConfig) -> RuleSet:
    """capture.IptablesConfigurator.Run, REDIRECT mode, no DNS capture: the same rules in the same order."""
    check(config)
    rules = RuleSet(ipv6=config.ipv6)
    loopback4 = config.host_ipv4_loopback_cidr
    v4_exclude, v6_exclude = separate_v4_v6("--outbound-ip-ranges-exclude", config.outbound_ip_ranges_exclude)
    v4_include, v6_include = separate_v4_v6("--outbound-ip-ranges", config.outbound_ip_ranges_include)

    for nic in config.exclude_interfaces:  # shortCircuitExcludeInterfaces
        rules.append("PREROUTING", "nat", "-i", nic, "-j", "RETURN")
        rules.append("OUTPUT", "nat", "-o", nic, "-j", "RETURN")
    for nic in config.reroute_virtual_interfaces:  # shortCircuitKubeInternalInterface
        rules.insert("PREROUTING", "nat", 1, "-i", nic, "-j", "RETURN")
    if config.drop_invalid:
        rules.append("PREROUTING", "mangle", "-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP)
        rules.append(ISTIO_DROP, "mangle", "-j", "DROP")

    rules.append(ISTIO_INBOUND, "nat", "-p", "tcp", "--dport", config.inbound_tunnel_port, "-j", "RETURN")
    rules.append(ISTIO_REDIRECT, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", config.proxy_port)
    rules.append(ISTIO_IN_REDIRECT, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", config.inbound_capture_port)

    if config.inbound_ports_include:  # handleInboundPortsInclude
        rules.append("PREROUTING", "nat", "-p", "tcp", "-j", ISTIO_INBOUND)
        if config.inbound_ports_include == "*":
            for port in config.inbound_ports_exclude:
                rules.append(ISTIO_INBOUND, "nat", "-p", "tcp", "--dport", port, "-j", "RETURN")
            rules.append(ISTIO_INBOUND, "nat", "-p", "tcp", "-j", ISTIO_IN_REDIRECT)
        else:
            for port in split(config.inbound_ports_include):
                rules.append(ISTIO_INBOUND, "nat", "-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT)

    rules.append("OUTPUT", "nat", "-j", ISTIO_OUTPUT)
    for port in config.outbound_ports_exclude:  # before anything that sends traffic back to the proxy
        rules.append(ISTIO_OUTPUT, "nat", "-p", "tcp", "--dport", port, "-j", "RETURN")
        rules.append(ISTIO_OUTPUT, "nat", "-p", "udp", "--dport", port, "-j", "RETURN")
    # The inbound listener connects to the app from 127.0.0.6 (::6): never captured again.
    rules.append_versioned(PASSTHROUGH_SOURCE[4], PASSTHROUGH_SOURCE[6], ISTIO_OUTPUT, "nat",
                           "-o", "lo", "-s", "{ip}", "-j", "RETURN")
    keep_loopback_return = not (v4_include.has_loopback or v6_include.has_loopback)
    for owner, ids in (("--uid-owner", config.proxy_uids), ("--gid-owner", config.proxy_gids)):
        for ident in ids:
            # The proxy calling its own pod by a service address: through the inbound listener (app -> proxy
            # -> proxy -> app); the proxy's other traffic is never captured (no loop).
            rules.append_versioned(loopback4, IPV6_LOOPBACK, ISTIO_OUTPUT, "nat", "-o", "lo", "!", "-d", "{ip}",
                                   "-p", "tcp", "!", "--dport", config.inbound_tunnel_port,
                                   "-m", "owner", owner, ident, "-j", ISTIO_IN_REDIRECT)
            if keep_loopback_return:  # the app calling itself by its pod address over lo: left alone
                rules.append(ISTIO_OUTPUT, "nat", "-o", "lo", "-m", "owner", "!", owner, ident, "-j", "RETURN")
            rules.append(ISTIO_OUTPUT, "nat", "-m", "owner", owner, ident, "-j", "RETURN")

    if config.owner_groups_include == "*":  # handleCaptureByOwnerGroup
        for group in config.owner_groups_exclude:
            rules.append(ISTIO_OUTPUT, "nat", "-m", "owner", "--gid-owner", group, "-j", "RETURN")
    else:
        none_of = [p for group in split(config.owner_groups_include)
                   for p in ("-m", "owner", "!", "--gid-owner", group)]
        rules.append(ISTIO_OUTPUT, "nat", *none_of, "-j", "RETURN")

    # Calls to localhost (proxy-aware apps, container to container) are never captured.
    rules.append_versioned(loopback4, IPV6_LOOPBACK, ISTIO_OUTPUT, "nat", "-d", "{ip}", "-j", "RETURN")
    for cidr in v4_exclude.cidrs:
        rules.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", "RETURN", family=4)
    for cidr in v6_exclude.cidrs:
        rules.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", "RETURN", family=6)
    for port in config.outbound_ports_include:
        rules.append(ISTIO_OUTPUT, "nat", "-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT)
    includes: tuple[tuple[Family, Cidrs], ...] = ((4, v4_include), (6, v6_include))
    for family, include in includes:  # handleOutboundIncludeRules
        if include.wildcard:
            rules.append(ISTIO_OUTPUT, "nat", "-j", ISTIO_REDIRECT, family=family)
            for nic in config.reroute_virtual_interfaces:
                rules.insert("PREROUTING", "nat", 1, "-i", nic, "-j", ISTIO_REDIRECT, family=family)
        for cidr in include.cidrs:
            for nic in config.reroute_virtual_interfaces:
                rules.insert("PREROUTING", "nat", 1, "-i", nic, "-d", cidr, "-j", ISTIO_REDIRECT,
                             family=family)
            rules.append(ISTIO_OUTPUT, "nat", "-d", cidr, "-j", ISTIO_REDIRECT, family=family)
    return rules


def chains_to_create(rules: Sequence[Rule]) -> dict[str, list[str]]:
    """table -> the user chains to create (-N), in buildRestore's order: chains with rules, then jump targets."""
    seen: set[tuple[str, str]] = set()
    created: dict[str, list[str]] = {}
    for table, chain in [(r.table, r.chain) for r in rules] + [(r.table, r.jump_target() or "") for r in rules]:
        if chain and (table, chain) not in seen:
            seen.add((table, chain))
            if chain not in BUILT_IN:
                created.setdefault(table, []).append(chain)
    return created


def restore_lines(rules: Sequence[Rule]) -> dict[str, list[str]]:
    """table -> its lines of iptables-restore input (buildRestore): -N lines, then the rules in order."""
    lines: dict[str, list[str]] = {table: [f"-N {c}" for c in chains]
                                   for table, chains in chains_to_create(rules).items()}
    for rule in rules:
        lines.setdefault(rule.table, []).append(" ".join(rule.params))
    return lines


def render_restore(tables: dict[str, list[str]]) -> str:
    """constructIptablesRestoreContents: tables in name order, `* table` ... `COMMIT`, empty tables left out."""
    out: list[str] = []
    for table in sorted(tables):
        if tables[table]:
            out.append(f"* {table}")
            out.extend(tables[table])
            out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def restore_text(rules: RuleSet, family: Family) -> str:
    return render_restore(restore_lines(rules.rules(family)))


def dry_run_text(rules: RuleSet) -> str:
    """What `--dry-run` prints: each family's iptables-restore input, under a comment naming its command."""
    text = "# iptables-restore --noflush\n" + restore_text(rules, 4)
    if rules.ipv6:
        text += "# ip6tables-restore --noflush\n" + restore_text(rules, 6)
    return text
