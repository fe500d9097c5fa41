"""DestinationRule traffic policy: typed at load, merged and compiled per cluster with the route table.

Nothing of it is parsed or built on a request: Clusters.state() only picks up what the compiler made.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import re2
from click.testing import CliRunner

from meshproxy.cli import main
from meshproxy.istio import model as m
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.proxy.balancer import Clusters
from meshproxy.routing.cluster import Cluster
from meshproxy.routing.compile import compile_table
from meshproxy.routing.traffic import DEFAULT_POLICY, UNLIMITED

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9443, name: admin, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v2}}
---
"""

RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      tcp: {maxConnections: 5, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 7, idleTimeout: 1m30s}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m}
    retryBudget: {percent: 25, minRetryConcurrency: 4}
    portLevelSettings:
    - port: {number: 9443}
      loadBalancer: {simple: ROUND_ROBIN}
      tls: {mode: SIMPLE, sni: admin.reviews, caCertificates: /etc/ca.pem, subjectAltNames: [spiffe://a/b]}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {maxRetries: 2}}
      loadBalancer:
        consistentHash: {httpHeaderName: X-User, ringHash: {minimumRingSize: 64}}
      tls:
        mode: MUTUAL
        clientCertificate: /etc/cert.pem
        privateKey: /etc/key.pem
        caCertificates: /etc/ca.pem
        subjectAltNames: [reviews.example]
        sni: reviews.example
"""

ROUTES = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1, port: {number: 9080}}, weight: 40}
    - {destination: {host: reviews, subset: v2, port: {number: 9080}}, weight: 40}
    - {destination: {host: reviews, port: {number: 9443}}, weight: 20}
"""


def clusters(text: str) -> tuple[dict[str, Cluster], list[m.DestinationRule]]:
    problems: list = []
    resources = load_text(text, "reviews.yaml", problems)
    assert not [p for p in problems if p.severity == "error"], problems
    snapshot = snapshot_of(resources)
    table, _ = compile_table(snapshot)
    (vhost,) = {id(v): v for v in table.exact.values()}.values()
    found = {}
    for route in vhost.routes:
        for dest in route.picker.choices:
            found[dest.cluster.name] = dest.cluster
    return found, list(snapshot.destination_rules)


def test_the_model_is_typed_with_durations_in_seconds() -> None:
    _, (rule,) = clusters(SERVICE + RULE + ROUTES)
    policy = rule.traffic_policy
    assert isinstance(policy, m.TrafficPolicy)
    assert policy.connection_pool == m.ConnectionPoolSettings(
        tcp=m.TCPSettings(max_connections=5, connect_timeout=0.25),
        http=m.HTTPSettings(http1_max_pending_requests=7, idle_timeout=90.0))
    assert policy.outlier_detection.interval == 5.0 and policy.outlier_detection.base_ejection_time == 60.0
    assert policy.port_level_settings[0].port == 9443
    v2 = rule.subsets[1].traffic_policy
    assert v2.load_balancer.consistent_hash == m.ConsistentHashLB(http_header_name="x-user", minimum_ring_size=64)


def test_subset_blocks_replace_the_rules_blocks_whole() -> None:
    found, _ = clusters(SERVICE + RULE + ROUTES)
    v1 = found["outbound|9080|v1|reviews.default.svc.cluster.local"].policy
    assert v1.lb == "RANDOM" and v1.hash is None
    assert (v1.pool.max_connections, v1.pool.connect_timeout, v1.pool.max_pending, v1.pool.idle_timeout) == \
        (5, 0.25, 7, 90.0)
    assert v1.outlier is not None and (v1.outlier.consecutive_5xx, v1.outlier.interval) == (3, 5.0)
    assert v1.retry_budget is not None and (v1.retry_budget.percent, v1.retry_budget.min_retry_concurrency) == (25.0, 4)
    assert v1.tls is None  # no tls at the rule level for port 9080
    v2 = found["outbound|9080|v2|reviews.default.svc.cluster.local"].policy
    assert v2.hash is not None and (v2.hash.source, v2.hash.name, v2.hash.size) == ("header", b"x-user", 64)
    # connectionPool from the subset replaces the rule's block: nothing of the rule's tcp/http limits stays
    assert (v2.pool.max_retries, v2.pool.max_connections, v2.pool.max_pending) == (2, UNLIMITED, UNLIMITED)
    assert v2.outlier == v1.outlier and v2.retry_budget == v1.retry_budget  # blocks the subset leaves out


def test_port_level_settings_apply_to_the_clusters_of_their_port_only() -> None:
    found, _ = clusters(SERVICE + RULE + ROUTES)
    admin = found["outbound|9443||reviews.default.svc.cluster.local"].policy
    assert admin.lb == "ROUND_ROBIN"
    # Istio's GetPortLevelTrafficPolicy: a block the port-level entry leaves out is the default, not the rule's
    assert admin.pool == DEFAULT_POLICY.pool and admin.outlier is None
    assert admin.tls == m.ClientTLSSettings(mode="SIMPLE", sni="admin.reviews", subject_alt_names=("spiffe://a/b",),
                                           ca_certificates="/etc/ca.pem")


def test_a_subsets_port_level_entry_replaces_all_four_blocks_of_the_merge() -> None:
    """Istio's MergeSubsetTrafficPolicy: with a port-level entry for the port, the subset's four blocks replace the
    rule's even where the entry leaves them out; elsewhere only the blocks the subset sets do."""
    rule = RULE.replace("""    labels: {version: v1}
""", """    labels: {version: v1}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        tls: {mode: DISABLE}
""")
    found, _ = clusters(SERVICE + rule + ROUTES)
    v1 = found["outbound|9080|v1|reviews.default.svc.cluster.local"].policy
    assert (v1.lb, v1.pool, v1.outlier, v1.tls) == ("LEAST_REQUEST", DEFAULT_POLICY.pool, None,
                                                    m.ClientTLSSettings(mode="DISABLE"))
    assert v1.retry_budget == found["outbound|9080|v2|reviews.default.svc.cluster.local"].policy.retry_budget


def test_tls_settings_are_typed_on_the_cluster() -> None:
    found, _ = clusters(SERVICE + RULE + ROUTES)
    assert found["outbound|9080|v2|reviews.default.svc.cluster.local"].policy.tls == m.ClientTLSSettings(
        mode="MUTUAL", sni="reviews.example", subject_alt_names=("reviews.example",), ca_certificates="/etc/ca.pem",
        client_certificate="/etc/cert.pem", private_key="/etc/key.pem")
    disabled, _ = clusters(SERVICE + RULE.replace("mode: MUTUAL", "mode: DISABLE") + ROUTES)
    # an explicit DISABLE is kept (it turns Istio's auto mTLS off); no tls at all is None
    assert disabled["outbound|9080|v2|reviews.default.svc.cluster.local"].policy.tls.mode == "DISABLE"
    by_number, _ = clusters(SERVICE + RULE.replace("mode: MUTUAL", "mode: 3") + ROUTES)  # proto JSON enum number
    assert by_number["outbound|9080|v2|reviews.default.svc.cluster.local"].policy.tls.mode == "ISTIO_MUTUAL"


@pytest.mark.parametrize("hashing, maglev, size", [
    ("{httpHeaderName: X-User, ringHash: {minimumRingSize: 64}}", False, 64),
    ("{httpCookie: {name: user}, maglev: {tableSize: 251}}", True, 251),
    ("{useSourceIp: true, maglev: {}}", True, 65537),
])
def test_the_hash_table_is_built_at_compile_and_used_as_is(hashing: str, maglev: bool, size: int) -> None:
    rule = RULE.replace("consistentHash: {httpHeaderName: X-User, ringHash: {minimumRingSize: 64}}",
                        f"consistentHash: {hashing}")
    found, _ = clusters(SERVICE + rule + ROUTES)
    cluster = found["outbound|9080|v2|reviews.default.svc.cluster.local"]
    table = cluster.hash_table
    assert table is not None and table.maglev is maglev
    assert len(table.owners) == size if maglev else len(table.points) == len(table.owners) >= size
    assert set(table.owners) == {0, 1}  # both v2 endpoints own part of it
    state = Clusters().state(cluster)
    assert state.policy is cluster.policy and cluster.hash_table is table  # nothing built on the data path
    picks = {state.pick(key, (), None, 0.0).endpoint for key in range(0, 2**64, 2**58)}  # type: ignore[arg-type]
    assert picks == set(cluster.endpoints)
    assert found["outbound|9080|v1|reviews.default.svc.cluster.local"].hash_table is None


def test_state_is_one_lookup_and_keeps_the_compiled_objects() -> None:
    found, _ = clusters(SERVICE + RULE + ROUTES)
    cluster = found["outbound|9080|v1|reviews.default.svc.cluster.local"]
    registry = Clusters()
    state = registry.state(cluster)
    assert registry.state(cluster) is state and state.policy is cluster.policy
    again, _ = clusters(SERVICE + RULE + ROUTES)  # a reload with the same config: same state, counters kept
    assert registry.state(again[cluster.name]) is state
    assert Cluster("c", "s", 80, "", ()).policy is DEFAULT_POLICY


def test_tls_is_not_silently_ignored_by_validate(tmp_path: Path) -> None:
    """Every mode works now: no warning for them; what is not implemented (credentialName) or invalid (MUTUAL
    without its key) is an error, and what ISTIO_MUTUAL ignores is said."""
    path = tmp_path / "reviews.yaml"
    path.write_text(SERVICE + RULE + ROUTES)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if "tls" in line] == []
    path.write_text(SERVICE + RULE.replace("        privateKey: /etc/key.pem\n", "        credentialName: cred\n")
                    + ROUTES)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:1: spec.subsets[1].trafficPolicy.tls.credentialName: credentialName (a Kubernetes secret) is " \
        "not implemented" in result.output
    path.write_text(SERVICE + RULE.replace("        privateKey: /etc/key.pem\n", "") + ROUTES)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert f"{path}:1: spec.subsets[1].trafficPolicy.tls.privateKey: private key required for mutual tls" \
        in result.output
    path.write_text(SERVICE + RULE.replace("mode: MUTUAL", "mode: ISTIO_MUTUAL") + ROUTES)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert f"{path}:1: spec.subsets[1].trafficPolicy.tls.clientCertificate: warning: ignored with ISTIO_MUTUAL" \
        in result.output


def test_each_regex_compiles_once_per_load(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = re2.compile

    def counting(pattern, *args):  # type: ignore[no-untyped-def]
        calls.append(pattern)
        return real(pattern, *args)

    monkeypatch.setattr(re2, "compile", counting)
    text = SERVICE + """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {regex: "/api/v[0-9]+/.*"}, headers: {x-id: {regex: "[a-f0-9]+"}}}]
    rewrite: {uriRegexRewrite: {match: "^/api/(.*)$", rewrite: "/\\\\1"}}
    corsPolicy: {allowOrigins: [{regex: "https://.*[.]example"}]}
    route: [{destination: {host: reviews}}]
"""
    problems: list = []
    compile_table(snapshot_of(load_text(text, "vs.yaml", problems)))
    assert not problems
    assert sorted(calls) == sorted(["/api/v[0-9]+/.*", "[a-f0-9]+", "^/api/(.*)$", "https://.*[.]example"])


def test_routing_imports_nothing_from_the_loader() -> None:
    routing = Path(__file__).resolve().parents[2] / "meshproxy" / "routing"
    for source in routing.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert not module.startswith(("istio.load", "istio.build", "istio.read", "istio.validate")), source
                assert module.split(".")[0] not in ("asyncio", "proxy"), source
            elif isinstance(node, ast.Import):
                assert all(a.name != "asyncio" for a in node.names), source


def test_run_refuses_tls_files_that_do_not_load(tmp_path: Path) -> None:
    """`meshproxy run` builds every cluster's TLS context at load: a missing file is an error naming its field."""
    from meshproxy.app import ProxyApp
    from meshproxy.istio.problems import ConfigError
    from meshproxy.settings import Settings

    path = tmp_path / "reviews.yaml"
    path.write_text(SERVICE + RULE + ROUTES)
    with pytest.raises(ConfigError) as caught:
        ProxyApp(Settings(config=(str(path),), admin=None))
    errors = [str(p) for p in caught.value.problems if p.severity == "error"]
    assert f"{path}:1: spec.trafficPolicy.portLevelSettings[0].tls.caCertificates: /etc/ca.pem: missing" in errors
    assert f"{path}:1: spec.subsets[1].trafficPolicy.tls.caCertificates: /etc/ca.pem: missing" in errors


def test_tunnel_and_proxy_protocol_are_warned_about_not_silently_ignored() -> None:
    problems: list = []
    load_text(RULE.replace("    retryBudget:", "    tunnel: {protocol: CONNECT, targetHost: h, targetPort: 1}\n"
                                               "    proxyProtocol: {version: V2}\n    retryBudget:"),
              "reviews.yaml", problems)
    assert [str(p) for p in problems if "not implemented: it is ignored" in p.message] == [
        "reviews.yaml:0: spec.trafficPolicy.tunnel: warning: tunnel is not implemented: it is ignored",
        "reviews.yaml:0: spec.trafficPolicy.proxyProtocol: warning: proxyProtocol is not implemented: it is ignored"]
