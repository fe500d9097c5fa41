"""Per-cluster runtime state: load balancing, circuit breaker counters, outlier ejection, retry budget.

The policy and the consistent-hash table are compiled with the route table
(routing/traffic.py, routing/cluster.py); this module only keeps counters, in
`ClusterState`, which survives reloads for a cluster of the same name so that
in-flight counts stay right.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ..routing.cluster import Cluster, Endpoint, HashTable
from ..routing.match import parse_query
from ..routing.traffic import HASH_COOKIE, HASH_HEADER, HASH_QUERY, LB_RANDOM, LB_ROUND_ROBIN, ClusterPolicy, hash64

if TYPE_CHECKING:
    import asyncio

    from ..messages import RequestHead
    from ..security.client_tls import UpstreamTLS

    TLSResolver = Callable[[Cluster, Endpoint], UpstreamTLS | None]

MAX_EJECTION_TIME: Final = 300.0  # Envoy's max_ejection_time default
H2_KEY: Final = "|h2"  # suffix of the pool keys of an HTTP/2 cluster's endpoints
FOLLOWS_CLIENT_KEY: Final = "|client"  # ... of a cluster whose upstream protocol is the client's


@dataclass(slots=True)
class EndpointState:
    endpoint: Endpoint
    pool_key: tuple[str, str, int]  # (cluster name, address, port): its upstream connections in the pool
    active: int = 0  # requests in flight (LEAST_REQUEST)
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    tls: UpstreamTLS | None = None  # how its new connections do TLS (None: plaintext), set with its cluster

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


@dataclass(slots=True)
class ClusterState:
    cluster: Cluster
    endpoints: list[EndpointState]  # in the order of cluster.endpoints (its hash table indexes them)
    rr: int = 0
    active_requests: int = 0
    active_retries: int = 0
    connections: int = 0
    pending: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    only: EndpointState | None = None  # the one endpoint, when no policy can make a pick other than it (computed)
    retired: bool = False  # a reload changed who its servers may be (TLS): its connections are not reused
    policy: ClusterPolicy = field(init=False)  # cluster.policy, one attribute nearer for the data path

    def __post_init__(self) -> None:
        self.policy = self.cluster.policy
        if len(self.endpoints) == 1 and self.policy.outlier is None and self.policy.hash is None:
            self.only = self.endpoints[0]

    # ---- load balancing

    def hash_key(self, head: RequestHead, peer_ip: bytes) -> int | None:
        policy = self.policy.hash
        if policy is None:
            return None
        value: bytes | None
        if policy.source == HASH_HEADER:
            value = head.header(policy.name)
        elif policy.source == HASH_COOKIE:
            value = _cookie(head.header(b"cookie"), policy.name)
        elif policy.source == HASH_QUERY:
            value = parse_query(head.query).get(policy.name)
        else:
            value = peer_ip
        return hash64(value) if value is not None else None

    def pick(self, key: int | None, avoid: Sequence[Endpoint], rng: random.Random, now: float) -> EndpointState | None:
        healthy = self.endpoints if self.policy.outlier is None else self._healthy(now)
        if not healthy:
            return None
        table = self.cluster.hash_table
        if key is not None and table is not None:
            return self._pick_hashed(table, key, now)
        candidates = [e for e in healthy if e.endpoint not in avoid] if avoid else healthy
        if not candidates:
            candidates = healthy
        if len(candidates) == 1:
            return candidates[0]
        lb = self.policy.lb
        if lb == LB_ROUND_ROBIN:
            self.rr += 1
            return candidates[self.rr % len(candidates)]
        if lb == LB_RANDOM:
            return candidates[rng.randrange(len(candidates))]
        # LEAST_REQUEST with equal weights: power of two choices (Envoy's default choice_count 2).
        first = candidates[rng.randrange(len(candidates))]
        second = candidates[rng.randrange(len(candidates))]
        return first if first.active <= second.active else second

    def _healthy(self, now: float) -> list[EndpointState]:
        outlier = self.policy.outlier
        assert outlier is not None  # pick() asks only then: without outlier detection nobody is ever ejected
        healthy = [e for e in self.endpoints if not e.ejected(now)]
        if outlier.min_health_percent > 0 and self.endpoints \
                and 100 * len(healthy) / len(self.endpoints) < outlier.min_health_percent:
            return self.endpoints  # panic mode: ignore health, as Envoy's healthy_panic_threshold
        return healthy

    def _pick_hashed(self, table: HashTable, key: int, now: float) -> EndpointState | None:
        owners, endpoints = table.owners, self.endpoints
        if not owners:
            return None
        start = key % len(owners) if table.maglev else bisect_left(table.points, key % (1 << 64))
        for i in range(len(owners)):  # the next entry whose endpoint is not ejected
            owner = endpoints[owners[(start + i) % len(owners)]]
            if not owner.ejected(now):
                return owner
        return None

    # ---- circuit breaking and retry budget

    def retry_allowed(self) -> bool:
        """maxRetries and retryBudget: retries in flight stay within the limit (no retry storms)."""
        if self.active_retries >= self.policy.pool.max_retries:
            return False
        budget = self.policy.retry_budget
        if budget is not None:
            allowed = max(budget.min_retry_concurrency, budget.percent / 100.0 * (self.active_requests + self.pending))
            if self.active_retries >= allowed:
                return False
        return True

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---- outlier detection

    def report(self, state: EndpointState, status: int, now: float) -> None:
        """An attempt's result: status code, or 503-like 0 for a local-origin failure (connect, reset, timeout)."""
        outlier = self.policy.outlier
        if outlier is None:
            return
        if status >= 500 or status == 0:
            state.consecutive_5xx += 1
            if status in (0, 502, 503, 504):
                state.consecutive_gateway += 1
            if (outlier.consecutive_5xx and state.consecutive_5xx >= outlier.consecutive_5xx) or \
                    (outlier.consecutive_gateway and state.consecutive_gateway >= outlier.consecutive_gateway):
                self._eject(state, now)
        else:
            state.consecutive_5xx = state.consecutive_gateway = 0

    def _eject(self, state: EndpointState, now: float) -> None:
        outlier = self.policy.outlier
        assert outlier is not None
        if state.ejected(now):
            return
        ejected = sum(e.ejected(now) for e in self.endpoints)
        # maxEjectionPercent caps ejections, but Envoy always allows ejecting one host.
        if ejected and 100 * (ejected + 1) / len(self.endpoints) > outlier.max_ejection_percent:
            return
        state.ejections += 1
        state.ejected_until = now + min(outlier.base_ejection_time * state.ejections,
                                        max(MAX_EJECTION_TIME, outlier.base_ejection_time))
        state.consecutive_5xx = state.consecutive_gateway = 0


def _cookie(header: bytes | None, name: bytes) -> bytes | None:
    if header is None:
        return None
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value
    return None


MAX_ORIGINAL_DESTINATIONS: Final = 4096  # clusters kept per original destination (then the cache starts again)


def _tls_changed(old: Cluster, new: Cluster) -> bool:
    return (old.policy.tls, old.subject_alt_names, old.service_accounts) != \
        (new.policy.tls, new.subject_alt_names, new.service_accounts)


class Clusters:
    """ClusterState by cluster name, rebuilt (keeping counters) when a reload brings a new Cluster object."""

    def __init__(self, tls: TLSResolver | None = None, retire: Callable[[str], None] | None = None) -> None:
        self.states: dict[str, ClusterState] = {}
        self.originals: dict[tuple[int, str, int], Cluster] = {}
        self.tls = tls  # None: no upstream TLS anywhere (no cert dir, no DestinationRule tls)
        self.retire = retire  # closes the idle connections of a cluster whose TLS changed (the pool's)

    def original_destination(self, cluster: Cluster, address: tuple[str, int]) -> Cluster:
        """Envoy's ORIGINAL_DST cluster: the connection's original destination is its one endpoint (kept per
        destination, so that its connections pool under (cluster, address, port) as any other endpoint's)."""
        key = (id(cluster), address[0], address[1])
        found = self.originals.get(key)
        if found is None or found.name != cluster.name:
            if len(self.originals) >= MAX_ORIGINAL_DESTINATIONS:
                self.originals.clear()
            found = self.originals[key] = Cluster(cluster.name, cluster.service, cluster.port, cluster.subset,
                                                  (Endpoint(address[0], address[1]),), cluster.policy,
                                                  cluster.external, False, cluster.bind_address,
                                                  cluster.subject_alt_names, cluster.service_accounts)
        return found

    def state(self, cluster: Cluster) -> ClusterState:
        state = self.states.get(cluster.name)
        if state is not None and (state.cluster is cluster or state.cluster == cluster):
            return state
        same_protocol = state is not None and state.cluster.http2 == cluster.http2 \
            and state.cluster.follows_client == cluster.follows_client
        previous = {e.endpoint.key: e for e in state.endpoints} if state is not None and same_protocol else {}
        # An HTTP/2 cluster's connections are pooled apart, and so are those of a cluster that follows the client's
        # protocol (upstream.ClientProtocolPool): a reload that changes the protocol reuses none.
        name = cluster.name + (H2_KEY if cluster.http2 else FOLLOWS_CLIENT_KEY if cluster.follows_client else "")
        endpoints = [previous.get(ep.key) or EndpointState(ep, (name, ep.address, ep.port))
                     for ep in cluster.endpoints]
        tls = self.tls
        for e, ep in zip(endpoints, cluster.endpoints):
            e.endpoint = ep
            e.tls = tls(cluster, ep) if tls is not None else None
        fresh = ClusterState(cluster, endpoints)
        if state is not None and _tls_changed(state.cluster, cluster):
            # As Envoy drains a changed cluster's pools: no request goes out on a connection made (and its server
            # checked) under the old TLS settings; busy ones close after their response.
            state.retired = True
            if self.retire is not None:
                self.retire(cluster.name)
        if state is not None:  # in-flight counts carry over
            fresh.active_requests, fresh.active_retries = state.active_requests, state.active_retries
            fresh.connections, fresh.pending, fresh.waiters = state.connections, state.pending, state.waiters
        self.states[cluster.name] = fresh
        return fresh
