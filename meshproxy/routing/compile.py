"""Istio model -> RouteTable, once per config snapshot, for one proxy's identity.

Everything a request would otherwise look up or parse is settled here: host
aliases, which VirtualService applies to this proxy (gateways, sourceLabels),
subset endpoints, per-port clusters, weights, policies. Problems Istio accepts
but that will not work are returned as warnings naming the place
(`istioctl analyze`-style).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..istio import model as m
from ..istio.values import HEADER_NAME_RE, compile_regex
from ..istio.problems import Problem
from ..istio.retry_annotation import RETRY_GRPC_TRAILERS
from .cluster import Cluster, Endpoint
from .match import CATCH_ALL, IGNORED_HEADER_KEYS, RouteMatch, StringMatcher, compile_match
from .picker import WeightedPicker
from .policy import (
    ACTION_DIRECT_RESPONSE,
    ACTION_REDIRECT,
    ACTION_ROUTE,
    DEFAULT_RETRY,
    NO_FAULT,
    NO_HEADERS,
    RETRY_ON_GRPC_ANY,
    FaultPolicy,
    HeaderMutation,
    Mirror,
    RetryPolicy,
    STICKY_COOKIE,
    STICKY_HEADER,
    Route,
    RouteDestination,
    StickyKey,
    merge_mutations,
)
from .cors import CorsPolicy
from .cors import join as cors_join
from .rewrite import Redirect, Rewrite
from . import protocol as proto
from .l4 import ALLOW_ANY, Destinations, L4Rule, L4Target, Network
from .table import RouteTable, VirtualHost
from .traffic import compile_cluster_policy, follows_client, merge_traffic_policy, upstream_http2

CLUSTER_DOMAIN = "svc.cluster.local"
MESH_GATEWAY = "mesh"
ANNOTATION_PREFIX = "meshproxy.io/"
STICKY_HEADER_ANNOTATION = "meshproxy.io/sticky-header"
STICKY_COOKIE_ANNOTATION = "meshproxy.io/sticky-cookie"
KNOWN_ANNOTATIONS = frozenset({STICKY_HEADER_ANNOTATION, STICKY_COOKIE_ANNOTATION, RETRY_GRPC_TRAILERS})


@dataclass(frozen=True, slots=True)
class Identity:
    """The workload this proxy runs beside (Istio's pod metadata)."""

    name: str = "unknown"
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = (MESH_GATEWAY,)  # "mesh" for a sidecar; "ns/name" or "name" for a gateway
    default_retry: RetryPolicy = DEFAULT_RETRY
    outbound_policy: str = ALLOW_ANY  # meshConfig.outboundTrafficPolicy.mode, for transparent connections


def fqdn(host: str, namespace: str) -> str:
    """Kubernetes short name -> FQDN in the resource's namespace; dotted and wildcard names stay."""
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.{CLUSTER_DOMAIN}"


def aliases(name: str, proxy_namespace: str) -> list[str]:
    """Names a request may use for a host, as in the domains of Istio's sidecar virtual hosts."""
    out = [name]
    suffix = f".{CLUSTER_DOMAIN}"
    if name.endswith(suffix):
        short, _, ns = name[: -len(suffix)].rpartition(".")
        if short:
            out += [f"{short}.{ns}", f"{short}.{ns}.svc"]
            if ns == proxy_namespace:
                out.append(short)
    return out


@dataclass(slots=True)
class Service:
    """Registry entry built from ServiceEntries: a host, its ports and endpoints."""

    host: str
    namespace: str
    ports: list[m.ServicePort]
    entries: list[m.WorkloadEntry]
    resolution: str
    origin: m.Origin
    external: bool = False  # ServiceEntry location MESH_EXTERNAL (Istio's default): outside the mesh
    addresses: list[str] = field(default_factory=list)  # ServiceEntry `addresses`: VIPs or CIDR blocks
    subject_alt_names: tuple[str, ...] = ()

    def service_accounts(self) -> tuple[tuple[str, str], ...]:
        return tuple(dict.fromkeys((self.namespace, ep.service_account) for ep in self.entries if ep.service_account))

    def endpoints(self, port: m.ServicePort, labels: Mapping[str, str]) -> tuple[Endpoint, ...]:
        out = []
        for ep in self.entries:
            if all(ep.labels.get(k) == v for k, v in labels.items()):
                number = ep.ports.get(port.name) or port.target_port or port.number
                out.append(Endpoint(ep.address, number, ep.labels))
        if not self.entries and self.resolution in ("DNS", "DNS_ROUND_ROBIN", "NONE") and not labels \
                and not self.host.startswith("*"):
            out.append(Endpoint(self.host, port.target_port or port.number))
        return tuple(out)


class _Compiler:
    def __init__(self, snapshot: m.Snapshot, identity: Identity) -> None:
        self.snapshot, self.identity = snapshot, identity
        self.warnings: list[Problem] = []
        self.services: dict[str, Service] = {}
        self.rules: dict[str, m.DestinationRule] = {}
        self.clusters: dict[tuple[str, int, str], Cluster | None] = {}

    def warn(self, origin: m.Origin, path: str, message: str) -> None:
        self.warnings.append(Problem(origin.file, origin.doc, path, message, "warning"))

    # ---- registry

    def build_registry(self) -> None:
        for se in self.snapshot.service_entries:
            for host in se.hosts:
                name = fqdn(host, se.meta.namespace)
                service = self.services.get(name)
                if service is None:
                    self.services[name] = Service(name, se.meta.namespace, list(se.ports), list(se.endpoints),
                                                  se.resolution, se.meta.origin, se.location != "MESH_INTERNAL",
                                                  list(se.addresses), se.subject_alt_names)
                else:  # several entries for one host: union of ports, endpoints, addresses and SANs
                    known = {p.number for p in service.ports}
                    service.ports += [p for p in se.ports if p.number not in known]
                    service.entries += se.endpoints
                    service.addresses += [a for a in se.addresses if a not in service.addresses]
                    service.subject_alt_names += tuple(s for s in se.subject_alt_names
                                                       if s not in service.subject_alt_names)
        for dr in self.snapshot.destination_rules:
            name = fqdn(dr.host, dr.meta.namespace)
            if name in self.rules:
                other = self.rules[name].meta.origin
                self.warn(dr.meta.origin, "spec.host", f"another DestinationRule for {name} at {other} applies; this one is ignored")
                continue
            self.rules[name] = dr

    def cluster(self, host: str, port: int, subset: str) -> Cluster | None:
        key = (host, port, subset)
        if key in self.clusters:
            return self.clusters[key]
        service = self.services.get(host)
        cluster = None
        if service is not None:
            service_port = next((p for p in service.ports if p.number == port), None)
            labels: Mapping[str, str] | None = {}
            rule = self.rules.get(host)
            found = None
            if subset:
                found = next((s for s in rule.subsets if s.name == subset), None) if rule else None
                labels = found.labels if found else None
            if service_port is not None and labels is not None:
                policy = merge_traffic_policy(rule.traffic_policy if rule else None,
                                              found.traffic_policy if found else None, port)
                cluster = Cluster(Cluster.name_of("outbound", port, subset, host), host, port, subset,
                                  service.endpoints(service_port, labels), compile_cluster_policy(policy),
                                  service.external, subject_alt_names=service.subject_alt_names,
                                  service_accounts=service.service_accounts(),
                                  http2=upstream_http2(service_port, policy),
                                  follows_client=follows_client(service_port, policy))
        self.clusters[key] = cluster
        return cluster

    # ---- routes

    def applies_here(self, gateways: Iterable[str], namespace: str) -> bool:
        for gateway in gateways:
            if gateway == MESH_GATEWAY and MESH_GATEWAY in self.identity.gateways:
                return True
            qualified = gateway if "/" in gateway else f"{namespace}/{gateway}"
            for mine in self.identity.gateways:
                if mine != MESH_GATEWAY and (mine == qualified or f"{namespace}/{mine}" == qualified):
                    return True
        return False

    def source_matches(self, block: m.HTTPMatchRequest, vs: m.VirtualService) -> bool:
        """sourceLabels/sourceNamespace/gateways select proxies at config time, never per request.

        As Istio's sourceMatchHTTP: a block that lists gateways applies when one of them is this proxy's
        (its sourceLabels are then not looked at); otherwise the proxy's labels must contain
        sourceLabels and its namespace equal sourceNamespace. Rules bound only to gateways ignore both.
        """
        if block.gateways:
            return self.applies_here(block.gateways, vs.meta.namespace)
        if MESH_GATEWAY not in vs.gateways:
            return True  # Istio ignores source matches for gateway-only rules
        if block.source_namespace and block.source_namespace != self.identity.namespace:
            return False
        return all(self.identity.labels.get(k) == v for k, v in block.source_labels.items())

    def destination(self, vs: m.VirtualService, dest: m.HTTPRouteDestination, path: str,
                    route_headers: m.Headers | None, weighted: bool) -> RouteDestination:
        ns, origin = vs.meta.namespace, vs.meta.origin
        host, subset = fqdn(dest.destination.host, ns), dest.destination.subset
        service = self.services.get(host)
        by_port: dict[int, Cluster] = {}
        cluster = None
        if service is None:
            self.warn(origin, f"{path}.destination.host", f"referenced host {host!r} not found (no ServiceEntry): requests get 503 NC")
        else:
            if subset:
                rule = self.rules.get(host)
                if rule is None:
                    self.warn(origin, f"{path}.destination.subset",
                              f"no DestinationRule for {host!r} defines subset {subset!r}: requests get 503 NC")
                elif not any(s.name == subset for s in rule.subsets):
                    self.warn(origin, f"{path}.destination.subset",
                              f"subset {subset!r} is not defined by DestinationRule {rule.meta.namespace}/{rule.meta.name} "
                              f"({rule.meta.origin}): requests get 503 NC")
            ports = [p.number for p in service.ports]
            if dest.destination.port is not None:
                if dest.destination.port not in ports:
                    self.warn(origin, f"{path}.destination.port", f"port {dest.destination.port} is not a port of {host!r}")
                cluster = self.cluster(host, dest.destination.port, subset)
            elif len(ports) == 1:
                cluster = self.cluster(host, ports[0], subset)
            elif ports:
                cluster = self.cluster(host, ports[0], subset)
                by_port = {p: c for p in ports if (c := self.cluster(host, p, subset)) is not None}
        route_req, route_resp = _mutations(route_headers)
        dest_req, dest_resp = _mutations(dest.headers)
        # Istio/Envoy: with one destination the destination-level `set` wins; with weights the route-level one.
        first, second = ((route_req, dest_req), (route_resp, dest_resp)) if not weighted else ((dest_req, route_req), (dest_resp, route_resp))
        return RouteDestination(host, subset, cluster, by_port, merge_mutations(*first), merge_mutations(*second))

    def http_routes(self, vs: m.VirtualService) -> list[Route]:
        routes: list[Route] = []
        places: list[str] = []  # spec path of each route's match block, for warnings
        ns = vs.meta.namespace
        sticky = self.sticky_key(vs)
        for index, http in enumerate(vs.http):
            path = f"spec.http[{index}]"
            self.check_header_keys(vs, http, path)
            blocks = [(k, b) for k, b in enumerate(http.match) if self.source_matches(b, vs)]
            if http.match and not blocks:
                continue  # no block applies to this proxy
            common = self.route_policy(vs, http, path)
            held = vs.retry_grpc_trailers.get(index)
            if held:
                retry = common["retry"]
                assert isinstance(retry, RetryPolicy)
                common["retry"] = self.grpc_trailers_retry(vs, retry, held, path)
            picker = common["picker"]
            if sticky is not None and isinstance(picker, WeightedPicker) and len(picker.choices) > 1:
                common["sticky"] = sticky
            for k, block in blocks or [(-1, None)]:
                match = compile_match(block) if block is not None else CATCH_ALL
                name = http.name + (f".{block.name}" if block is not None and block.name else "")
                rewrite = _rewrite(http, match)
                redirect = common.get("redirect")
                if isinstance(redirect, Redirect) and redirect.prefix:
                    # prefixRewrite replaces the prefix this block matched
                    strip = match.path.value if match.path is not None and match.path.kind == "prefix" else b"/"
                    redirect = dataclasses.replace(redirect, strip=strip)
                routes.append(Route(name=name, virtual_service=f"{ns}/{vs.meta.name}", index=index, match=match,
                                    rewrite=rewrite, **{**common, "redirect": redirect}))
                places.append(f"{path}.match[{k}]" if k >= 0 else path)
        self.check_shadowing(vs, routes, places)
        return routes

    def sticky_key(self, vs: m.VirtualService) -> StickyKey | None:
        """The meshproxy.io/sticky-header or -cookie annotation of a VirtualService (see policy.StickyKey)."""
        annotations, origin = vs.meta.annotations, vs.meta.origin
        for key in annotations:
            if key.startswith(ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS:
                self.warn(origin, f"metadata.annotations.{key}",
                          f"unknown meshproxy annotation (known: {', '.join(sorted(KNOWN_ANNOTATIONS))}); ignored")
        header, cookie = annotations.get(STICKY_HEADER_ANNOTATION), annotations.get(STICKY_COOKIE_ANNOTATION)
        if header is None and cookie is None:
            return None
        if header is not None and cookie is not None:
            self.warn(origin, f"metadata.annotations.{STICKY_COOKIE_ANNOTATION}",
                      f"{STICKY_HEADER_ANNOTATION} is also set: the header is used, the cookie ignored")
        kind, name, key = ((STICKY_HEADER, header, STICKY_HEADER_ANNOTATION) if header is not None
                           else (STICKY_COOKIE, cookie, STICKY_COOKIE_ANNOTATION))
        assert name is not None
        name = name.strip()
        if not HEADER_NAME_RE.fullmatch(name):
            self.warn(origin, f"metadata.annotations.{key}", f"{name!r} is not a valid {kind} name; picks stay random")
            return None
        if not any(len(http.route) > 1 for http in vs.http):
            self.warn(origin, f"metadata.annotations.{key}",
                      "no route of this VirtualService has several destinations: nothing to keep sticky")
        return StickyKey(kind, name.lower().encode() if kind == STICKY_HEADER else name.encode())

    def grpc_trailers_retry(self, vs: m.VirtualService, retry: RetryPolicy, held: int, path: str) -> RetryPolicy:
        """The route's retry policy with the meshproxy.io/retry-grpc-trailers hold (istio/retry_annotation.py)."""
        if not retry.num_retries or not retry.retry_on & RETRY_ON_GRPC_ANY:
            self.warn(vs.meta.origin, f"metadata.annotations.{RETRY_GRPC_TRAILERS}",
                      f"{path} retries no gRPC status (its retry policy, or the mesh's default one, has no attempts or "
                      "no gRPC retryOn condition): no response is held")
            return retry
        return dataclasses.replace(retry, grpc_trailers_bytes=held)

    def check_header_keys(self, vs: m.VirtualService, http: m.HTTPRoute, path: str) -> None:
        for k, block in enumerate(http.match):
            for field_name, items in (("headers", block.headers), ("withoutHeaders", block.without_headers)):
                for name, _ in items:
                    if name in IGNORED_HEADER_KEYS:
                        self.warn(vs.meta.origin, f"{path}.match[{k}].{field_name}.{name}",
                                  f"Istio ignores the header key {name!r}: use match.{name} (or ':{name}' for the "
                                  "pseudo-header)" if name != "uri" else
                                  "Istio ignores the header key 'uri': use match.uri")

    def route_policy(self, vs: m.VirtualService, http: m.HTTPRoute, path: str) -> dict[str, object]:
        weighted = len(http.route) > 1
        picker = None
        operation = ""
        if http.route:
            dests = [(self.destination(vs, d, f"{path}.route[{i}]", http.headers, weighted), d.weight)
                     for i, d in enumerate(http.route)]
            picker = WeightedPicker.compile(dests)
            first = dests[0][0]
            port = first.cluster.port if first.cluster else (http.route[0].destination.port or 80)
            operation = f"{first.host}:{port}/*" if not weighted else f"{vs.meta.name}:{port}/*"
        action = ACTION_ROUTE
        extra: dict[str, object] = {}
        if http.redirect is not None:
            r = http.redirect
            action = ACTION_REDIRECT
            extra = {"redirect": Redirect(code=r.redirect_code, scheme=r.scheme.encode(), host=r.authority.encode(),
                                          port=r.port, derive_port=r.derive_port, path=r.uri.encode(),
                                          prefix=r.prefix_rewrite.encode())}
        elif http.direct_response is not None:
            action = ACTION_DIRECT_RESPONSE
            extra = {"direct_status": http.direct_response.status, "direct_body": http.direct_response.body}
        req, resp = _mutations(http.headers)
        mirrors = tuple(Mirror(self.destination(vs, m.HTTPRouteDestination(mp.destination), f"{path}.mirror", None, False),
                               int(mp.percentage * 10000))
                        for mp in http.mirrors if mp.percentage > 0)
        return {
            "mirrors": mirrors,
            "cors": _cors(http.cors_policy),
            "action": action,
            "picker": picker,
            "timeout": http.timeout,
            "retry": _retry(http.retries, self.identity.default_retry),
            "fault": _fault(http.fault),
            "request_headers": req,
            "response_headers": resp,
            "operation": operation,
            **extra,
        }

    def default_route(self, service: Service) -> list[Route]:
        """A host without a VirtualService: the whole service, default retries, no timeout."""
        ports = [p.number for p in service.ports]
        by_port = {p: c for p in ports if (c := self.cluster(service.host, p, "")) is not None}
        first = by_port.get(ports[0]) if ports else None
        dest = RouteDestination(service.host, "", first, by_port if len(ports) > 1 else {})
        port = ports[0] if ports else 80
        return [Route(name="default", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_ROUTE,
                      picker=WeightedPicker.compile([(dest, 1)]), retry=self.identity.default_retry,
                      operation=f"{service.host}:{port}/*")]

    # ---- table

    def compile(self) -> RouteTable:
        self.build_registry()
        self.check_gateways()
        owner: dict[str, m.VirtualService] = {}
        hosts: dict[str, list[Route]] = {}
        vhost_names: dict[str, str] = {}
        l4_owner: dict[str, m.VirtualService] = {}  # the first VirtualService with tcp: routes for a host
        for vs in self.snapshot.virtual_services:
            if not self.applies_here(vs.gateways, vs.meta.namespace):
                continue
            if vs.tcp:
                for host in vs.hosts:
                    l4_owner.setdefault(fqdn(host, vs.meta.namespace), vs)
            if not vs.http and (vs.tcp or vs.tls):
                continue  # TCP/TLS only: HTTP to its hosts keeps the service's default route (as Istio)
            routes = self.http_routes(vs)
            for i, host in enumerate(vs.hosts):
                name = fqdn(host, vs.meta.namespace)
                if name in owner:
                    first = owner[name]
                    self.warn(vs.meta.origin, f"spec.hosts[{i}]",
                              f"host {name!r} is also claimed by VirtualService {first.meta.namespace}/{first.meta.name} "
                              f"({first.meta.origin}); sidecars use only that one, this one is ignored for it")
                    continue
                owner[name] = vs
                hosts[name] = routes
                vhost_names[name] = name
        for name, service in self.services.items():
            if name not in hosts:
                hosts[name] = self.default_route(service)
                vhost_names[name] = name
        exact: dict[str, VirtualHost] = {}
        wildcards: list[tuple[str, VirtualHost]] = []
        catch_all = None
        for name, routes in hosts.items():
            domains = aliases(name, self.identity.namespace)
            registered = self.services.get(name)
            if registered is not None:  # Istio lists a service's VIPs among its virtual host's domains
                domains += [a for a in registered.addresses if "/" not in a]
            vhost = VirtualHost(name, tuple(domains), tuple(routes))
            if name == "*":
                catch_all = vhost
            elif name.startswith("*."):
                wildcards.append((name[1:], vhost))
            else:
                for domain in domains:
                    exact.setdefault(domain, vhost)
        wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        table = RouteTable(exact=exact, wildcards=tuple(wildcards), catch_all=catch_all)
        table.destinations = self.compile_destinations(l4_owner)
        return table

    # ---- transparent connections (routing/l4.py): by original destination, tcp: and tls: routes

    def compile_destinations(self, owner: Mapping[str, m.VirtualService]) -> Destinations:
        out = Destinations(outbound_policy=self.identity.outbound_policy)
        subnets: list[tuple[Network, int, L4Target]] = []
        tls_services: list[tuple[str, int, Cluster]] = []
        tcp_rules: dict[int, tuple[L4Rule, ...]] = {}  # by id of the VirtualService; every one compiled (warnings)
        for vs in owner.values():
            if id(vs) not in tcp_rules:
                tcp_rules[id(vs)] = tuple(self.l4_rules(vs, vs.tcp, "tcp"))
        for name, service in self.services.items():
            vs = owner.get(name)
            rules = tcp_rules[id(vs)] if vs is not None else ()
            for port in service.ports:
                protocol = proto.of_service_entry_port(port.number, port.name, port.protocol)
                if protocol == proto.UDP:
                    continue
                cluster = self.cluster(name, port.number, "")
                target = L4Target(name, port.number, protocol, cluster, rules)
                for address in service.addresses:
                    if "/" in address:
                        subnets.append((ipaddress.ip_network(address, strict=False), port.number, target))
                    else:
                        out.exact.setdefault((address, port.number), target)
                if cluster is not None:
                    by_address = dataclasses.replace(target, original_destination=True,
                                                     cluster=dataclasses.replace(cluster, endpoints=(),
                                                                                 original_destination=True))
                    for endpoint in cluster.endpoints:
                        out.endpoints.setdefault(endpoint.key, by_address)
                if cluster is not None and proto.is_tls(protocol):  # SNI filter chains (a wildcard host too)
                    tls_services.append((name, port.number, cluster))
                # Port-wide (Istio's 0.0.0.0_PORT listeners): HTTP, and TCP without addresses; a TLS port without
                # addresses is reached by SNI only (tls_services), other server names pass through.
                if proto.is_http(protocol) or (proto.is_tcp(protocol) and not proto.is_tls(protocol)
                                               and not service.addresses):
                    out.ports.setdefault(port.number, target)
        out.subnets = tuple(sorted(subnets, key=lambda item: item[0].prefixlen, reverse=True))
        out.tls_services = tuple(tls_services)
        tls: list[L4Rule] = []
        for vs in self.snapshot.virtual_services:
            if vs.tls and self.applies_here(vs.gateways, vs.meta.namespace):
                tls += self.l4_rules(vs, vs.tls, "tls")
        out.tls = tuple(tls)
        return out

    def l4_rules(self, vs: m.VirtualService, routes: tuple[m.L4Route, ...], kind: str) -> list[L4Rule]:
        """The match blocks of `tcp:` / `tls:` routes that apply to this proxy, each with its route's picker."""
        out: list[L4Rule] = []
        first_warning = len(self.warnings)
        for index, route in enumerate(routes):
            path = f"spec.{kind}[{index}]"
            weighted = len(route.route) > 1
            picker = WeightedPicker.compile([(self.destination(vs, d, f"{path}.route[{i}]", None, weighted), d.weight)
                                             for i, d in enumerate(route.route)])
            name = f"{vs.meta.namespace}/{vs.meta.name}:{kind}[{index}]"  # no space: a field of the text log
            blocks = route.match or (m.L4MatchAttributes(),)
            for block in blocks:
                if block.never or not self.l4_source_matches(block, vs):
                    continue
                subnets = tuple(ipaddress.ip_network(s, strict=False) for s in block.destination_subnets)
                out.append(L4Rule(name, picker, block.port, subnets, block.sni_hosts))
        for i in range(first_warning, len(self.warnings)):  # destination() speaks of HTTP requests
            problem = self.warnings[i]
            self.warnings[i] = dataclasses.replace(
                problem, message=problem.message.replace("requests get 503 NC", "connections are closed (NC)"))
        return out

    def l4_source_matches(self, block: m.L4MatchAttributes, vs: m.VirtualService) -> bool:
        """sourceLabels, sourceNamespace and gateways of an L4 match, settled for this proxy (as for HTTP)."""
        return self.source_matches(m.HTTPMatchRequest(source_labels=block.source_labels,
                                                      source_namespace=block.source_namespace,
                                                      gateways=block.gateways), vs)

    def check_shadowing(self, vs: m.VirtualService, routes: list[Route], places: list[str]) -> None:
        """istioctl-analyze-style: an HTTPRoute after a catch-all never matches (Istio even stops emitting
        routes after one), nor does a match block whose conditions an earlier block already has."""
        seen: dict[RouteMatch, int] = {}
        for pos, route in enumerate(routes):
            match = route.match
            if match.matches_every_path:
                later = next((r for r in routes[pos + 1:] if r.index != route.index), None)
                if later is not None:
                    self.warn(vs.meta.origin, f"spec.http[{later.index}]",
                              f"never matches: spec.http[{route.index}] before it matches every request")
                return
            key = _conditions(match)
            first = seen.setdefault(key, pos)
            if first != pos and routes[first].index != route.index:
                self.warn(vs.meta.origin, places[pos],
                          f"never matches: {places[first]} before it has the same conditions")

    def check_gateways(self) -> None:
        defined = {f"{g.meta.namespace}/{g.meta.name}" for g in self.snapshot.gateways}
        for vs in self.snapshot.virtual_services:
            for i, gateway in enumerate(vs.gateways):
                qualified = gateway if "/" in gateway else f"{vs.meta.namespace}/{gateway}"
                if gateway != MESH_GATEWAY and qualified not in defined:
                    self.warn(vs.meta.origin, f"spec.gateways[{i}]", f"gateway {qualified!r} is not defined in this configuration")


def _conditions(match: RouteMatch) -> RouteMatch:
    """A match without its name: equal conditions compare equal (regexes only by identity)."""
    return RouteMatch(path=match.path, method=match.method, scheme=match.scheme, authority=match.authority,
                      headers=match.headers, query=match.query, port=match.port)


def _rewrite(http: m.HTTPRoute, match: RouteMatch) -> Rewrite | None:
    """HTTPRewrite for one match block: the prefix to replace is that block's own uri match."""
    rw = http.rewrite
    authority = _authority_from_headers(http.headers)
    if rw is None and not authority:
        return None
    rw = rw or m.HTTPRewrite()
    authority = rw.authority.encode() or authority
    if rw.uri_regex_match:
        regex = rw.uri_regex if rw.uri_regex is not None else compile_regex(rw.uri_regex_match)
        return Rewrite(regex=regex, substitution=rw.uri_regex_rewrite.encode(),
                       authority=authority)
    if rw.uri:
        path = match.path
        if path is None or path.kind not in ("exact", "prefix"):
            strip, ignore_case = b"/", False  # Istio: a route without a uri match is a "/" prefix match
        else:
            strip, ignore_case = path.value, path.ignore_case
        return Rewrite(strip=strip, strip_ignore_case=ignore_case, prefix=rw.uri.encode(), authority=authority)
    return Rewrite(authority=authority) if authority else None


def _authority_from_headers(headers: m.Headers | None) -> bytes:
    """`headers.request.set/add` of host or :authority is an authority rewrite in Istio."""
    if headers is None:
        return b""
    for name, value in headers.request.set + headers.request.add:
        if name in ("host", ":authority"):
            return value.encode()
    return b""


def _cors(policy: m.CorsPolicy | None) -> CorsPolicy | None:
    if policy is None:
        return None
    return CorsPolicy(
        origins=tuple(StringMatcher.compile(o) for o in policy.allow_origins),
        allow_methods=cors_join(policy.allow_methods),
        allow_headers=cors_join(policy.allow_headers),
        expose_headers=cors_join(policy.expose_headers),
        max_age=str(int(policy.max_age)).encode() if policy.max_age is not None else b"",
        allow_credentials=policy.allow_credentials,
        forward_unmatched_preflight=policy.unmatched_preflights != "IGNORE",
    )


def _mutations(headers: m.Headers | None) -> tuple[HeaderMutation, HeaderMutation]:
    if headers is None:
        return NO_HEADERS, NO_HEADERS
    return _mutation(headers.request), _mutation(headers.response)


def _mutation(ops: m.HeaderOperations) -> HeaderMutation:
    # host / :authority are never set as headers: they become the authority rewrite (see _rewrite).
    set_ = tuple((k.encode(), v.encode()) for k, v in ops.set if k not in AUTHORITY_KEYS)
    add = tuple((k.encode(), v.encode()) for k, v in ops.add if k not in AUTHORITY_KEYS)
    remove = frozenset(n.encode() for n in ops.remove if n not in AUTHORITY_KEYS)
    if not (set_ or add or remove):
        return NO_HEADERS
    return HeaderMutation(remove=remove, set=set_, add=add)


AUTHORITY_KEYS = frozenset({"host", ":authority"})


def _retry(retries: m.HTTPRetry | None, default: RetryPolicy) -> RetryPolicy:
    if retries is None:
        return default
    return RetryPolicy.compile(retries.attempts, retries.retry_on, retries.per_try_timeout, retries.backoff,
                               retries.retry_ignore_previous_hosts)


def _fault(fault: m.HTTPFaultInjection | None) -> FaultPolicy:
    if fault is None:
        return NO_FAULT
    delay, abort = fault.delay, fault.abort
    return FaultPolicy(
        delay=delay.fixed_delay if delay else 0.0,
        delay_per_million=int(delay.percentage * 10000) if delay else 0,
        abort_status=abort.http_status if abort else 0,
        abort_grpc_status=abort.grpc_status if abort else "",
        abort_per_million=int(abort.percentage * 10000) if abort else 0,
    )


def compile_table(snapshot: m.Snapshot, identity: Identity = Identity()) -> tuple[RouteTable, list[Problem]]:
    compiler = _Compiler(snapshot, identity)
    table = compiler.compile()
    return table, compiler.warnings
