"""A cluster's DestinationRule traffic policy, merged and compiled (Istio's defaults filled in).

Merging follows Istio (`MergeSubsetTrafficPolicy`, see merge_traffic_policy): a
`portLevelSettings` entry for the cluster's port replaces all four blocks of its
layer (what it omits is Istio's default, not inherited), and a subset's policy
replaces the rule's block by block. The result, a ClusterPolicy, is fixed on the
Cluster at compile time: the data path only reads it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from ..istio import model as m

UNLIMITED: Final = 2**32 - 1  # Istio's default for every circuit-breaker threshold

LB_ROUND_ROBIN: Final = "ROUND_ROBIN"
LB_LEAST_REQUEST: Final = "LEAST_REQUEST"
LB_RANDOM: Final = "RANDOM"
LB_PASSTHROUGH: Final = "PASSTHROUGH"
DEFAULT_LB: Final = LB_LEAST_REQUEST  # Istio >= 1.14 when `simple` is unset

HASH_HEADER: Final = "header"
HASH_COOKIE: Final = "cookie"
HASH_QUERY: Final = "query"
HASH_SOURCE_IP: Final = "source_ip"
DEFAULT_RING_SIZE: Final = 1024  # Envoy's minimum_ring_size
DEFAULT_MAGLEV_SIZE: Final = 65537  # Envoy's Maglev table_size

TLS_DISABLE: Final = "DISABLE"


def hash64(data: bytes) -> int:
    """Stable across processes and runs (unlike hash()): a user keeps their endpoint after a restart."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """consistentHash: where the key comes from, and the table."""

    source: str  # HASH_HEADER | HASH_COOKIE | HASH_QUERY | HASH_SOURCE_IP
    name: bytes = b""
    algorithm: str = "ring"  # ring | maglev
    size: int = DEFAULT_RING_SIZE  # ring: minimumRingSize; maglev: tableSize


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int = UNLIMITED
    connect_timeout: float | None = None  # None: the proxy's --connect-timeout (mesh default 10 s)
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_retries: int = UNLIMITED
    idle_timeout: float | None = None  # None: the proxy's --upstream-idle-timeout
    max_concurrent_streams: int = 0  # HTTP/2 streams per upstream connection; 0: Envoy's default (1024)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5  # 0 disables
    consecutive_gateway: int = 0  # 0 disables
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """Everything a DestinationRule says about one cluster, ready for the data path."""

    lb: str = DEFAULT_LB
    hash: HashPolicy | None = None
    pool: ConnectionPool = ConnectionPool()
    outlier: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None
    # The model's ClientTLSSettings as it is (already typed), mode DISABLE included; None: no tls at all, where
    # Istio's auto mTLS decides per endpoint. security/client_tls.py compiles it into contexts at load.
    tls: m.ClientTLSSettings | None = None


DEFAULT_POLICY: Final = ClusterPolicy()


def merge_traffic_policy(rule: m.TrafficPolicy | None, subset: m.TrafficPolicy | None,
                         port: int) -> m.TrafficPolicy | None:
    """The effective policy of one cluster, as Istio's MergeSubsetTrafficPolicy: each layer (the rule, the subset)
    is first taken at the cluster's port, where a matching `portLevelSettings` entry replaces all four of its
    blocks (loadBalancer, connectionPool, outlierDetection, tls: what it omits falls back to the defaults, it
    is not inherited); then the subset's blocks replace the rule's, all four of them when the subset had
    port-level settings for the port, else only those it sets."""
    if rule is None and subset is None:
        return None
    base, _ = _at_port(rule, port)
    top, port_level = _at_port(subset, port)
    if top is None:
        return base
    if base is None:
        return top
    whole = port_level  # the subset's port-level entry: its omissions are defaults, not the rule's blocks
    return m.TrafficPolicy(
        load_balancer=top.load_balancer if top.load_balancer is not None or whole else base.load_balancer,
        connection_pool=top.connection_pool if top.connection_pool is not None or whole else base.connection_pool,
        outlier_detection=top.outlier_detection if top.outlier_detection is not None or whole
        else base.outlier_detection,
        tls=top.tls if top.tls is not None or whole else base.tls,
        retry_budget=top.retry_budget if top.retry_budget is not None else base.retry_budget)


def _at_port(policy: m.TrafficPolicy | None, port: int) -> tuple[m.TrafficPolicy | None, bool]:
    """A layer's policy at one port, and whether a port-level entry made it (Istio's GetPortLevelTrafficPolicy)."""
    if policy is None:
        return None, False
    for settings in policy.port_level_settings:
        if settings.port == port:
            return m.TrafficPolicy(load_balancer=settings.load_balancer, connection_pool=settings.connection_pool,
                                   outlier_detection=settings.outlier_detection, tls=settings.tls,
                                   retry_budget=policy.retry_budget), True
    return policy, False


def compile_cluster_policy(policy: m.TrafficPolicy | None) -> ClusterPolicy:
    """A merged TrafficPolicy -> the ClusterPolicy the data path reads (Istio's defaults for what is unset)."""
    if policy is None:
        return DEFAULT_POLICY
    lb, hash_policy = _load_balancer(policy.load_balancer)
    od = policy.outlier_detection
    outlier = None
    if od is not None:
        outlier = OutlierDetection(
            consecutive_5xx=od.consecutive_5xx_errors,
            consecutive_gateway=od.consecutive_gateway_errors,
            interval=od.interval or 10.0,
            base_ejection_time=od.base_ejection_time or 30.0,
            max_ejection_percent=od.max_ejection_percent,
            min_health_percent=od.min_health_percent,
        )
    rb = policy.retry_budget
    budget = RetryBudget(rb.percent, rb.min_retry_concurrency) if rb is not None else None
    return ClusterPolicy(lb=lb, hash=hash_policy, pool=_pool(policy.connection_pool), outlier=outlier,
                         retry_budget=budget, tls=policy.tls)


def _load_balancer(spec: m.LoadBalancerSettings | None) -> tuple[str, HashPolicy | None]:
    if spec is None:
        return DEFAULT_LB, None
    lb = spec.simple
    if lb == "LEAST_CONN":
        lb = LB_LEAST_REQUEST  # deprecated alias
    elif lb == "UNSPECIFIED" or not lb:
        lb = DEFAULT_LB
    ch = spec.consistent_hash
    if ch is None:
        return lb, None
    if ch.http_header_name:
        source, name = HASH_HEADER, ch.http_header_name.encode()
    elif ch.http_cookie is not None:
        source, name = HASH_COOKIE, ch.http_cookie.name.encode()
    elif ch.http_query_parameter_name:
        source, name = HASH_QUERY, ch.http_query_parameter_name.encode()
    else:
        source, name = HASH_SOURCE_IP, b""
    if ch.maglev:
        return lb, HashPolicy(source, name, "maglev", ch.maglev_table_size or DEFAULT_MAGLEV_SIZE)
    return lb, HashPolicy(source, name, "ring", ch.minimum_ring_size or DEFAULT_RING_SIZE)


def _pool(spec: m.ConnectionPoolSettings | None) -> ConnectionPool:
    if spec is None:
        return ConnectionPool()
    tcp, http = spec.tcp, spec.http
    return ConnectionPool(
        max_connections=tcp.max_connections or UNLIMITED,
        connect_timeout=tcp.connect_timeout,
        max_pending=http.http1_max_pending_requests or UNLIMITED,
        max_requests=http.http2_max_requests or UNLIMITED,
        max_requests_per_connection=http.max_requests_per_connection,
        max_retries=http.max_retries or UNLIMITED,
        idle_timeout=http.idle_timeout,
        max_concurrent_streams=http.max_concurrent_streams,
    )


HTTP2_PROTOCOLS: Final = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})  # Istio's protocol.Instance.IsHTTP2()
NAMED_PROTOCOLS: Final = frozenset({"HTTP", "HTTP2", "HTTPS", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS",
                                    "MYSQL", "UDP"})


def port_protocol(port: m.ServicePort) -> str:
    """The port's protocol as Istio reads it: `protocol:`, else the name's prefix before any `-` (Kubernetes'
    convention, `grpc-api` -> GRPC)."""
    if port.protocol:
        return port.protocol.upper()
    prefix = port.name.partition("-")[0].upper()
    return prefix if prefix in NAMED_PROTOCOLS else "HTTP"  # meshproxy carries an undeclared port as HTTP


def follows_client(port: m.ServicePort, policy: m.TrafficPolicy | None) -> bool:
    """`useClientProtocol: true`: the upstream protocol is the client's (HTTP/1.1 or HTTP/2), on an HTTP port."""
    pool = policy.connection_pool if policy is not None else None
    return pool is not None and pool.http.use_client_protocol and not upstream_http2(port, policy)


def upstream_http2(port: m.ServicePort, policy: m.TrafficPolicy | None) -> bool:
    """HTTP/2 to the upstream, as Istio's cluster builder chooses it: an HTTP/2 or gRPC port, or an HTTP port
    whose DestinationRule says `h2UpgradePolicy: UPGRADE` (the mesh default, DEFAULT, is DO_NOT_UPGRADE)."""
    protocol = port_protocol(port)
    if protocol in HTTP2_PROTOCOLS:
        return True
    pool = policy.connection_pool if policy is not None else None
    return protocol == "HTTP" and pool is not None and pool.http.h2_upgrade_policy == "UPGRADE"
