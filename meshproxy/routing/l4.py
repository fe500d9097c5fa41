"""Where a transparently intercepted connection goes, by its original destination: compiled at load, pure.

Istio's outbound listeners, read as one lookup (`Destinations.find`, once per connection):
1. a ServiceEntry `addresses` entry (a VIP, or a CIDR block) and the port: that service port;
2. an endpoint address and its port: that service port, but the connection goes to the address itself (as
   Istio's ORIGINAL_DST clusters of headless services);
3. the port alone: an HTTP port of any service (Istio's `0.0.0.0_PORT` HTTP listener, routed by Host), or a TCP
   port of a service without addresses (Istio's `0.0.0.0_PORT` TCP listener);
4. nothing: `outboundTrafficPolicy` decides (ALLOW_ANY: PassthroughCluster, REGISTRY_ONLY: BlackHoleCluster).

A TCP connection then takes the first `tcp:` rule of the VirtualService for the service's host that matches
(port, destinationSubnets; sourceLabels and gateways were settled at compile time), else the service's own
cluster. A TLS connection takes the first `tls:` rule whose sniHosts match the ClientHello's server name (any
VirtualService bound to this proxy, as Istio's SNI filter chains), else a TLS service whose host is that name,
else the target's own cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import protocol as proto
from .cluster import Cluster
from .picker import WeightedPicker
from .policy import RouteDestination

PASSTHROUGH_CLUSTER: Final = "PassthroughCluster"
BLACKHOLE_CLUSTER: Final = "BlackHoleCluster"
INBOUND_PASSTHROUGH_IPV4: Final = "InboundPassthroughClusterIpv4"  # inbound to a port no service declares
INBOUND_PASSTHROUGH_IPV6: Final = "InboundPassthroughClusterIpv6"
INBOUND_SOURCE_ADDRESS: Final = "127.0.0.6"  # Istio's inbound upstream_bind_config (since 1.10)
INBOUND_SOURCE_ADDRESS_V6: Final = "::6"  # ... for IPv6 destinations (Istio puts ::6 on lo in dual-stack pods)


def inbound_source(address: str) -> str:
    """The address the inbound side connects to the app from: 127.0.0.6, or ::6 for an IPv6 destination."""
    return INBOUND_SOURCE_ADDRESS_V6 if ":" in address else INBOUND_SOURCE_ADDRESS
ALLOW_ANY: Final = "ALLOW_ANY"
REGISTRY_ONLY: Final = "REGISTRY_ONLY"
OUTBOUND_TRAFFIC_POLICIES: Final = (ALLOW_ANY, REGISTRY_ONLY)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Istio's ORIGINAL_DST clusters: no endpoints of their own; each connection's original destination is its endpoint.
PASSTHROUGH: Final = Cluster(PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER, 0, "", (), original_destination=True)
BLACKHOLE: Final = Cluster(BLACKHOLE_CLUSTER, BLACKHOLE_CLUSTER, 0, "", ())


def host_matches(pattern: str, name: str) -> bool:
    """An sniHosts / service host entry against a server name: exact, or `*.suffix` (one or more labels)."""
    if pattern.startswith("*"):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


@dataclass(frozen=True, slots=True)
class L4Rule:
    """One match block of a `tcp:` or `tls:` route, with its route's weighted destinations."""

    name: str  # `namespace/name:tcp[0]`, for logs (route_name in the access log)
    picker: WeightedPicker[RouteDestination]
    port: int | None = None
    subnets: tuple[Network, ...] = ()
    sni_hosts: tuple[str, ...] = ()

    def matches(self, address: Address | None, port: int, sni: str) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.subnets and (address is None or not any(address in net for net in self.subnets)):
            return False
        if self.sni_hosts and not any(host_matches(h, sni) for h in self.sni_hosts):
            return False
        return True


@dataclass(frozen=True, slots=True)
class L4Target:
    """A service port as a transparent connection finds it."""

    service: str  # FQDN
    port: int
    protocol: str  # routing/protocol.py; UNSUPPORTED: sniffed
    cluster: Cluster | None  # outbound|PORT||service; None when the port has no cluster
    tcp: tuple[L4Rule, ...] = ()  # the tcp: rules of the VirtualService for this host
    original_destination: bool = False  # found by an endpoint address: the connection goes to that address


@dataclass(frozen=True, slots=True)
class L4Decision:
    """Where one TCP (or TLS passthrough) connection goes."""

    cluster: Cluster | None  # None: the rule's destination has no cluster (Envoy closes, flag NC); may be an
    # original-destination cluster (PASSTHROUGH, or a service found by an endpoint address)
    rule: str = ""  # the rule that chose it, "" for the default


@dataclass(slots=True)
class Destinations:
    exact: dict[tuple[str, int], L4Target] = field(default_factory=dict)  # (VIP, port)
    subnets: tuple[tuple[Network, int, L4Target], ...] = ()  # CIDR addresses, longest prefix first
    endpoints: dict[tuple[str, int], L4Target] = field(default_factory=dict)  # (endpoint address, endpoint port)
    ports: dict[int, L4Target] = field(default_factory=dict)  # port-wide: HTTP ports, TCP ports without addresses
    tls: tuple[L4Rule, ...] = ()  # every tls: rule that applies to this proxy, in declaration order
    tls_services: tuple[tuple[str, int, Cluster], ...] = ()  # (host, port, cluster) of TLS/HTTPS ports, for SNI
    outbound_policy: str = ALLOW_ANY

    def find(self, address: str, port: int) -> L4Target | None:
        key = (address, port)
        target = self.exact.get(key)
        if target is not None:
            return target
        if self.subnets:
            ip = parse_address(address)
            if ip is not None:
                for net, net_port, candidate in self.subnets:
                    if net_port == port and ip in net:
                        return candidate
        target = self.endpoints.get(key)
        if target is not None:
            return target
        return self.ports.get(port)

    def inbound_protocol(self, address: str, port: int) -> str:
        """The protocol of the service port whose endpoint is this workload's (address, port); sniffed if none."""
        target = self.endpoints.get((address, port))
        return target.protocol if target is not None else proto.UNSUPPORTED

    def route_tcp(self, target: L4Target | None, address: str, port: int, randbelow: Callable[[int], int]) -> L4Decision:
        """A plain TCP connection: the target's first matching tcp: rule, else its cluster, else the policy."""
        if target is not None:
            if target.tcp:
                ip = parse_address(address)
                for rule in target.tcp:
                    if rule.matches(ip, port, ""):
                        return L4Decision(pick_cluster(rule.picker, port, randbelow), rule.name)
            if target.cluster is not None:
                return L4Decision(target.cluster)
        return L4Decision(self.unknown())

    def route_tls(self, target: L4Target | None, address: str, port: int, sni: str,
                  randbelow: Callable[[int], int]) -> L4Decision:
        """TLS passthrough by server name (the ClientHello's SNI, "" when it has none)."""
        ip = parse_address(address)
        for rule in self.tls:
            if rule.matches(ip, port, sni):
                return L4Decision(pick_cluster(rule.picker, port, randbelow), rule.name)
        if sni:
            for host, service_port, cluster in self.tls_services:
                if service_port == port and host_matches(host, sni):
                    return L4Decision(cluster)
        return self.route_tcp(target, address, port, randbelow)

    def unknown(self) -> Cluster:
        return PASSTHROUGH if self.outbound_policy == ALLOW_ANY else BLACKHOLE


def pick_cluster(picker: WeightedPicker[RouteDestination], port: int, randbelow: Callable[[int], int]) -> Cluster | None:
    """A weighted pick (randbelow is passed in: seeded in tests); None for a destination with no cluster (NC)."""
    dest = picker.pick(randbelow)
    return dest.cluster_for(port) if dest.by_port else dest.cluster


def parse_address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
