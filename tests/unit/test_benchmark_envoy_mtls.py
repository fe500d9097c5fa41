"""benchmarks/envoy_config.py renders a DestinationRule's ISTIO_MUTUAL and maxRequestsPerConnection as istiod
would for a sidecar (the mutual-TLS benchmark scenarios give Envoy its configuration from the same YAML that
meshproxy loads), and refuses what it does not translate rather than give Envoy a different configuration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# loaded by path: the benchmark modules are scripts, not a package, and sys.path stays as it is
_spec = importlib.util.spec_from_file_location("benchmark_envoy_config", BENCHMARKS / "envoy_config.py")
assert _spec is not None and _spec.loader is not None
envoy_config = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = envoy_config  # its dataclasses look their module up there
_spec.loader.exec_module(envoy_config)

SAMPLES = Path(__file__).resolve().parents[2] / "config" / "bookinfo"
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
SERVICE_ENTRY = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  subjectAltNames: [{REVIEWS_ID}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: 8001}}, labels: {{app: reviews, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: 8002}}, labels: {{app: reviews, version: v2}}}}
"""
ONE_REQUEST_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    connectionPool: {http: {maxRequestsPerConnection: 1}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {tls: {mode: DISABLE}}
"""


def clusters(tmp_path: Path, rules: str | Path) -> dict[str, Any]:
    entry = tmp_path / "se.yaml"
    entry.write_text(SERVICE_ENTRY)
    if isinstance(rules, str):
        (tmp_path / "dr.yaml").write_text(rules)
        rules = tmp_path / "dr.yaml"
    config = envoy_config.bootstrap([entry, rules], listen=("127.0.0.1", 15001), admin=("127.0.0.1", 15000),
                                    certs=envoy_config.CertDir(Path("/certs")))
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


def test_istio_mutual_from_istios_sample_becomes_istiods_upstream_tls_context(tmp_path: Path) -> None:
    found = clusters(tmp_path, SAMPLES / "destination-rule-all-mtls.yaml")
    tls = found["outbound|9080|v1|reviews.default.svc.cluster.local"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["istio-http/1.1", "istio", "http/1.1"]
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2",
                                    "tls_maximum_protocol_version": "TLSv1_3"}
    assert common["tls_certificates"] == [{"certificate_chain": {"filename": "/certs/cert-chain.pem"},
                                           "private_key": {"filename": "/certs/key.pem"}}]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": "/certs/root-cert.pem"},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": REVIEWS_ID}}]}
    default = found["outbound|9080||reviews.default.svc.cluster.local"]["transport_socket"]["typed_config"]
    assert default["sni"] == "outbound_.9080_._.reviews.default.svc.cluster.local"
    assert "typed_extension_protocol_options" not in found["outbound|9080|v1|reviews.default.svc.cluster.local"]


def test_a_subset_policy_refines_the_rules_and_max_requests_per_connection_is_rendered(tmp_path: Path) -> None:
    found = clusters(tmp_path, ONE_REQUEST_RULE)
    v1, v2 = (found[f"outbound|9080|{name}|reviews.default.svc.cluster.local"] for name in ("v1", "v2"))
    assert "transport_socket" in v1
    assert "transport_socket" not in v2  # the subset's DISABLE wins over the rule's ISTIO_MUTUAL
    for cluster in (v1, v2):  # the rule's connection pool is inherited
        options = cluster["typed_extension_protocol_options"][envoy_config.HTTP_PROTOCOL_OPTIONS_NAME]
        assert options["common_http_protocol_options"] == {"max_requests_per_connection": 1}


@pytest.mark.parametrize("policy", ["tls: {mode: SIMPLE}", "connectionPool: {tcp: {maxConnections: 1}}",
                                    "loadBalancer: {simple: ROUND_ROBIN}"])
def test_what_is_not_translated_is_refused(tmp_path: Path, policy: str) -> None:
    rule = f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\n" \
           f"spec:\n  host: reviews\n  trafficPolicy: {{{policy}}}\n"
    with pytest.raises(envoy_config.Untranslatable):
        clusters(tmp_path, rule)


def test_istio_mutual_without_certificates_is_refused(tmp_path: Path) -> None:
    entry = tmp_path / "se.yaml"
    entry.write_text(SERVICE_ENTRY)
    with pytest.raises(envoy_config.Untranslatable, match="ISTIO_MUTUAL needs"):
        envoy_config.bootstrap([entry, SAMPLES / "destination-rule-all-mtls.yaml"], listen=("127.0.0.1", 1),
                               admin=("127.0.0.1", 2))
