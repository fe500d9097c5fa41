"""Load balancing, outlier ejection and retry budget, pure: seeded rng, injected clock."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from meshproxy.http1.head import build_request_head
from meshproxy.proxy.balancer import ClusterState, Clusters
from meshproxy.routing.cluster import Cluster, Endpoint
from meshproxy.istio import model as m
from meshproxy.istio.load import load_text
from meshproxy.routing.traffic import ClusterPolicy, compile_cluster_policy, merge_traffic_policy

ENDPOINTS = tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(4))


def traffic_policy(policy: dict | None, subset: dict | None = None) -> tuple[m.TrafficPolicy | None, m.TrafficPolicy | None]:
    """A trafficPolicy (and a subset's) as the loader builds them from YAML."""
    spec: dict = {"host": "svc", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    if policy is not None:
        spec["trafficPolicy"] = policy
    if subset is not None:
        spec["subsets"][0]["trafficPolicy"] = subset
    problems: list = []
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "svc"}, "spec": spec}
    (rule,) = load_text(json.dumps(doc), "dr.yaml", problems)
    assert not [p for p in problems if p.severity == "error"], problems
    return rule.traffic_policy, rule.subsets[0].traffic_policy


def compiled(policy: dict | None, subset: dict | None = None, port: int = 80) -> ClusterPolicy:
    return compile_cluster_policy(merge_traffic_policy(*traffic_policy(policy, subset), port))


def state(policy: dict | None = None, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> ClusterState:
    cluster = Cluster("outbound|80||svc", "svc", 80, "", endpoints, compiled(policy))
    return Clusters().state(cluster)


def head(headers: list[tuple[bytes, bytes]] = (), target: bytes = b"/") -> object:
    return build_request_head(b"GET", target, [(b"host", b"svc"), *headers], "1.1", True)


@pytest.mark.parametrize("lb", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_simple_policies_spread_evenly(lb: str) -> None:
    s = state({"loadBalancer": {"simple": lb}})
    rng = random.Random(1)
    counts = Counter(s.pick(None, (), rng, 0.0).endpoint.port for _ in range(4000))
    assert set(counts) == {9000, 9001, 9002, 9003}
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_round_robin_is_exact_rotation() -> None:
    s = state({"loadBalancer": {"simple": "ROUND_ROBIN"}})
    picks = [s.pick(None, (), random.Random(0), 0.0).endpoint.port for _ in range(8)]
    assert sorted(picks[:4]) == [9000, 9001, 9002, 9003] and picks[:4] == picks[4:]


def test_least_request_prefers_the_idle_endpoint() -> None:
    s = state()  # Istio's default: LEAST_REQUEST
    for e in s.endpoints[:3]:
        e.active = 50
    rng = random.Random(2)
    counts = Counter(s.pick(None, (), rng, 0.0).endpoint.port for _ in range(1000))
    assert counts[9003] > 400  # chosen whenever it is one of the two candidates (7/16 of picks)


def test_previous_hosts_are_avoided_when_others_exist() -> None:
    s = state({"loadBalancer": {"simple": "RANDOM"}})
    rng = random.Random(3)
    for _ in range(100):
        assert s.pick(None, ENDPOINTS[:3], rng, 0.0).endpoint == ENDPOINTS[3]


@pytest.mark.parametrize("algorithm", [{"ringHash": {"minimumRingSize": 1024}}, {"maglev": {"tableSize": 65537}}])
def test_consistent_hash_on_a_header_is_sticky_and_spreads(algorithm: dict) -> None:
    s = state({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", **algorithm}}})
    rng = random.Random(4)
    owners = {}
    for user in range(400):
        key = s.hash_key(head([(b"x-user", b"user-%d" % user)]), b"10.0.0.1")
        first = s.pick(key, (), rng, 0.0).endpoint
        assert all(s.pick(key, (), rng, 0.0).endpoint == first for _ in range(5))
        owners[user] = first
    spread = Counter(owners.values())
    assert len(spread) == 4 and min(spread.values()) > 40, spread


def test_consistent_hash_sources_cookie_query_and_source_ip() -> None:
    cookie = state({"loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}}})
    assert cookie.hash_key(head([(b"cookie", b"a=1; user=jason")]), b"") == \
        cookie.hash_key(head([(b"cookie", b"user=jason")]), b"")
    assert cookie.hash_key(head(), b"") is None  # no key: a plain pick
    query = state({"loadBalancer": {"consistentHash": {"httpQueryParameterName": "u"}}})
    assert query.hash_key(head(target=b"/p?u=7"), b"") == query.hash_key(head(target=b"/q?x=1&u=7"), b"")
    source = state({"loadBalancer": {"consistentHash": {"useSourceIp": True}}})
    assert source.hash_key(head(), b"10.1.1.1") != source.hash_key(head(), b"10.1.1.2")


def test_outlier_ejects_after_consecutive_5xx_and_returns_after_the_ejection_time() -> None:
    s = state({"loadBalancer": {"simple": "ROUND_ROBIN"},
               "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "10s", "maxEjectionPercent": 50}})
    bad = s.endpoints[0]
    for _ in range(2):
        s.report(bad, 503, 100.0)
    assert not bad.ejected(100.0)
    s.report(bad, 500, 100.0)
    assert bad.ejected(100.0)
    picks = {s.pick(None, (), random.Random(0), 105.0).endpoint for _ in range(20)}
    assert bad.endpoint not in picks
    assert not bad.ejected(110.0)  # base ejection time over
    for _ in range(3):
        s.report(bad, 0, 200.0)  # local-origin failures count too
    assert bad.ejected(219.0) and not bad.ejected(220.0)  # second ejection: 2 x base


def test_success_resets_the_consecutive_count() -> None:
    s = state({"outlierDetection": {"consecutive5xxErrors": 2, "maxEjectionPercent": 100}})
    e = s.endpoints[0]
    for status in (503, 200, 503, 200, 503):
        s.report(e, status, 0.0)
    assert not e.ejected(0.0)


def test_max_ejection_percent_caps_ejections_but_one_host_can_always_go() -> None:
    s = state({"outlierDetection": {"consecutive5xxErrors": 1}})  # default maxEjectionPercent 10
    for e in s.endpoints:
        s.report(e, 503, 0.0)
    assert sum(e.ejected(0.0) for e in s.endpoints) == 1


def test_all_ejected_means_no_healthy_upstream_unless_panic_threshold() -> None:
    single = state({"outlierDetection": {"consecutive5xxErrors": 1}}, ENDPOINTS[:1])
    single.report(single.endpoints[0], 503, 0.0)
    assert single.pick(None, (), random.Random(0), 1.0) is None
    panic = state({"outlierDetection": {"consecutive5xxErrors": 1, "minHealthPercent": 50}}, ENDPOINTS[:1])
    panic.report(panic.endpoints[0], 503, 0.0)
    assert panic.pick(None, (), random.Random(0), 1.0) is not None


def test_retry_budget_caps_concurrent_retries() -> None:
    s = state({"retryBudget": {"percent": 20, "minRetryConcurrency": 3}})
    s.active_requests = 100
    allowed = 0
    while s.retry_allowed():
        s.active_retries += 1
        allowed += 1
    assert allowed == 20
    s.active_requests, s.active_retries = 5, 0
    allowed = 0
    while s.retry_allowed():
        s.active_retries += 1
        allowed += 1
    assert allowed == 3  # minRetryConcurrency


def test_max_retries_circuit_breaker() -> None:
    s = state({"connectionPool": {"http": {"maxRetries": 2}}})
    s.active_retries = 2
    assert not s.retry_allowed()


def test_subset_and_port_level_policies_replace_whole_blocks() -> None:
    rule = {"loadBalancer": {"simple": "RANDOM"}, "connectionPool": {"tcp": {"maxConnections": 5}},
            "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]}
    subset = {"connectionPool": {"http": {"http1MaxPendingRequests": 1}}}
    merged = compiled(rule, subset, 9080)
    assert merged.lb == "ROUND_ROBIN"
    assert merged.pool.max_pending == 1 and merged.pool.max_connections == 2**32 - 1  # no deep merge
    assert compiled(rule, None, 80).lb == "RANDOM"
    assert compile_cluster_policy(None).lb == "LEAST_REQUEST"
