"""DestinationRule `trafficPolicy` -> typed, ready-to-use cluster policy (Istio's defaults filled in).

Merging follows Istio (`MergeTrafficPolicy`): a subset's policy replaces the rule's
policy block by block (loadBalancer, connectionPool, outlierDetection, retryBudget);
`portLevelSettings` for the cluster's port replace the blocks they set, and
do not inherit fields they omit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..istio.values import parse_duration

UNLIMITED: Final = 2**32 - 1  # Istio's default for every circuit-breaker threshold
BLOCKS: Final = ("loadBalancer", "connectionPool", "outlierDetection", "retryBudget", "tls")

LB_ROUND_ROBIN: Final = "ROUND_ROBIN"
LB_LEAST_REQUEST: Final = "LEAST_REQUEST"
LB_RANDOM: Final = "RANDOM"
LB_PASSTHROUGH: Final = "PASSTHROUGH"
DEFAULT_LB: Final = LB_LEAST_REQUEST  # Istio >= 1.14 when `simple` is unset


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """consistentHash: where the key comes from, and the table."""

    source: str  # header | cookie | query | source_ip
    name: bytes = b""
    algorithm: str = "ring"  # ring | maglev
    size: int = 1024  # ring: minimumRingSize (1024); maglev: tableSize (65537)


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int = UNLIMITED
    connect_timeout: float | None = None  # None: the proxy's --connect-timeout (mesh default 10 s)
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_retries: int = UNLIMITED
    idle_timeout: float | None = None  # None: the proxy's --upstream-idle-timeout


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
class TrafficPolicy:
    lb: str = DEFAULT_LB
    hash: HashPolicy | None = None
    pool: ConnectionPool = ConnectionPool()
    outlier: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None


DEFAULT_POLICY: Final = TrafficPolicy()


def merge_policies(rule: Mapping[str, Any] | None, subset: Mapping[str, Any] | None, port: int) -> dict[str, Any]:
    """The effective raw policy of one cluster: rule, then subset blocks, then port-level blocks."""
    merged: dict[str, Any] = {}
    for layer in (rule, subset):
        if not layer:
            continue
        for block in BLOCKS:
            if layer.get(block) is not None:
                merged[block] = layer[block]
        for settings in layer.get("portLevelSettings") or ():
            if (settings.get("port") or {}).get("number") == port:
                for block in BLOCKS:
                    if settings.get(block) is not None:
                        merged[block] = settings[block]
    return merged


def _seconds(raw: Any, default: float | None) -> float | None:
    return parse_duration(raw) if isinstance(raw, str) else default


def compile_traffic_policy(raw: Mapping[str, Any] | None) -> TrafficPolicy:
    if not raw:
        return DEFAULT_POLICY
    lb_spec = raw.get("loadBalancer") or {}
    lb = str(lb_spec.get("simple") or DEFAULT_LB)
    if lb == "LEAST_CONN":
        lb = LB_LEAST_REQUEST  # deprecated alias
    if lb == "UNSPECIFIED":
        lb = DEFAULT_LB
    hash_policy = None
    ch = lb_spec.get("consistentHash")
    if ch:
        if ch.get("httpHeaderName"):
            source, name = "header", ch["httpHeaderName"].lower().encode()
        elif ch.get("httpCookie"):
            source, name = "cookie", str(ch["httpCookie"].get("name", "")).encode()
        elif ch.get("httpQueryParameterName"):
            source, name = "query", ch["httpQueryParameterName"].encode()
        else:
            source, name = "source_ip", b""
        if ch.get("maglev") is not None:
            hash_policy = HashPolicy(source, name, "maglev", int((ch["maglev"] or {}).get("tableSize") or 65537))
        else:
            ring = (ch.get("ringHash") or {}).get("minimumRingSize") or ch.get("minimumRingSize") or 1024
            hash_policy = HashPolicy(source, name, "ring", int(ring))
    pool_spec = raw.get("connectionPool") or {}
    tcp, http = pool_spec.get("tcp") or {}, pool_spec.get("http") or {}
    pool = ConnectionPool(
        max_connections=int(tcp.get("maxConnections") or UNLIMITED),
        connect_timeout=_seconds(tcp.get("connectTimeout"), None),
        max_pending=int(http.get("http1MaxPendingRequests") or UNLIMITED),
        max_requests=int(http.get("http2MaxRequests") or UNLIMITED),
        max_requests_per_connection=int(http.get("maxRequestsPerConnection") or 0),
        max_retries=int(http.get("maxRetries") or UNLIMITED),
        idle_timeout=_seconds(http.get("idleTimeout"), None),
    )
    outlier = None
    od = raw.get("outlierDetection")
    if od is not None:
        consecutive = od.get("consecutive5xxErrors", od.get("consecutiveErrors", 5))
        outlier = OutlierDetection(
            consecutive_5xx=int(consecutive if consecutive is not None else 5),
            consecutive_gateway=int(od.get("consecutiveGatewayErrors") or 0),
            interval=_seconds(od.get("interval"), 10.0) or 10.0,
            base_ejection_time=_seconds(od.get("baseEjectionTime"), 30.0) or 30.0,
            max_ejection_percent=float(od.get("maxEjectionPercent", 10)),
            min_health_percent=float(od.get("minHealthPercent", 0)),
        )
    budget = None
    rb = raw.get("retryBudget")
    if rb is not None:
        percent = rb.get("percent")
        if isinstance(percent, Mapping):
            percent = percent.get("value")
        budget = RetryBudget(float(percent if percent is not None else 20.0), int(rb.get("minRetryConcurrency", 3)))
    return TrafficPolicy(lb=lb, hash=hash_policy, pool=pool, outlier=outlier, retry_budget=budget)
