"""Istio's own Bookinfo YAML (current, 1.5.0 and 1.0.0 releases) loads, with the values Istio reads from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.istio import model as m
from meshproxy.istio.load import load
from meshproxy.istio.problems import ConfigError
from meshproxy.routing.compile import Identity, compile_table

from harness import ISTIO_CORPUS, ISTIO_CURRENT, LEGACY, SAMPLES

# Istio's sample files by their path in Istio's layout (networking files at the top, legacy/ releases below):
# the current networking files are config/bookinfo/, the others tests/corpus/istio-samples/.
ISTIO_FILES = {p.name: p for p in ISTIO_CURRENT} | {"swagger.yaml": ISTIO_CORPUS / "swagger.yaml"} | {
    p.relative_to(ISTIO_CORPUS).as_posix(): p for p in LEGACY.rglob("*.yaml")}
NOT_CONFIG = {"swagger.yaml"}  # an OpenAPI document, not a Kubernetes resource
ALL_FILES = sorted(name for name in ISTIO_FILES if name not in NOT_CONFIG)
CURRENT = ISTIO_CURRENT
LEGACY_1_0 = LEGACY / "istio-1.0.0"
LEGACY_1_5 = LEGACY / "istio-1.5.0"


def sample(name: str) -> Path:
    return ISTIO_FILES[name]


def load_one(name: str | Path) -> m.Snapshot:
    return load([name if isinstance(name, Path) else sample(name)]).snapshot


def counts(snapshot: m.Snapshot) -> tuple[int, int, int, int]:
    return (len(snapshot.virtual_services), len(snapshot.destination_rules),
            len(snapshot.service_entries), len(snapshot.gateways))


def test_the_sample_folders_are_there():
    assert len(CURRENT) == 23  # 21 networking files + bookinfo.yaml + bookinfo-versions.yaml
    assert len(list(LEGACY_1_0.glob("*.yaml"))) == 20
    assert len(list(LEGACY_1_5.glob("*.yaml"))) == 21


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_sample_file_loads(name):
    result = load([sample(name)])
    warnings = [str(w) for w in result.warnings]
    if name.startswith("legacy/istio-1.0.0/virtual-service-ratings-test-"):
        assert len(warnings) == 1 and "percent: warning: deprecated" in warnings[0]
    else:  # tls modes (destination-rule-all-mtls.yaml, egress-rule-google-apis.yaml) load without a word now
        assert warnings == []


def test_swagger_is_not_a_kubernetes_resource():
    with pytest.raises(ConfigError) as info:
        load([sample("swagger.yaml")])
    assert [(p.doc, p.path, p.severity) for p in info.value.problems] == [(0, "apiVersion", "error")]
    assert "not a Kubernetes resource" in info.value.problems[0].message


# (file, (VirtualService, DestinationRule, ServiceEntry, Gateway))
COUNTS = [
    ("bookinfo.yaml", (0, 0, 0, 0)),  # Services, ServiceAccounts and Deployments only: skipped
    ("bookinfo-versions.yaml", (0, 0, 0, 0)),
    ("bookinfo-gateway.yaml", (1, 0, 0, 1)),
    ("certmanager-gateway.yaml", (1, 0, 0, 1)),
    ("destination-rule-all.yaml", (0, 4, 0, 0)),
    ("destination-rule-all-mtls.yaml", (0, 4, 0, 0)),
    ("destination-rule-reviews.yaml", (0, 1, 0, 0)),
    ("egress-rule-google-apis.yaml", (1, 1, 1, 0)),
    ("fault-injection-details-v1.yaml", (1, 1, 0, 0)),
    ("virtual-service-all-v1.yaml", (4, 0, 0, 0)),
    ("virtual-service-ratings-db.yaml", (2, 0, 0, 0)),
    ("virtual-service-reviews-80-20.yaml", (1, 0, 0, 0)),
    ("legacy/istio-1.0.0/egress-rule-google-apis.yaml", (0, 1, 1, 0)),
    ("legacy/istio-1.0.0/virtual-service-all-v1.yaml", (4, 0, 0, 0)),
    ("legacy/istio-1.5.0/egress-rule-google-apis.yaml", (1, 1, 1, 0)),
]


@pytest.mark.parametrize(("name", "expected"), COUNTS, ids=[n for n, _ in COUNTS])
def test_resource_counts(name, expected):
    assert counts(load_one(name)) == expected


def test_bookinfo_platform_file_is_skipped_document_by_document():
    text = sample("bookinfo.yaml").read_text()
    kinds = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("kind:")]
    assert sorted(set(kinds)) == ["Deployment", "Service", "ServiceAccount"]
    assert len(kinds) == 14
    snapshot = load_one("bookinfo.yaml")
    assert counts(snapshot) == (0, 0, 0, 0)
    assert snapshot.files == (str(sample("bookinfo.yaml")),)


def test_destination_rule_all_subsets():
    rules = {r.meta.name: r for r in load_one("destination-rule-all.yaml").destination_rules}
    assert sorted(rules) == ["details", "productpage", "ratings", "reviews"]
    assert rules["reviews"].host == "reviews"
    assert [(s.name, dict(s.labels)) for s in rules["reviews"].subsets] == [
        ("v1", {"version": "v1"}), ("v2", {"version": "v2"}), ("v3", {"version": "v3"})]
    assert [s.name for s in rules["ratings"].subsets] == ["v1", "v2", "v2-mysql", "v2-mysql-vm"]


def test_destination_rule_all_mtls_keeps_its_traffic_policy():
    rules = {r.meta.name: r for r in load_one("destination-rule-all-mtls.yaml").destination_rules}
    assert rules["reviews"].traffic_policy == m.TrafficPolicy(tls=m.ClientTLSSettings(mode="ISTIO_MUTUAL"))


def test_bookinfo_gateway_and_its_virtual_service():
    snapshot = load_one("bookinfo-gateway.yaml")
    (gateway,) = snapshot.gateways
    (vs,) = snapshot.virtual_services
    assert (gateway.meta.name, dict(gateway.selector)) == ("bookinfo-gateway", {"istio": "ingressgateway"})
    assert gateway.servers[0].port == m.ServicePort(8080, "HTTP", "http")
    assert (gateway.servers[0].hosts, gateway.servers[0].tls) == (("*",), None)
    assert vs.hosts == ("*",)
    assert vs.gateways == ("bookinfo-gateway",)
    (route,) = vs.http
    assert [mr.uri for mr in route.match] == [
        m.StringMatch("exact", "/productpage"), m.StringMatch("prefix", "/static"), m.StringMatch("exact", "/login"),
        m.StringMatch("exact", "/logout"), m.StringMatch("prefix", "/api/v1/products")]
    assert route.route == (m.HTTPRouteDestination(m.Destination("productpage", port=9080)),)


def test_bookinfo_gateway_port_changed_from_80_to_8080():
    for folder, port in ((LEGACY_1_0, 80), (LEGACY_1_5, 80), (SAMPLES, 8080)):
        (gateway,) = load([folder / "bookinfo-gateway.yaml"]).snapshot.gateways
        assert gateway.servers[0].port.number == port


# ---------------------------------------------------------------- typed values


def only_vs(name: str | Path) -> m.VirtualService:
    (vs,) = load_one(name).virtual_services
    return vs


@pytest.mark.parametrize("folder", [SAMPLES, LEGACY_1_5, LEGACY_1_0], ids=["current", "1.5.0", "1.0.0"])
def test_ratings_test_delay_is_7s_for_every_request_of_jason(folder):
    vs = only_vs(folder / "virtual-service-ratings-test-delay.yaml")
    first, rest = vs.http
    assert first.match[0].headers == (("end-user", m.StringMatch("exact", "jason")),)
    assert first.fault == m.HTTPFaultInjection(delay=m.Delay(fixed_delay=7.0, percentage=100.0))
    assert first.route == (m.HTTPRouteDestination(m.Destination("ratings", "v1")),)
    assert rest.match == () and rest.fault is None


@pytest.mark.parametrize("folder", [SAMPLES, LEGACY_1_5, LEGACY_1_0], ids=["current", "1.5.0", "1.0.0"])
def test_ratings_test_abort_is_500_for_every_request_of_jason(folder):
    vs = only_vs(folder / "virtual-service-ratings-test-abort.yaml")
    first, _ = vs.http
    assert first.fault == m.HTTPFaultInjection(abort=m.Abort(http_status=500, percentage=100.0))


@pytest.mark.parametrize("kind", ["delay", "abort"])
def test_istio_1_0_integer_percent_warns_and_gives_the_same_fault(kind):
    old = load([LEGACY_1_0 / f"virtual-service-ratings-test-{kind}.yaml"])
    new = load([SAMPLES / f"virtual-service-ratings-test-{kind}.yaml"])
    assert [(w.path, w.severity) for w in old.warnings] == [(f"spec.http[0].fault.{kind}.percent", "warning")]
    assert "deprecated" in old.warnings[0].message and "percentage" in old.warnings[0].message
    assert new.warnings == []
    old_fault = old.snapshot.virtual_services[0].http[0].fault
    new_fault = new.snapshot.virtual_services[0].http[0].fault
    assert old_fault == new_fault
    assert getattr(old_fault, kind).percentage == 100.0


def test_reviews_80_20_weights():
    (route,) = only_vs("virtual-service-reviews-80-20.yaml").http
    assert [(d.destination.host, d.destination.subset, d.weight) for d in route.route] == [
        ("reviews", "v1", 80), ("reviews", "v2", 20)]


@pytest.mark.parametrize(("name", "weights"), [
    ("virtual-service-reviews-90-10.yaml", [("v1", 90), ("v2", 10)]),
    ("virtual-service-reviews-50-v3.yaml", [("v1", 50), ("v3", 50)]),
    ("virtual-service-reviews-v2-v3.yaml", [("v2", 50), ("v3", 50)]),
    ("virtual-service-reviews-v3.yaml", [("v3", 0)]),
])
def test_reviews_weights(name, weights):
    (route,) = only_vs(name).http
    assert [(d.destination.subset, d.weight) for d in route.route] == weights


def test_reviews_test_v2_matches_end_user_jason():
    vs = only_vs("virtual-service-reviews-test-v2.yaml")
    jason, everyone = vs.http
    assert jason.match == (m.HTTPMatchRequest(headers=(("end-user", m.StringMatch("exact", "jason")),)),)
    assert jason.route[0].destination == m.Destination("reviews", "v2")
    assert everyone.match == ()
    assert everyone.route[0].destination == m.Destination("reviews", "v1")


def test_details_fault_injection_aborts_555_and_shadows_its_second_route():
    snapshot = load_one("fault-injection-details-v1.yaml")
    (vs,) = snapshot.virtual_services
    faulty, shadowed = vs.http
    assert faulty.match == () and faulty.fault == m.HTTPFaultInjection(abort=m.Abort(http_status=555, percentage=100.0))
    assert shadowed.fault is None
    # Istio's file has a catch-all before another route: istioctl-analyze-style warning.
    _, warnings = compile_table(snapshot, Identity())
    shadow = [w for w in warnings if "never matches" in w.message]
    assert [(w.doc, w.path) for w in shadow] == [(0, "spec.http[1]")]


def test_egress_google_apis_service_entry():
    snapshot = load_one("egress-rule-google-apis.yaml")
    (entry,) = snapshot.service_entries
    assert entry.hosts == ("www.googleapis.com",)
    assert entry.resolution == "DNS"
    assert entry.ports == (m.ServicePort(80, "HTTP", "http"), m.ServicePort(443, "HTTPS", "https"))
    (vs,) = snapshot.virtual_services
    assert vs.http[0].match[0].port == 80
    assert vs.http[0].route[0].destination == m.Destination("www.googleapis.com", port=443)


# ---------------------------------------------------------------- the whole set, compiled

SERVICE_ENTRIES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: productpage}
spec:
  hosts: [productpage.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.10, labels: {app: productpage, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details}
spec:
  hosts: [details.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.20, labels: {app: details, version: v1}}
  - {address: 10.0.0.21, labels: {app: details, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.31, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.32, labels: {app: reviews, version: v2}}
  - {address: 10.0.0.33, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.41, labels: {app: ratings, version: v1}}
  - {address: 10.0.0.42, labels: {app: ratings, version: v2}}
"""


@pytest.fixture
def service_entries(tmp_path: Path) -> Path:
    path = tmp_path / "service-entries.yaml"
    path.write_text(SERVICE_ENTRIES)
    return path


def test_all_current_files_with_service_entries_load_and_compile(service_entries):
    result = load([*CURRENT, service_entries])
    snapshot = result.snapshot
    # Files applied in order, as `kubectl apply -f` one after another: a later resource replaces
    # the one of the same kind/namespace/name, and says so.
    assert [w for w in result.warnings if ".tls" in w.path] == []  # every tls mode of the set is implemented
    replaced = result.warnings
    assert all(w.path == "metadata.name" and "replaces" in w.message for w in replaced)
    assert len(replaced) == 23
    assert {(vs.meta.name, Path(vs.meta.origin.file).name) for vs in snapshot.virtual_services} >= {
        ("reviews", "virtual-service-reviews-v3.yaml"), ("ratings", "virtual-service-ratings-test-delay.yaml"),
        ("details", "virtual-service-details-v2.yaml"), ("bookinfo", "bookinfo-gateway.yaml")}
    assert counts(snapshot) == (7, 5, 5, 2)

    table, warnings = compile_table(snapshot, Identity(namespace="default"))
    # The one real cross-reference problem of this set: details-v2 routes to subset v2, but the
    # later fault-injection-details-v1.yaml replaced DestinationRule `details` with one defining v1 only.
    assert [(Path(w.file).name, w.path) for w in warnings] == [
        ("virtual-service-details-v2.yaml", "spec.http[0].route[0].destination.subset")]
    assert "subset 'v2' is not defined by DestinationRule default/details" in warnings[0].message
    assert "fault-injection-details-v1.yaml:1" in warnings[0].message
    vhost, _ = table.virtual_host(b"reviews:9080")
    assert vhost.name == "reviews.default.svc.cluster.local"
    (route,) = vhost.routes
    (dest,) = route.picker.choices
    assert (dest.subset, [e.address for e in dest.cluster.endpoints]) == ("v3", ["10.0.0.33"])
    ratings, _ = table.virtual_host(b"ratings")
    assert [r.fault.delay for r in ratings.routes] == [7.0, 0.0]
    # The gateway-only VirtualService is not part of a sidecar's table...
    assert table.virtual_host(b"anything.example.com")[0] is None
    # ...but it is the ingress gateway's.
    ingress, warnings = compile_table(snapshot, Identity(namespace="default", gateways=("bookinfo-gateway",)))
    assert warnings == []
    assert ingress.virtual_host(b"bookinfo.example.com")[0].routes[0].virtual_service == "default/bookinfo"


@pytest.mark.parametrize("folder", [LEGACY_1_0, LEGACY_1_5], ids=["1.0.0", "1.5.0"])
def test_legacy_folders_load_whole(folder):
    result = load([folder])
    assert all(w.severity == "warning" for w in result.warnings)
    assert len(result.snapshot.files) == len(list(folder.glob("*.yaml")))
