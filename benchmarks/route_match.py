"""Route-match cost per request: the compiled matcher (path index) against a linear scan.

    python benchmarks/route_match.py [--quick]

Tables of 10, 100, 1,000 and 10,000 routes in one virtual host where only the last
route matches the request:

* exact:  routes `uri: {exact: /r0}` .. `/r<N-1>`, request `/r<N-1>`;
* prefix: routes `uri: {prefix: /r0/}` .. `/r<N-1>/`, request `/r<N-1>/item/7`;
* exact+header: like exact, and every route also requires `end-user: exact jason`
  (the index narrows by path; the header is tested on the one candidate).

Both sides run the same compiled RouteMatch objects; "linear scan" is VirtualHost.scan
(declaration order, first match), "compiled" is VirtualHost.match (the path index). A second table measures small hosts
(1..16 routes, a Bookinfo-gateway-like mix) to choose table.LINEAR_SCAN_MAX, the size up
to which VirtualHost.match scans. Figures are ns per match: the best of 5 timeit repeats.
Not a test: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshproxy.http1.head import RequestHead, build_request_head  # noqa: E402
from meshproxy.istio import model as m  # noqa: E402
from meshproxy.routing.match import compile_match  # noqa: E402
from meshproxy.routing.policy import ACTION_DIRECT_RESPONSE, Route  # noqa: E402
from meshproxy.routing.table import LINEAR_SCAN_MAX, VirtualHost  # noqa: E402
from meshproxy.routing.trie import PathIndex  # noqa: E402

SIZES = (10, 100, 1_000, 10_000)
HEADERS = [(b"host", b"svc.default.svc.cluster.local"), (b"user-agent", b"bench/1.0"), (b"accept", b"*/*"),
           (b"x-request-id", b"8d6f7a9c-3a4b-4c5d-9e8f-0a1b2c3d4e5f"), (b"end-user", b"jason")]


def route_of(i: int, block: m.HTTPMatchRequest) -> Route:
    return Route(name=f"r{i}", virtual_service="default/bench", index=i, match=compile_match(block),
                 action=ACTION_DIRECT_RESPONSE, picker=None, direct_status=200)


def table(kind: str, n: int) -> tuple[VirtualHost, RequestHead]:
    jason = (("end-user", m.StringMatch("exact", "jason")),)
    if kind == "exact":
        blocks = [m.HTTPMatchRequest(uri=m.StringMatch("exact", f"/r{i}")) for i in range(n)]
        target = f"/r{n - 1}"
    elif kind == "prefix":
        blocks = [m.HTTPMatchRequest(uri=m.StringMatch("prefix", f"/r{i}/")) for i in range(n)]
        target = f"/r{n - 1}/item/7"
    else:
        blocks = [m.HTTPMatchRequest(uri=m.StringMatch("exact", f"/r{i}"), headers=jason) for i in range(n)]
        target = f"/r{n - 1}"
    vhost = VirtualHost("svc.default.svc.cluster.local", ("svc",), tuple(route_of(i, b) for i, b in enumerate(blocks)))
    return vhost, build_request_head(b"GET", target.encode(), list(HEADERS), "1.1", True)


def small_table(n: int) -> tuple[VirtualHost, list[RequestHead]]:
    """Bookinfo-gateway-like: exact and prefix paths alternating; one request for each route."""
    blocks, targets = [], []
    for i in range(n):
        if i % 2 == 0:
            blocks.append(m.HTTPMatchRequest(uri=m.StringMatch("exact", f"/page{i}")))
            targets.append(f"/page{i}")
        else:
            blocks.append(m.HTTPMatchRequest(uri=m.StringMatch("prefix", f"/api/v{i}/items")))
            targets.append(f"/api/v{i}/items/7")
    vhost = VirtualHost("svc", ("svc",), tuple(route_of(i, b) for i, b in enumerate(blocks)))
    return vhost, [build_request_head(b"GET", t.encode(), list(HEADERS), "1.1", True) for t in targets]


def measure_small(n: int, budget: int) -> tuple[float, float, float, float]:
    """(scan, index) for the request that takes the last route, then averaged over one request per route."""
    vhost, reqs = small_table(n)
    routes = vhost.routes
    index = PathIndex([r.match for r in routes])
    for i, req in enumerate(reqs):
        assert vhost.scan(req, 80) is routes[i] and index.first(req, 80) == i
    last = reqs[-1]

    def scan_all() -> None:
        for req in reqs:
            vhost.scan(req, 80)

    def index_all() -> None:
        for req in reqs:
            index.first(req, 80)

    number = max(200, budget // 10)
    return (ns_per_call(lambda: vhost.scan(last, 80), number), ns_per_call(lambda: index.first(last, 80), number),
            ns_per_call(scan_all, number // n) / n, ns_per_call(index_all, number // n) / n)


def ns_per_call(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def measure(vhost: VirtualHost, req: RequestHead, budget: int) -> tuple[float, float]:
    """(linear scan, VirtualHost.match) in ns for a request only the last route matches."""
    last = vhost.routes[-1]
    assert vhost.index is not None, "more routes than LINEAR_SCAN_MAX: match uses the path index"
    assert vhost.scan(req, 80) is last and vhost.match(req, 80) is last
    n = len(vhost.routes)
    return (ns_per_call(lambda: vhost.scan(req, 80), max(5, budget // n)),
            ns_per_call(lambda: vhost.match(req, 80), max(1_000, budget // 10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    budget = 20_000 if args.quick else 200_000
    print(f"route match, ns per request (best of 5); Python {platform.python_version()}, {platform.machine()}")
    print()
    print(f"{'variant':<14}{'routes':>8}{'linear scan':>14}{'compiled':>12}{'speed-up':>10}")
    for kind in ("exact", "prefix", "exact+header"):
        for n in SIZES:
            vhost, req = table(kind, n)
            scan, indexed = measure(vhost, req, budget)
            print(f"{kind:<14}{n:>8}{scan:>14,.0f}{indexed:>12,.0f}{scan / indexed:>9.1f}x")
    print()
    print(f"small hosts: one request per route; VirtualHost.match scans up to LINEAR_SCAN_MAX = {LINEAR_SCAN_MAX}")
    print(f"{'routes':>8}{'scan, last':>12}{'index, last':>13}{'scan, mean':>12}{'index, mean':>13}")
    for n in (1, 2, 4, 6, 8, 10, 12, 16):
        scan_last, index_last, scan_mean, index_mean = measure_small(n, budget)
        print(f"{n:>8}{scan_last:>12,.0f}{index_last:>13,.0f}{scan_mean:>12,.0f}{index_mean:>13,.0f}")


if __name__ == "__main__":
    main()
