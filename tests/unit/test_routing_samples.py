"""Istio's Bookinfo VirtualServices routed with the walkthrough's requests (current, 1.5.0 and 1.0.0 files).

Each config is the Bookinfo services (ServiceEntries with labelled endpoints, as
`meshproxy demo` runs them) + that release's destination-rule-all.yaml + one
VirtualService file; requests go through the compiled table as the data path
sends them, and weighted splits are checked over 10,000 seeded picks (+-3 points).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from meshproxy.demo.topology import services_yaml
from meshproxy.http1.head import build_request_head
from meshproxy.messages import RequestHead
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.istio.problems import Problem
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.policy import Route
from meshproxy.routing.table import RouteTable

from harness import LEGACY, SAMPLES

RELEASES = {"current": SAMPLES, "1.5.0": LEGACY / "istio-1.5.0", "1.0.0": LEGACY / "istio-1.0.0"}
SPLIT_PICKS = 10_000
TOLERANCE = 3.0  # percentage points


def compile_files(folder: Path, *names: str, identity: Identity = Identity()) -> tuple[RouteTable, list[Problem]]:
    """As `kubectl apply -f` of each file in turn: a later resource with the same kind/namespace/name
    replaces the earlier one (virtual-service-reviews-test-v2.yaml replaces all-v1's `reviews`)."""
    problems: list[Problem] = []
    resources = {r.meta.key: r for r in load_text(services_yaml(), "services.yaml", problems)}
    for name in ("destination-rule-all.yaml", *names):
        path = folder / name
        resources.update((r.meta.key, r) for r in load_text(path.read_text(), str(path), problems))
    assert [str(p) for p in problems if p.severity == "error"] == []
    return compile_table(snapshot_of(resources.values()), identity)


def request(host: str, path: str = "/", user: str | None = None) -> RequestHead:
    headers = [(b"host", host.encode())]
    if user is not None:
        headers.append((b"end-user", user.encode()))  # productpage forwards the logged-in user
    return build_request_head(b"GET", path.encode(), headers, "1.1", True)


def routed(table: RouteTable, req: RequestHead) -> Route:
    route, _ = table.match(req)
    assert route is not None, req
    vhost, port = table.virtual_host(req.authority)
    assert vhost.scan(req, port) is route
    return route


def subset_of(table: RouteTable, host: str, user: str | None = None, path: str = "/") -> str:
    route = routed(table, request(f"{host}:9080", path, user))
    (dest,) = route.picker.choices
    assert dest.cluster is not None and dest.host == f"{host}.default.svc.cluster.local"
    return dest.subset


def shares(table: RouteTable, host: str, seed: int = 1) -> dict[str, float]:
    route = routed(table, request(f"{host}:9080"))
    rng = random.Random(seed)
    req = request(f"{host}:9080")
    counts = Counter(route.pick(req, rng.randrange).subset for _ in range(SPLIT_PICKS))
    return {subset: 100 * n / SPLIT_PICKS for subset, n in counts.items()}


releases = pytest.mark.parametrize("release", list(RELEASES))


def test_the_three_releases_have_the_walkthrough_files():
    for folder in RELEASES.values():
        assert (folder / "virtual-service-reviews-test-v2.yaml").is_file()
        assert (folder / "destination-rule-all.yaml").is_file()


@releases
def test_all_v1(release):
    table, warnings = compile_files(RELEASES[release], "virtual-service-all-v1.yaml")
    assert warnings == []
    for host in ("productpage", "reviews", "ratings", "details"):
        for user in (None, "jason"):
            assert subset_of(table, host, user) == "v1"


@releases
def test_reviews_test_v2_jason_gets_v2_everyone_else_v1(release):
    table, warnings = compile_files(RELEASES[release], "virtual-service-all-v1.yaml",
                                    "virtual-service-reviews-test-v2.yaml")
    assert warnings == []
    assert subset_of(table, "reviews", "jason") == "v2"
    assert subset_of(table, "reviews", "jason", "/reviews/0?x=1") == "v2"
    for user in (None, "", "Jason", "jason2", "alice"):
        assert subset_of(table, "reviews", user) == "v1", user
    route = routed(table, request("reviews:9080", "/reviews/0", "jason"))
    assert (route.virtual_service, route.index) == ("default/reviews", 0)
    assert subset_of(table, "ratings", "jason") == "v1"  # the rest of all-v1 still applies


@releases
def test_reviews_jason_v2_everyone_else_v3(release):
    table, _ = compile_files(RELEASES[release], "virtual-service-reviews-jason-v2-v3.yaml")
    assert subset_of(table, "reviews", "jason") == "v2"
    assert subset_of(table, "reviews", "bob") == "v3"
    assert subset_of(table, "reviews") == "v3"


@releases
def test_reviews_v3(release):
    table, _ = compile_files(RELEASES[release], "virtual-service-reviews-v3.yaml")
    assert subset_of(table, "reviews") == subset_of(table, "reviews", "jason") == "v3"


@releases
def test_details_v2(release):
    table, _ = compile_files(RELEASES[release], "virtual-service-details-v2.yaml")
    assert subset_of(table, "details") == "v2"


SPLITS = [
    ("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
    ("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
    ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10}),
    ("virtual-service-reviews-v2-v3.yaml", {"v2": 50, "v3": 50}),
]


@releases
@pytest.mark.parametrize(("name", "expected"), SPLITS, ids=[n for n, _ in SPLITS])
def test_weighted_splits(release, name, expected):
    table, _ = compile_files(RELEASES[release], name)
    got = shares(table, "reviews")
    assert set(got) == set(expected)
    for subset, share in expected.items():
        assert abs(got[subset] - share) <= TOLERANCE, got


@releases
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_splits_hold_for_other_seeds(release, seed):
    table, _ = compile_files(RELEASES[release], "virtual-service-reviews-90-10.yaml")
    assert abs(shares(table, "reviews", seed)["v1"] - 90) <= TOLERANCE


@releases
def test_ratings_delay_for_jason_only(release):
    table, _ = compile_files(RELEASES[release], "virtual-service-ratings-test-delay.yaml")
    jason = routed(table, request("ratings:9080", "/ratings/0", "jason"))
    assert (jason.fault.delay, jason.fault.delay_per_million) == (7.0, 1_000_000)
    assert jason.picker.choices[0].subset == "v1"
    other = routed(table, request("ratings:9080", "/ratings/0", "alice"))
    assert not other.fault.active and other.picker.choices[0].subset == "v1"


@releases
def test_ratings_abort_for_jason_only(release):
    table, _ = compile_files(RELEASES[release], "virtual-service-ratings-test-abort.yaml")
    jason = routed(table, request("ratings:9080", "/ratings/0", "jason"))
    assert (jason.fault.abort_status, jason.fault.abort_per_million) == (500, 1_000_000)
    other = routed(table, request("ratings:9080", "/ratings/0"))
    assert not other.fault.active


@releases
@pytest.mark.parametrize(("name", "ratings"), [("virtual-service-ratings-db.yaml", "v2"),
                                                ("virtual-service-ratings-mysql.yaml", "v2-mysql"),
                                                ("virtual-service-ratings-mysql-vm.yaml", "v2-mysql-vm")])
def test_ratings_databases(release, name, ratings):
    table, _ = compile_files(RELEASES[release], name)
    assert subset_of(table, "reviews") == "v3"
    assert subset_of(table, "ratings") == ratings
    (dest,) = routed(table, request("ratings:9080")).picker.choices
    assert dest.cluster.endpoints == ()  # no such workload in the demo: 503 UH, not NR


def test_fault_injection_details_v1_aborts_555():
    table, warnings = compile_files(SAMPLES, "fault-injection-details-v1.yaml")
    route = routed(table, request("details:9080", "/details/0"))
    assert (route.index, route.fault.abort_status, route.picker.choices[0].subset) == (0, 555, "v1")
    assert [w.path for w in warnings if "never matches" in w.message] == ["spec.http[1]"]


@releases
def test_bookinfo_gateway(release):
    identity = Identity(name="istio-ingressgateway", namespace="default", labels={"istio": "ingressgateway"},
                        gateways=("bookinfo-gateway",))
    table, _ = compile_files(RELEASES[release], "bookinfo-gateway.yaml", identity=identity)
    static = ["/static/bootstrap.css", "/staticx"]
    routed_paths = ["/productpage", "/login", "/logout", "/api/v1/products", "/api/v1/products/0/reviews",
                    "/productpage?u=normal", "/static/../productpage"]
    not_routed = ["/", "/productpage/x", "/Productpage", "/api/v1/product", "/loginx"]
    if release == "1.0.0":
        not_routed += static  # the 1.0 gateway rule had no `prefix: /static`
    else:
        routed_paths += static
    for path in routed_paths:
        route = routed(table, request("bookinfo.example.com", path))
        dest = route.picker.choices[0]
        assert (dest.host, dest.cluster.port) == ("productpage.default.svc.cluster.local", 9080), path
    for path in not_routed:
        assert table.match(request("bookinfo.example.com", path))[0] is None, path
    # A sidecar does not get the gateway's rule: its hosts are only the services.
    sidecar, _ = compile_files(RELEASES[release], "bookinfo-gateway.yaml")
    assert sidecar.match(request("bookinfo.example.com", "/productpage"))[0] is None


@releases
def test_every_virtual_service_file_compiles_and_routes(release):
    folder = RELEASES[release]
    names = sorted(p.name for p in folder.glob("*.yaml") if "VirtualService" in p.read_text()
                   and p.name not in ("bookinfo-gateway.yaml", "certmanager-gateway.yaml"))
    assert len(names) >= 14
    for name in names:
        table, _ = compile_files(folder, name)
        text = (folder / name).read_text()
        for host in ("productpage", "reviews", "ratings", "details"):
            if f"host: {host}" in text:
                for user in (None, "jason"):
                    route = routed(table, request(f"{host}:9080", "/", user))
                    assert route.virtual_service.startswith("default/"), (name, host)


@releases
def test_egress_google_apis(release):
    folder = RELEASES[release]
    table, _ = compile_files(folder, "egress-rule-google-apis.yaml")
    route = table.match(request("www.googleapis.com", "/books/v1/volumes"))[0]
    assert route is not None
    if "VirtualService" in (folder / "egress-rule-google-apis.yaml").read_text():
        assert route.picker.choices[0].cluster.port == 443  # port 80 routed to 443 for TLS origination
        assert table.match(request("www.googleapis.com:443", "/"))[0] is None  # `match: port 80` only: 404 NR
