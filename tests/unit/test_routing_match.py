"""Route matching as Istio/Envoy: YAML snippet + request -> route, destination, subset, policy.

Every case runs twice: through VirtualHost.match (what the data path calls) and
through a PathIndex over the same routes, which must agree with the linear scan.
The traps have their own cases: query strings, dot-segments, RE2 full match,
ignoreUriCase not applying to regex, presence vs empty, withoutHeaders with a
missing header, a header sent on several lines, weight 0, one destination.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter

import pytest

from meshproxy.demo.topology import services_yaml
from meshproxy.http1.head import build_request_head
from meshproxy.messages import RequestHead
from meshproxy.istio import model as m
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.istio.problems import Problem
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.match import compile_match
from meshproxy.routing.policy import (
    DEFAULT_RETRY,
    NO_FAULT,
    RETRY_ON_5XX,
    RETRY_ON_CONNECT_FAILURE,
    Route,
    StickyKey,
    cookie_value,
)
from meshproxy.routing.table import LINEAR_SCAN_MAX, RouteTable, VirtualHost
from meshproxy.routing.trie import NO_ROUTE, PathIndex, PrefixTrie

# --------------------------------------------------------------------------- builders

REVIEWS_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def vs(http: str, *, name: str = "reviews", hosts: str = "[reviews]", extra: str = "", metadata: str = "") -> str:
    """A VirtualService whose `http:` list is the given YAML (dedented)."""
    body = textwrap.indent(textwrap.dedent(http).strip(), "  ")
    meta = f"metadata:\n  name: {name}\n" + (textwrap.indent(textwrap.dedent(metadata).strip(), "  ") + "\n" if metadata else "")
    extra = textwrap.indent(textwrap.dedent(extra).strip(), "  ") + "\n" if extra else ""
    return f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n{meta}spec:\n  hosts: {hosts}\n{extra}  http:\n{body}\n"


def routes_for(matches: list[str]) -> str:
    """One HTTPRoute per entry, all to reviews v1: "*" = no match (catch-all), else the `match:` flow list."""
    lines = []
    for flow in matches:
        if flow != "*":
            lines.append(f"- match: {flow}")
            lines.append("  route: [{destination: {host: reviews, subset: v1}}]")
        else:
            lines.append("- route: [{destination: {host: reviews, subset: v1}}]")
    return "\n".join(lines)


def compile_texts(*texts: str, identity: Identity = Identity()) -> tuple[RouteTable, list[Problem]]:
    problems: list[Problem] = []
    resources = []
    for i, text in enumerate(texts):
        resources += load_text(text, f"{i}.yaml", problems)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert errors == []
    table, warnings = compile_table(snapshot_of(resources), identity)
    return table, [p for p in problems if p.severity == "warning"] + warnings


def table_for(http: str, **kwargs: object) -> RouteTable:
    table, _ = compile_texts(services_yaml(), REVIEWS_DR, vs(http, **kwargs))  # type: ignore[arg-type]
    return table


def request(target: str = "/", *headers: str, method: str = "GET", host: str = "reviews:9080") -> RequestHead:
    """`headers` as 'Name: value' lines, in order; names are lower-cased as the HTTP/1 parser does."""
    lines = [(b"host", host.encode())] if host else []
    for line in headers:
        name, _, value = line.partition(":")
        lines.append((name.strip().lower().encode(), value.strip().encode()))
    return build_request_head(method.encode(), target.encode(), lines, "1.1", True)


def route_of(table: RouteTable, req: RequestHead) -> Route | None:
    """The data path's answer, checked against the path index and the linear scan."""
    route, port = table.match(req)
    vhost, _ = table.virtual_host(req.authority)
    if vhost is not None:
        assert route is vhost.scan(req, port)
        first = PathIndex([r.match for r in vhost.routes]).first(req, port)
        assert (None if first == NO_ROUTE else vhost.routes[first]) is route
    return route


# --------------------------------------------------------------------------- the match table

# (case id, one `match:` flow list per HTTPRoute ("*" = none), request, index of the winning HTTPRoute or None: 404 NR)
CASES: list[tuple[str, list[str], RequestHead, int | None]] = [
    # first match in declaration order; entries OR; conditions inside one entry AND
    ("first of two matching routes wins", ["[{uri: {prefix: /a}}]", "[{uri: {exact: /a/b}}]"], request("/a/b"), 0),
    ("catch-all before a specific route wins", ["*", "[{uri: {exact: /a}}]"], request("/a"), 0),
    ("no route: 404", ["[{uri: {exact: /a}}]"], request("/b"), None),
    ("match entries OR: second entry", ["[{uri: {exact: /a}}, {uri: {exact: /b}}]"], request("/b"), 0),
    ("conditions AND: both hold", ["[{uri: {prefix: /a}, method: {exact: POST}}]"], request("/a", method="POST"), 0),
    ("conditions AND: one fails", ["[{uri: {prefix: /a}, method: {exact: POST}}]", "*"], request("/a"), 1),
    ("empty match entry is a catch-all", ["[{}]"], request("/anything"), 0),
    # uri exact / prefix / regex
    ("uri exact", ["[{uri: {exact: /a}}]"], request("/a"), 0),
    ("uri exact is not a prefix", ["[{uri: {exact: /a}}]"], request("/ab"), None),
    ("uri prefix has no segment boundary", ["[{uri: {prefix: /static}}]"], request("/staticfoo"), 0),
    ("uri prefix", ["[{uri: {prefix: /api/v1/products}}]"], request("/api/v1/products/7"), 0),
    ("uri prefix too long", ["[{uri: {prefix: /api/v1/products}}]"], request("/api/v1"), None),
    ("uri regex", ["[{uri: {regex: '/api/v[0-9]+/.*'}}]"], request("/api/v2/x"), 0),
    ("uri {} matches every path", ["[{uri: {}}]"], request("/x"), 0),
    # trap: the query string is not part of the uri
    ("trap: exact ignores the query", ["[{uri: {exact: /a}}]"], request("/a?x=1"), 0),
    ("trap: prefix with ? never matches", ["[{uri: {prefix: '/a?x'}}]"], request("/a?x=1"), None),
    ("trap: regex sees no query", ["[{uri: {regex: '/a'}}]"], request("/a?b=c"), 0),
    ("trap: regex cannot match the query", ["[{uri: {regex: '/a\\?.*'}}]"], request("/a?b=c"), None),
    ("trap: fragment is not the path", ["[{uri: {exact: /a}}]"], request("/a#top"), 0),
    # trap: dot-segments are removed before matching
    ("trap: dot-dot segment", ["[{uri: {exact: /b}}]"], request("/a/../b"), 0),
    ("trap: dot segment", ["[{uri: {exact: /a/b}}]"], request("/a/./b"), 0),
    ("trap: dot-dot escapes a prefix", ["[{uri: {prefix: /public}}]", "[{uri: {prefix: /admin}}]"],
     request("/public/../admin/x"), 1),
    ("trap: dot-dot above the root", ["[{uri: {exact: /a}}]"], request("/../../a"), 0),
    # trap: RE2 full match
    ("trap: regex is a full match, not a search", ["[{uri: {regex: '/a'}}]"], request("/ab"), None),
    ("trap: regex unanchored still full", ["[{uri: {regex: 'a'}}]"], request("/a"), None),
    ("trap: regex .* completes it", ["[{uri: {regex: '/a.*'}}]"], request("/ab"), 0),
    # ignoreUriCase: exact and prefix only
    ("ignoreUriCase exact", ["[{uri: {exact: /Reviews}, ignoreUriCase: true}]"], request("/REVIEWS"), 0),
    ("ignoreUriCase prefix", ["[{uri: {prefix: /API}, ignoreUriCase: true}]"], request("/api/x"), 0),
    ("without ignoreUriCase case matters", ["[{uri: {exact: /Reviews}}]"], request("/reviews"), None),
    ("trap: ignoreUriCase does not apply to regex", ["[{uri: {regex: '/A'}, ignoreUriCase: true}]"], request("/a"), None),
    ("regex (?i) is the way", ["[{uri: {regex: '(?i)/A'}}]"], request("/a"), 0),
    # method / authority / scheme
    ("method exact", ["[{method: {exact: POST}}]"], request("/", method="POST"), 0),
    ("method is case-sensitive", ["[{method: {exact: post}}]"], request("/", method="POST"), None),
    ("method regex full", ["[{method: {regex: 'GET|HEAD'}}]"], request("/", method="HEAD"), 0),
    ("method prefix", ["[{method: {prefix: P}}]"], request("/", method="PUT"), 0),
    ("authority exact with port", ["[{authority: {exact: 'reviews:9080'}}]"], request("/"), 0),
    ("authority exact without port does not match host:port", ["[{authority: {exact: reviews}}]"], request("/"), None),
    ("authority prefix", ["[{authority: {prefix: reviews}}]"], request("/"), 0),
    ("authority regex", ["[{authority: {regex: 'reviews(:[0-9]+)?'}}]"], request("/", host="reviews"), 0),
    ("scheme http", ["[{scheme: {exact: http}}]"], request("/"), 0),
    ("scheme https never on plaintext", ["[{scheme: {exact: https}}]"], request("/"), None),
    # headers
    ("header exact", ["[{headers: {end-user: {exact: jason}}}]"], request("/", "end-user: jason"), 0),
    ("header value is case-sensitive", ["[{headers: {end-user: {exact: jason}}}]"], request("/", "end-user: Jason"), None),
    ("header name is case-insensitive", ["[{headers: {End-User: {exact: jason}}}]"], request("/", "END-USER: jason"), 0),
    ("header prefix", ["[{headers: {x-v: {prefix: ab}}}]"], request("/", "x-v: abc"), 0),
    ("header regex full match", ["[{headers: {x-v: {regex: 'a+'}}}]"], request("/", "x-v: aab"), None),
    ("header regex (?i)", ["[{headers: {end-user: {regex: '(?i)JASON'}}}]"], request("/", "end-user: jason"), 0),
    ("header missing", ["[{headers: {end-user: {exact: jason}}}]"], request("/"), None),
    ("trap: presence {} holds for an empty value", ["[{headers: {x: {}}}]"], request("/", "x:"), 0),
    ("trap: presence {} fails when missing", ["[{headers: {x: {}}}]"], request("/"), None),
    ("trap: exact '' holds for an empty value", ["[{headers: {x: {exact: ''}}}]"], request("/", "x:"), 0),
    ("trap: exact '' fails when missing", ["[{headers: {x: {exact: ''}}}]"], request("/"), None),
    ("regex '*' is presence (Istio)", ["[{headers: {x: {regex: '*'}}}]"], request("/", "x: anything"), 0),
    ("several lines: any value, first", ["[{headers: {x: {exact: a}}}]"], request("/", "x: a", "x: b"), 0),
    ("several lines: any value, second", ["[{headers: {x: {exact: b}}}]"], request("/", "x: a", "x: b"), 0),
    ("several lines are not joined", ["[{headers: {x: {exact: 'a,b'}}}]"], request("/", "x: a", "x: b"), None),
    ("two header conditions AND", ["[{headers: {a: {exact: '1'}, b: {exact: '2'}}}]"], request("/", "a: 1", "b: 3"), None),
    # pseudo-header keys read the request line and Host; HTTP/1 has no such header lines
    (":method key", ["[{headers: {':method': {exact: POST}}}]"], request("/", method="POST"), 0),
    (":method key mismatch", ["[{headers: {':method': {exact: POST}}}]"], request("/"), None),
    (":authority key reads Host", ["[{headers: {':authority': {prefix: reviews}}}]"], request("/"), 0),
    (":scheme key", ["[{headers: {':scheme': {exact: http}}}]"], request("/"), 0),
    (":path key includes the query", ["[{headers: {':path': {exact: '/a?x=1'}}}]"], request("/a?x=1"), 0),
    (":path key prefix", ["[{headers: {':path': {prefix: /a}}}]"], request("/a/b"), 0),
    (":path key is normalized", ["[{headers: {':path': {exact: /b}}}]"], request("/a/../b"), 0),
    ("withoutHeaders :method", ["[{withoutHeaders: {':method': {exact: GET}}}]"], request("/"), None),
    ("withoutHeaders :method other", ["[{withoutHeaders: {':method': {exact: GET}}}]"], request("/", method="PUT"), 0),
    ("key 'method' in headers is ignored", ["[{headers: {method: {exact: POST}}}]"], request("/"), 0),
    ("key 'uri' in headers is ignored", ["[{headers: {uri: {exact: /x}}}]"], request("/y"), 0),
    # withoutHeaders
    ("withoutHeaders exact: other value", ["[{withoutHeaders: {end-user: {exact: jason}}}]"], request("/", "end-user: bob"), 0),
    ("withoutHeaders exact: the value", ["[{withoutHeaders: {end-user: {exact: jason}}}]"], request("/", "end-user: jason"), None),
    ("trap: withoutHeaders, missing header matches", ["[{withoutHeaders: {end-user: {exact: jason}}}]"], request("/"), 0),
    ("trap: withoutHeaders exact '', missing counts as ''", ["[{withoutHeaders: {x: {exact: ''}}}]"], request("/"), None),
    ("trap: withoutHeaders regex .*, missing counts as ''", ["[{withoutHeaders: {x: {regex: '.*'}}}]"], request("/"), None),
    ("withoutHeaders prefix, missing", ["[{withoutHeaders: {x: {prefix: a}}}]"], request("/"), 0),
    ("withoutHeaders {} = absent: missing", ["[{withoutHeaders: {x: {}}}]"], request("/"), 0),
    ("withoutHeaders {} = absent: present", ["[{withoutHeaders: {x: {}}}]"], request("/", "x:"), None),
    ("withoutHeaders, any line matching excludes", ["[{withoutHeaders: {x: {exact: b}}}]"], request("/", "x: a", "x: b"), None),
    # queryParams
    ("query exact", ["[{queryParams: {v: {exact: '2'}}}]"], request("/?v=2"), 0),
    ("query exact mismatch", ["[{queryParams: {v: {exact: '2'}}}]"], request("/?v=22"), None),
    ("query missing", ["[{queryParams: {v: {exact: '2'}}}]"], request("/?w=2"), None),
    ("query regex full", ["[{queryParams: {v: {regex: '[0-9]'}}}]"], request("/?v=12"), None),
    ("query presence", ["[{queryParams: {debug: {}}}]"], request("/?a=1&debug"), 0),
    ("query exact '' matches ?key", ["[{queryParams: {debug: {exact: ''}}}]"], request("/?debug"), 0),
    ("query prefix", ["[{queryParams: {v: {prefix: be}}}]"], request("/?v=beta"), 0),
    ("query first value of a repeat", ["[{queryParams: {v: {exact: '1'}}}]"], request("/?v=1&v=2"), 0),
    ("query later value of a repeat", ["[{queryParams: {v: {exact: '2'}}}]"], request("/?v=1&v=2"), None),
    ("trap: query values are not percent-decoded", ["[{queryParams: {u: {exact: 'a b'}}}]"], request("/?u=a%20b"), None),
    ("query raw value as sent", ["[{queryParams: {u: {exact: 'a%20b'}}}]"], request("/?u=a%20b"), 0),
    ("query is not the uri", ["[{uri: {exact: /p}, queryParams: {v: {exact: '1'}}}]"], request("/p?v=1"), 0),
    # port (of the authority; 80 when absent)
    ("port from Host", ["[{port: 9080}]"], request("/"), 0),
    ("port mismatch", ["[{port: 9080}]"], request("/", host="reviews:9081"), None),
    ("port default 80", ["[{port: 80}]"], request("/", host="reviews"), 0),
]


@pytest.mark.parametrize(("matches", "req", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_match_table(matches, req, expected):
    table = table_for(routes_for(matches))
    route = route_of(table, req)
    assert (route.index if route is not None else None) == expected
    if route is not None:
        assert route.virtual_service == "default/reviews"


def test_every_case_has_a_unique_id():
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("matches", "req", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_explain_agrees_with_matches(matches, req, expected):
    table = table_for(routes_for(matches))
    vhost, port = table.virtual_host(req.authority)
    for route in vhost.routes:
        reason = route.match.explain(req, port)
        assert (reason is None) == route.match.matches(req, port), reason


# --------------------------------------------------------------------------- proxy-side selection (config time)

SOURCE_CASES = [
    # (id, match flow, identity, applies?)
    ("sourceLabels subset of the proxy's", "[{sourceLabels: {app: productpage}}]",
     Identity(labels={"app": "productpage", "version": "v1"}), True),
    ("sourceLabels not the proxy's", "[{sourceLabels: {app: productpage}}]", Identity(labels={"app": "reviews"}), False),
    ("sourceLabels, proxy without labels", "[{sourceLabels: {app: productpage}}]", Identity(), False),
    ("sourceNamespace equal", "[{sourceNamespace: default}]", Identity(namespace="default"), True),
    ("sourceNamespace other", "[{sourceNamespace: prod}]", Identity(namespace="default"), False),
    ("sourceLabels and sourceNamespace", "[{sourceLabels: {app: a}, sourceNamespace: default}]",
     Identity(labels={"app": "a"}), True),
    ("match gateways: mesh", "[{gateways: [mesh]}]", Identity(), True),
    ("match gateways: a gateway only", "[{gateways: [bookinfo-gateway]}]", Identity(), False),
    ("match gateways decide, labels not looked at", "[{gateways: [mesh], sourceLabels: {app: x}}]", Identity(), True),
]


@pytest.mark.parametrize(("flow", "identity", "applies"), [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_source_selection_is_per_proxy_not_per_request(flow, identity, applies):
    http = routes_for([flow]).replace("subset: v1", "subset: v2") + "\n" + routes_for(["*"])
    table, _ = compile_texts(services_yaml(), REVIEWS_DR, vs(http), identity=identity)
    route = route_of(table, request("/"))
    assert route.picker.choices[0].subset == ("v2" if applies else "v1")


def test_gateways_default_to_mesh_and_a_gateway_only_rule_is_not_on_sidecars():
    gw = """\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          selector: {istio: ingressgateway}
          servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
        """
    only_gw = vs(routes_for(["*"]).replace("v1", "v3"), extra="gateways: [gw]")
    sidecar, _ = compile_texts(services_yaml(), REVIEWS_DR, textwrap.dedent(gw), only_gw)
    route = route_of(sidecar, request("/"))
    assert route.virtual_service == "" and route.name == "default"  # the service's default route
    gateway, _ = compile_texts(services_yaml(), REVIEWS_DR, textwrap.dedent(gw), only_gw,
                               identity=Identity(gateways=("gw",)))
    assert route_of(gateway, request("/")).picker.choices[0].subset == "v3"
    both = vs(routes_for(["*"]).replace("v1", "v2"), extra="gateways: [gw, mesh]")
    table, _ = compile_texts(services_yaml(), REVIEWS_DR, textwrap.dedent(gw), both)
    assert route_of(table, request("/")).picker.choices[0].subset == "v2"


# --------------------------------------------------------------------------- hosts

def test_host_lookup_exact_then_longest_wildcard_then_none():
    texts = [services_yaml(), REVIEWS_DR]
    for name, host in (("a", "api.example.com"), ("b", "*.example.com"), ("c", "*.b.example.com")):
        texts.append(vs(f"- route: [{{destination: {{host: reviews, subset: v1}}}}]\n  name: {name}",
                        name=name, hosts=f"['{host}']"))
    table, _ = compile_texts(*texts)
    assert route_of(table, request("/", host="api.example.com")).name == "a"
    assert route_of(table, request("/", host="API.Example.com:8080")).name == "a"
    assert route_of(table, request("/", host="x.example.com")).name == "b"
    assert route_of(table, request("/", host="x.b.example.com")).name == "c"
    assert route_of(table, request("/", host="x.y.b.example.com")).name == "c"
    assert route_of(table, request("/", host="example.com")) is None
    assert route_of(table, request("/", host="reviews")).name == "default"


# --------------------------------------------------------------------------- destinations and weights

def picks(route: Route, n: int = 10_000, seed: int = 7) -> Counter[str]:
    rng = random.Random(seed)
    req = request("/")
    return Counter(route.pick(req, rng.randrange).subset for _ in range(n))


WEIGHT_CASES = [
    # (id, route list (flow), expected shares in %)
    ("single destination", "[{destination: {host: reviews, subset: v2}}]", {"v2": 100}),
    ("trap: one destination with any weight", "[{destination: {host: reviews, subset: v2}, weight: 30}]", {"v2": 100}),
    ("trap: weight 0 never picked", "[{destination: {host: reviews, subset: v1}, weight: 100},"
                                    " {destination: {host: reviews, subset: v2}, weight: 0}]", {"v1": 100}),
    ("50/50", "[{destination: {host: reviews, subset: v1}, weight: 50},"
              " {destination: {host: reviews, subset: v3}, weight: 50}]", {"v1": 50, "v3": 50}),
    ("80/20", "[{destination: {host: reviews, subset: v1}, weight: 80},"
              " {destination: {host: reviews, subset: v2}, weight: 20}]", {"v1": 80, "v2": 20}),
    ("weights need not sum to 100", "[{destination: {host: reviews, subset: v1}, weight: 1},"
                                    " {destination: {host: reviews, subset: v2}, weight: 3}]", {"v1": 25, "v2": 75}),
    ("three ways", "[{destination: {host: reviews, subset: v1}, weight: 20},"
                   " {destination: {host: reviews, subset: v2}, weight: 30},"
                   " {destination: {host: reviews, subset: v3}, weight: 50}]", {"v1": 20, "v2": 30, "v3": 50}),
]


@pytest.mark.parametrize(("flow", "shares"), [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_weighted_destinations(flow, shares):
    route = route_of(table_for(f"- route: {flow}"), request("/"))
    counts = picks(route)
    assert set(counts) == set(shares)
    for subset, share in shares.items():
        assert abs(100 * counts[subset] / 10_000 - share) <= 3, counts


def test_envoy_pick_is_random_mod_total_over_cumulative_ranges():
    route = route_of(table_for("""\
        - route:
          - {destination: {host: reviews, subset: v1}, weight: 80}
          - {destination: {host: reviews, subset: v2}, weight: 20}
        """), request("/"))
    assert route.picker.total == 100 and route.picker.upper_bounds == (80, 100)
    req = request("/")
    assert route.pick(req, lambda total: 0).subset == "v1"
    assert route.pick(req, lambda total: 79).subset == "v1"
    assert route.pick(req, lambda total: 80).subset == "v2"
    assert route.pick(req, lambda total: 99).subset == "v2"


def test_destination_cluster_endpoints_and_port():
    route = route_of(table_for("- route: [{destination: {host: reviews, subset: v2, port: {number: 9080}}}]"), request("/"))
    dest = route.picker.choices[0]
    assert (dest.host, dest.subset) == ("reviews.default.svc.cluster.local", "v2")
    assert dest.cluster.name == "outbound|9080|v2|reviews.default.svc.cluster.local"
    assert [e.labels["version"] for e in dest.cluster.endpoints] == ["v2"]


# --------------------------------------------------------------------------- sticky weighted pick (meshproxy extension)

STICKY_HTTP = """\
- route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v2}, weight: 10}
"""


def sticky_route(annotation: str) -> Route:
    return route_of(table_for(STICKY_HTTP, metadata=f"annotations: {{{annotation}}}"), request("/"))


def test_sticky_header_keeps_one_user_on_one_version():
    route = sticky_route("meshproxy.io/sticky-header: End-User")
    assert route.sticky == StickyKey("header", b"end-user")
    rng = random.Random(1)
    for user in ("jason", "alice", "bob", "carol"):
        req = request("/", f"end-user: {user}")
        assert len({route.pick(req, rng.randrange).subset for _ in range(200)}) == 1, user


def test_sticky_hash_spreads_users_by_the_weights():
    route = sticky_route("meshproxy.io/sticky-header: end-user")
    never = lambda total: pytest.fail("a request with the key must not use the random pick")  # noqa: E731
    counts = Counter(route.pick(request("/", f"end-user: user{i}"), never).subset for i in range(10_000))
    assert abs(counts["v1"] / 100 - 90) <= 3 and abs(counts["v2"] / 100 - 10) <= 3, counts


def test_sticky_hash_is_stable_across_processes():
    # blake2b, not Python's salted hash(): a fixed key has a fixed destination everywhere.
    from meshproxy.routing.policy import sticky_hash

    assert sticky_hash(b"jason") == int.from_bytes(__import__("hashlib").blake2b(b"jason", digest_size=8).digest(), "big")


def test_sticky_without_the_key_falls_back_to_the_random_pick():
    route = sticky_route("meshproxy.io/sticky-header: end-user")
    counts = picks(route)
    assert abs(counts["v1"] / 100 - 90) <= 3


def test_sticky_cookie():
    route = sticky_route("meshproxy.io/sticky-cookie: session")
    assert route.sticky == StickyKey("cookie", b"session")
    rng = random.Random(2)
    a = {route.pick(request("/", "cookie: theme=dark; session=abc123"), rng.randrange).subset for _ in range(100)}
    b = {route.pick(request("/", 'cookie: session="abc123"'), rng.randrange).subset for _ in range(100)}
    assert len(a) == 1 and a == b


@pytest.mark.parametrize(("lines", "name", "expected"), [
    (["cookie: a=1; b=2"], b"b", b"2"),
    (["cookie: a=1", "cookie: b=2"], b"b", b"2"),
    (["cookie: ab=1; b=2"], b"b", b"2"),
    (["cookie: a=1"], b"b", None),
    (["cookie: b="], b"b", b""),
    (["x-cookie: b=1"], b"b", None),
])
def test_cookie_value(lines, name, expected):
    assert cookie_value(request("/", *lines).headers, name) == expected


def test_sticky_annotation_problems_are_warnings():
    http = STICKY_HTTP
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR,
                                vs(http, metadata="annotations: {meshproxy.io/sticky-header: 'bad name', meshproxy.io/stiky: x}"))
    messages = {w.path: w.message for w in warnings}
    assert "is not a valid header name" in messages["metadata.annotations.meshproxy.io/sticky-header"]
    assert "unknown meshproxy annotation" in messages["metadata.annotations.meshproxy.io/stiky"]
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR,
                                vs("- route: [{destination: {host: reviews, subset: v1}}]",
                                   metadata="annotations: {meshproxy.io/sticky-cookie: s}"))
    assert [w.message for w in warnings] == ["no route of this VirtualService has several destinations: nothing to keep sticky"]


def test_sticky_on_a_single_destination_route_is_not_set():
    route = route_of(table_for("- route: [{destination: {host: reviews, subset: v1}}]",
                               metadata="annotations: {meshproxy.io/sticky-header: end-user}"), request("/"))
    assert route.sticky is None


# --------------------------------------------------------------------------- route policy

POLICY_CASES = [
    # (id, extra HTTPRoute YAML lines, check)
    ("no timeout by default", "", lambda r: r.timeout is None),
    ("timeout", "timeout: 1.5s", lambda r: r.timeout == 1.5),
    ("default retries", "", lambda r: r.retry is DEFAULT_RETRY),
    ("retries", "retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,connect-failure'}",
     lambda r: (r.retry.num_retries, r.retry.per_try_timeout, r.retry.retry_on)
     == (3, 2.0, RETRY_ON_5XX | RETRY_ON_CONNECT_FAILURE)),
    ("retries attempts 0: none", "retries: {attempts: 0}", lambda r: r.retry.num_retries == 0),
    ("no fault", "", lambda r: r.fault is NO_FAULT),
    ("fault abort", "fault: {abort: {httpStatus: 503, percentage: {value: 50}}}",
     lambda r: (r.fault.abort_status, r.fault.abort_per_million) == (503, 500_000)),
    ("fault delay", "fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}",
     lambda r: (r.fault.delay, r.fault.delay_per_million) == (7.0, 1_000_000)),
    ("request header set", "headers: {request: {set: {x-a: '1'}}}",
     lambda r: r.picker.choices[0].request_headers.set == ((b"x-a", b"1"),)),
    ("route name", "name: canary", lambda r: r.name == "canary"),
]


@pytest.mark.parametrize(("extra", "check"), [c[1:] for c in POLICY_CASES], ids=[c[0] for c in POLICY_CASES])
def test_route_policy(extra, check):
    http = "- route: [{destination: {host: reviews, subset: v1}}]" + (f"\n  {extra}" if extra else "")
    route = route_of(table_for(http), request("/"))
    assert check(route)


def test_match_name_is_appended_to_the_route_name():
    table = table_for("- name: r\n  match: [{name: jason, headers: {end-user: {exact: jason}}}, {uri: {prefix: /x}}]\n"
                      "  route: [{destination: {host: reviews, subset: v2}}]")
    assert route_of(table, request("/", "end-user: jason")).name == "r.jason"
    assert route_of(table, request("/x")).name == "r"


def test_redirect_and_direct_response_routes():
    table = table_for("""\
        - match: [{uri: {exact: /old}}]
          redirect: {uri: /new, redirectCode: 302}
        - match: [{uri: {exact: /gone}}]
          directResponse: {status: 410, body: {string: bye}}
        """)
    assert route_of(table, request("/old")).redirect.code == 302
    gone = route_of(table, request("/gone"))
    assert (gone.direct_status, gone.direct_body) == (410, b"bye")


# --------------------------------------------------------------------------- conflicts reported at load

def test_two_virtual_services_for_one_host_warn_naming_both():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for(["*"]), name="first"),
                                vs(routes_for(["*"]), name="second"))
    (warning,) = [w for w in warnings if "also claimed" in w.message]
    assert (warning.file, warning.path) == ("3.yaml", "spec.hosts[0]")
    assert "default/first (2.yaml:0)" in warning.message


def test_route_after_a_catch_all_warns_naming_both():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for(["*", "[{uri: {exact: /a}}]"])))
    assert [(w.path, w.message) for w in warnings] == [
        ("spec.http[1]", "never matches: spec.http[0] before it matches every request")]


def test_prefix_slash_alone_is_a_catch_all():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for(["[{uri: {prefix: /}}]", "*"])))
    assert [w.path for w in warnings] == ["spec.http[1]"]


def test_a_block_with_the_conditions_of_an_earlier_one_warns():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for([
        "[{uri: {exact: /a}, headers: {x: {exact: '1'}}}]", "[{uri: {exact: /b}}, {headers: {x: {exact: '1'}}, uri: {exact: /a}}]"])))
    assert [(w.path, w.message) for w in warnings] == [
        ("spec.http[1].match[1]", "never matches: spec.http[0].match[0] before it has the same conditions")]


def test_no_warning_for_routes_that_can_match():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for(["[{uri: {exact: /a}}]", "[{uri: {prefix: /a}}]", "*"])))
    assert warnings == []


def test_ignored_header_keys_warn():
    _, warnings = compile_texts(services_yaml(), REVIEWS_DR, vs(routes_for(["[{headers: {method: {exact: POST}}}]"])))
    assert [w.path for w in warnings] == ["spec.http[0].match[0].headers.method"]
    assert "Istio ignores the header key 'method'" in warnings[0].message


def test_a_header_name_istio_rejects_is_a_load_error():
    problems: list[Problem] = []
    load_text(vs(routes_for(["[{headers: {'bad name': {exact: x}}}]"])), "bad.yaml", problems)
    assert [(p.path, p.severity) for p in problems] == [("spec.http[0].match[0].headers.bad name", "error")]


# --------------------------------------------------------------------------- the path index

def test_trie_prefixes_of_a_path():
    trie = PrefixTrie()
    for i, key in enumerate([b"/", b"/api", b"/api/v1", b"/apx", b"/api/v1/products", b"/static"]):
        trie.insert(key, i)
    trie.insert(b"/api", 9)
    assert trie.prefixes_of(b"/api/v1/products/7") == [
        (b"/", (0,)), (b"/api", (1, 9)), (b"/api/v1", (2,)), (b"/api/v1/products", (4,))]
    assert trie.prefixes_of(b"/ap") == [(b"/", (0,))]
    assert trie.prefixes_of(b"/apx") == [(b"/", (0,)), (b"/apx", (3,))]
    assert trie.prefixes_of(b"x") == []


def test_virtual_host_uses_the_index_above_the_threshold():
    small = table_for(routes_for(["[{uri: {exact: /a}}]"] * LINEAR_SCAN_MAX))
    assert small.virtual_host(b"reviews")[0].index is None
    big = table_for(routes_for([f"[{{uri: {{exact: /r{i}}}}}]" for i in range(LINEAR_SCAN_MAX + 1)]))
    vhost = big.virtual_host(b"reviews")[0]
    assert vhost.index is not None
    assert route_of(big, request(f"/r{LINEAR_SCAN_MAX}")).index == LINEAR_SCAN_MAX


def test_index_returns_the_lowest_declaration_index_across_sources():
    matches = ["[{uri: {prefix: /a}, headers: {x: {exact: '1'}}}]",  # 0: prefix, fails on header
               "[{uri: {regex: '/a.*'}}]",  # 1: always a candidate
               "[{uri: {exact: /a/b}}]",  # 2: exact
               "[{uri: {prefix: /a/}}]",  # 3: prefix
               "*"] + ["[{uri: {exact: /z}}]"] * 8
    table = table_for(routes_for(matches))
    assert table.virtual_host(b"reviews")[0].index is not None
    assert route_of(table, request("/a/b")).index == 1
    assert route_of(table, request("/a/b", "x: 1")).index == 0
    assert route_of(table, request("/b")).index == 4


PATHS = [b"/", b"/a", b"/ab", b"/a/b", b"/A/b", b"/api", b"/api/v1", b"/API/V1/x", b"/b", b"/ba", b"/a/b/c", b"/abc"]


def random_block(rng: random.Random) -> m.HTTPMatchRequest:
    kind = rng.choice(["exact", "prefix", "prefix", "regex", None])
    uri = None
    if kind == "regex":
        uri = m.StringMatch("regex", rng.choice(["/a.*", "/[ab]+", ".*b", "/api/v[0-9]"]))
    elif kind is not None:
        uri = m.StringMatch(kind, rng.choice(PATHS).decode())
    headers = ()
    if rng.random() < 0.3:
        headers = (("x", rng.choice([m.StringMatch("exact", "1"), m.StringMatch("present"), m.StringMatch("prefix", "2")])),)
    without = (("y", m.StringMatch("exact", "1")),) if rng.random() < 0.15 else ()
    method = m.StringMatch("exact", "POST") if rng.random() < 0.15 else None
    return m.HTTPMatchRequest(uri=uri, headers=headers, without_headers=without, method=method,
                              ignore_uri_case=kind in ("exact", "prefix", "regex") and rng.random() < 0.3,
                              port=rng.choice([None, None, None, 9080, 80]))


def random_request(rng: random.Random) -> tuple[RequestHead, int]:
    path = rng.choice(PATHS) + rng.choice([b"", b"", b"x", b"/", b"/y"])
    if rng.random() < 0.2:
        path = path.upper()
    lines = [f"{name}: {rng.choice('123')}" for name in ("x", "y") if rng.random() < 0.5]
    return request(path.decode(), *lines, method=rng.choice(["GET", "POST"])), rng.choice([80, 9080])


def test_path_index_agrees_with_a_linear_scan_on_random_tables():
    rng = random.Random(20261124)
    for _ in range(400):
        blocks = [random_block(rng) for _ in range(rng.randint(1, 40))]
        routes = tuple(Route(name=f"r{i}", virtual_service="t/t", index=i, match=compile_match(b), action=2, picker=None)
                       for i, b in enumerate(blocks))
        vhost = VirtualHost("t", ("t",), routes)
        index = PathIndex([r.match for r in routes])
        for _ in range(30):
            req, port = random_request(rng)
            expected = vhost.scan(req, port)
            first = index.first(req, port)
            assert (None if first == NO_ROUTE else routes[first]) is expected, (blocks, req.path)
            assert vhost.match(req, port) is expected


def test_index_cost_does_not_grow_with_routes_whose_paths_cannot_match():
    """Counted, not timed: how many matchers are tested for a request only the last route takes. Each route's
    remaining condition is its method, so the request's method is read once per matcher tested."""
    calls = Counter()

    class CountingRequest:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        @property
        def method(self):
            calls["n"] += 1
            return self.inner.method

    for n in (10, 1_000):
        blocks = [m.HTTPMatchRequest(uri=m.StringMatch("prefix", f"/r{i}/"), method=m.StringMatch("exact", "GET"))
                  for i in range(n)]
        index = PathIndex([compile_match(b) for b in blocks])
        calls.clear()
        assert index.first(CountingRequest(request(f"/r{n - 1}/x")), 80) == n - 1
        assert calls["n"] == 1
