"""Upstream clusters as Envoy names them: a service port, optionally narrowed to a subset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .traffic import DEFAULT_POLICY, ClusterPolicy, HashPolicy, hash64


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, int]:
        """What the connection pool is keyed by."""
        return (self.address, self.port)

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class HashTable:
    """A consistent-hash lookup table over a cluster's endpoints, by index into Cluster.endpoints."""

    maglev: bool
    points: tuple[int, ...]  # ring: sorted hash points; Maglev: empty (the key indexes `owners` directly)
    owners: tuple[int, ...]  # the endpoint of each point (ring) or table entry (Maglev)


@dataclass(frozen=True, slots=True)
class Cluster:
    """`outbound|9080|v1|reviews.default.svc.cluster.local`: endpoints and policy fixed at compile time."""

    name: str
    service: str  # FQDN of the service
    port: int
    subset: str
    endpoints: tuple[Endpoint, ...]
    policy: ClusterPolicy = DEFAULT_POLICY
    external: bool = False  # MESH_EXTERNAL: requests leave the mesh, so mesh-internal headers are stripped
    # Envoy's ORIGINAL_DST cluster (PassthroughCluster, inbound): no endpoints of its own, each connection's
    # original destination is its endpoint (see proxy/balancer.Clusters.original_destination).
    original_destination: bool = False
    bind_address: str = ""  # source address of upstream connections (Istio's inbound 127.0.0.6); "" = any
    # Who may serve it (ISTIO_MUTUAL checks the server's SPIFFE id): the ServiceEntry's subjectAltNames, and
    # (namespace, service account) of its endpoints that name one.
    subject_alt_names: tuple[str, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    http2: bool = False  # the upstream speaks HTTP/2 (routing/traffic.upstream_http2)
    follows_client: bool = False  # the upstream speaks the client's protocol (useClientProtocol; the inbound cluster)
    # Built with the cluster (at compile time, never on a request); follows from policy and endpoints.
    hash_table: HashTable | None = field(init=False, default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.policy.hash is not None:
            object.__setattr__(self, "hash_table", build_hash_table(self.policy.hash, self.endpoints))

    @staticmethod
    def name_of(direction: str, port: int, subset: str, service: str) -> str:
        return f"{direction}|{port}|{subset}|{service}"


def build_hash_table(policy: HashPolicy, endpoints: Sequence[Endpoint]) -> HashTable:
    if policy.algorithm == "maglev":
        return HashTable(True, (), _maglev(policy.size, endpoints))
    per_host = max(1, -(-policy.size // max(1, len(endpoints))))
    points = sorted((hash64(f"{e}_{i}".encode()), n) for n, e in enumerate(endpoints) for i in range(per_host))
    return HashTable(False, tuple(p for p, _ in points), tuple(n for _, n in points))


def _maglev(size: int, endpoints: Sequence[Endpoint]) -> tuple[int, ...]:
    """Maglev lookup table (Eisenbud et al. 2016), as Envoy builds it for equal weights."""
    if not endpoints:
        return ()
    n = len(endpoints)
    offsets = [hash64(str(e).encode()) % size for e in endpoints]
    skips = [hash64(b"skip" + str(e).encode()) % (size - 1) + 1 for e in endpoints]
    nexts = [0] * n
    table: list[int] = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            c = (offsets[i] + nexts[i] * skips[i]) % size
            while table[c] >= 0:
                nexts[i] += 1
                c = (offsets[i] + nexts[i] * skips[i]) % size
            table[c] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return tuple(table)
