"""The compiled route table: authority -> virtual host -> first matching route."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from ..security.policy import NO_POLICY, NO_WORKLOAD_POLICY, RequestPolicy, WorkloadPolicy
from .l4 import Destinations
from .match import MatchInput
from .policy import Route
from .trie import NO_ROUTE, PathIndex

DEFAULT_PORT: Final = 80
AUTHORITY_CACHE_MAX: Final = 4096  # authorities seen -> (virtual host, port); bounded against hostile Host values
# Up to this many routes a plain scan costs no more than the path index (benchmarks/route_match.py: the index
# wins from about 6 routes when the last one matches, from about 8 on average over the routes).
LINEAR_SCAN_MAX: Final = 6


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str  # the service FQDN or the VirtualService host it was built for
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    index: PathIndex | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.routes) > LINEAR_SCAN_MAX:
            object.__setattr__(self, "index", PathIndex([r.match for r in self.routes]))

    def match(self, req: MatchInput, port: int) -> Route | None:
        """First route in declaration order whose match holds (Istio: first match wins).

        Small hosts scan; bigger ones ask the path index, which only narrows the candidates and
        returns the lowest declaration index among those that hold (see trie.py)."""
        index = self.index
        if index is None:
            for route in self.routes:
                if route.match.matches(req, port):
                    return route
            return None
        i = index.first(req, port)
        return None if i == NO_ROUTE else self.routes[i]

    def scan(self, req: MatchInput, port: int) -> Route | None:
        """The reference answer: a linear scan in declaration order (tests, benchmarks)."""
        for route in self.routes:
            if route.match.matches(req, port):
                return route
        return None


def split_authority(authority: bytes) -> tuple[str, int | None]:
    """`Host` value -> (lower-case host, port or None). Accepts `[v6]:port`."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return text, None
        return host.rstrip("."), int(port_text)
    return host.rstrip("."), None


@dataclass(slots=True)
class RouteTable:
    exact: dict[str, VirtualHost]
    wildcards: tuple[tuple[str, VirtualHost], ...]  # (".suffix", vhost), longest suffix first
    catch_all: VirtualHost | None = None  # host "*"
    version: str = ""
    destinations: Destinations | None = None  # transparent connections by original destination (routing/l4.py)
    # The port of a Host without one: 80, or on a transparent listener the port the connection was going to (Istio's
    # outbound route configurations are per port). Read on a cache miss only.
    default_port: int = DEFAULT_PORT
    _cache: dict[bytes, tuple[VirtualHost | None, int]] = field(default_factory=dict)
    # Security (security/policy.py): what the snapshot says of requests to this workload, and what the listener
    # holding this table enforces (NO_POLICY: nothing, one identity check per request).
    security: WorkloadPolicy = NO_WORKLOAD_POLICY
    policy: RequestPolicy = NO_POLICY

    def with_policy(self, policy: RequestPolicy) -> RouteTable:
        """The same routes, enforcing `policy` (a listener's own copy; routes and hosts are shared)."""
        if policy is self.policy:
            return self
        return RouteTable(self.exact, self.wildcards, self.catch_all, self.version, self.destinations,
                          self.default_port, security=self.security, policy=policy)

    def virtual_host(self, authority: bytes) -> tuple[VirtualHost | None, int]:
        hit = self._cache.get(authority)
        if hit is not None:
            return hit
        host, port = split_authority(authority)
        vhost = self.exact.get(host)
        if vhost is None:
            for suffix, candidate in self.wildcards:
                if host.endswith(suffix):
                    vhost = candidate
                    break
            else:
                vhost = self.catch_all
        result = (vhost, port or self.default_port)
        if vhost is not None and len(self._cache) < AUTHORITY_CACHE_MAX:
            self._cache[authority] = result
        return result

    def match(self, req: MatchInput) -> tuple[Route | None, int]:
        vhost, port = self.virtual_host(req.authority)
        if vhost is None:
            return None, port
        return vhost.match(req, port), port

    @property
    def virtual_hosts(self) -> list[VirtualHost]:
        seen: dict[int, VirtualHost] = {}
        for vhost in [*self.exact.values(), *(v for _, v in self.wildcards), *([self.catch_all] if self.catch_all else [])]:
            seen.setdefault(id(vhost), vhost)
        return list(seen.values())
