"""Transparent connections by original destination, tcp: and tls: routes (routing/l4.py, compiled at load)."""

from __future__ import annotations

import random
from collections import Counter

from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.routing import protocol as p
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.l4 import BLACKHOLE, PASSTHROUGH, REGISTRY_ONLY, Destinations
from meshproxy.routing.passthrough import transparent_table

CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  addresses: [10.0.0.10]
  location: MESH_INTERNAL
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}, {number: 8080, name: http-admin}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, labels: {version: v1}}
  - {address: 10.1.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: data}
spec:
  host: db.data.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  tcp:
  - match: [{port: 5432, sourceLabels: {app: canary}}]
    route: [{destination: {host: db.data.svc.cluster.local, subset: v2}}]
  - match: [{port: 5432, destinationSubnets: [10.0.0.0/24]}]
    route:
    - {destination: {host: db.data.svc.cluster.local, subset: v1}, weight: 75}
    - {destination: {host: db.data.svc.cluster.local, subset: v2}, weight: 25}
  - route: [{destination: {host: db.data.svc.cluster.local, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nets, namespace: data}
spec:
  hosts: [nets.internal]
  addresses: [192.168.0.0/16, 192.168.7.0/24]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: data}
spec:
  hosts: ["*.wikipedia.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure, namespace: data}
spec:
  hosts: [secure.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints: [{address: 10.3.0.1}, {address: 10.3.0.2, labels: {version: b}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: secure, namespace: data}
spec:
  host: secure.example.com
  subsets: [{name: b, labels: {version: b}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: data}
spec:
  hosts: [secure.example.com]
  tls:
  - match: [{sniHosts: [secure.example.com], port: 443}]
    route: [{destination: {host: secure.example.com, subset: b}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nameless, namespace: data}
spec:
  hosts: [nameless.data.svc.cluster.local]
  addresses: [10.0.0.20]
  ports: [{number: 7000, name: main}]
  resolution: STATIC
  endpoints: [{address: 10.4.0.1}]
"""


def destinations(identity: Identity = Identity(namespace="data")) -> Destinations:
    problems: list = []
    table, _ = compile_table(snapshot_of(load_text(CONFIG, "l4.yaml", problems)), identity)
    assert [p for p in problems if p.severity == "error"] == []
    assert table.destinations is not None
    return table.destinations


def test_find_by_vip_cidr_endpoint_and_port() -> None:
    d = destinations()
    vip = d.find("10.0.0.10", 5432)
    assert vip is not None and vip.service == "db.data.svc.cluster.local" and vip.protocol == p.TCP
    assert not vip.original_destination and vip.cluster is not None and len(vip.cluster.endpoints) == 2
    assert d.find("10.0.0.10", 8080).protocol == p.HTTP  # the port name, as a Kubernetes Service's
    assert d.find("10.0.0.10", 9999) is None
    # the longest prefix wins among CIDR addresses; both name the same service here
    assert d.find("192.168.7.9", 9000).service == "nets.internal"
    assert d.find("192.169.0.1", 9000) is None
    by_endpoint = d.find("10.1.0.2", 5432)
    assert by_endpoint is not None and by_endpoint.original_destination
    assert by_endpoint.cluster is not None and by_endpoint.cluster.original_destination
    # an HTTP port is HTTP on any address (Istio's 0.0.0.0_8080 listener): routed by Host
    assert d.find("172.16.0.1", 8080).protocol == p.HTTP
    assert d.find("10.0.0.20", 7000).protocol == p.UNSUPPORTED  # no protocol, no known prefix: sniffed
    assert d.inbound_protocol("10.1.0.1", 5432) == p.TCP
    assert d.inbound_protocol("10.1.0.1", 1234) == p.UNSUPPORTED


def test_tcp_rules_in_order_with_subnets_and_weights() -> None:
    d = destinations()
    target = d.find("10.0.0.10", 5432)
    rng = random.Random(7)
    picks = Counter()
    for _ in range(4000):
        decision = d.route_tcp(target, "10.0.0.10", 5432, rng.randrange)
        assert decision.rule == "data/db:tcp[1]"
        picks[decision.cluster.subset] += 1
    assert 0.71 < picks["v1"] / 4000 < 0.79  # weights 75/25
    # outside 10.0.0.0/24 (the connection went to an endpoint address): the catch-all third route
    decision = d.route_tcp(target, "10.1.0.1", 5432, rng.randrange)
    assert decision.rule == "data/db:tcp[2]" and decision.cluster.subset == "v2"


def test_source_labels_select_rules_at_compile_time() -> None:
    d = destinations(Identity(namespace="data", labels={"app": "canary"}))
    decision = d.route_tcp(d.find("10.0.0.10", 5432), "10.0.0.10", 5432, random.Random(1).randrange)
    assert decision.rule == "data/db:tcp[0]" and decision.cluster.name == "outbound|5432|v2|db.data.svc.cluster.local"


def test_no_target_follows_the_outbound_policy() -> None:
    d = destinations()
    assert d.route_tcp(None, "8.8.8.8", 53, random.Random(1).randrange).cluster is PASSTHROUGH
    strict = destinations(Identity(namespace="data", outbound_policy=REGISTRY_ONLY))
    assert strict.route_tcp(None, "8.8.8.8", 53, random.Random(1).randrange).cluster is BLACKHOLE


def test_tls_by_sni() -> None:
    d = destinations()
    rng = random.Random(3).randrange
    chosen = d.route_tls(None, "93.184.216.34", 443, "secure.example.com", rng)
    assert chosen.rule == "data/secure:tls[0]" and chosen.cluster.name == "outbound|443|b|secure.example.com"
    wiki = d.route_tls(None, "208.80.154.224", 443, "en.wikipedia.org", rng)
    assert wiki.cluster.service == "*.wikipedia.org"
    assert d.route_tls(None, "1.1.1.1", 443, "wikipedia.org", rng).cluster is PASSTHROUGH  # *. needs a label
    assert d.route_tls(None, "1.1.1.1", 443, "other.example.com", rng).cluster is PASSTHROUGH


def test_transparent_table_catch_all() -> None:
    problems: list = []
    snapshot = snapshot_of(load_text(CONFIG, "l4.yaml", problems))
    table, _ = compile_table(snapshot, Identity(namespace="data"))
    allow = transparent_table(table, 8080)
    route, _ = allow.match(_Head(b"unknown.example.com"))
    assert route is not None and route.name == "allow_any" and route.only.cluster is PASSTHROUGH
    route, port = allow.match(_Head(b"10.0.0.10"))  # a service's VIP is one of its domains
    assert route is not None and route.only.cluster_for(port).name == "outbound|8080||db.data.svc.cluster.local"
    assert port == 8080  # a Host without a port: the port the connection was going to, not 80
    strict, _ = compile_table(snapshot, Identity(namespace="data", outbound_policy=REGISTRY_ONLY))
    route, _ = transparent_table(strict, 80).match(_Head(b"unknown.example.com"))
    assert route is not None and route.name == "block_all" and route.direct_status == 502
    assert table.match(_Head(b"unknown.example.com"))[0] is None  # the explicit listener: 404 NR as before


class _Head:
    """What the route table reads of a request."""

    def __init__(self, authority: bytes) -> None:
        self.authority = authority
        self.path = b"/"
        self.method = b"GET"
        self.headers: list[tuple[bytes, bytes]] = []
        self.query = b""
        self.scheme = b"http"


def test_tcp_route_to_an_unknown_host_warns_in_tcp_terms() -> None:
    text = CONFIG + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ghost, namespace: data}
spec:
  hosts: [ghost]
  tcp: [{route: [{destination: {host: nowhere}}]}]
"""
    problems: list = []
    _, warnings = compile_table(snapshot_of(load_text(text, "l4.yaml", problems)), Identity(namespace="data"))
    found = [w for w in warnings if w.path == "spec.tcp[0].route[0].destination.host"]
    assert len(found) == 1 and "nowhere.data.svc.cluster.local" in found[0].message
    assert found[0].message.endswith("connections are closed (NC)") and found[0].doc == 9


def test_a_tls_port_without_addresses_is_reached_by_sni_only() -> None:
    """Bookinfo's www.googleapis.com (HTTPS, no addresses): other TLS traffic on 443 is not sent there."""
    d = destinations()
    assert d.find("142.250.1.1", 443) is None  # not port-wide: the ClientHello decides
    rng = random.Random(2).randrange
    assert d.route_tls(None, "142.250.1.1", 443, "secure.example.com", rng).cluster.subset == "b"
    assert d.route_tls(None, "142.250.1.1", 443, "www.example.org", rng).cluster is PASSTHROUGH


def test_meshproxy_routes_lists_the_original_destinations() -> None:
    from meshproxy.routing.describe import describe_table

    problems: list = []
    table, _ = compile_table(snapshot_of(load_text(CONFIG, "l4.yaml", problems)), Identity(namespace="data"))
    text = describe_table(table)
    assert "ORIGINAL DESTINATION  PROTOCOL  SERVICE  ->  CLUSTER (outboundTrafficPolicy ALLOW_ANY" in text
    assert ("10.0.0.10:5432  TCP  db.data.svc.cluster.local  ->  outbound|5432||db.data.svc.cluster.local (tcp); "
            "data/db:tcp[1] [port 5432, subnet 10.0.0.0/24] -> outbound|5432|v1|db.data.svc.cluster.local 75% | "
            "outbound|5432|v2|db.data.svc.cluster.local 25%") in text
    assert "192.168.7.0/24:9000  TCP  nets.internal" in text
    assert "TLS data/secure:tls[0] [port 443, sni secure.example.com]  ->  outbound|443|b|secure.example.com" in text
