"""Human-readable views of a compiled table (`meshproxy routes`, admin /routes)."""

from __future__ import annotations

from ..istio.values import RETRY_ON_BITS
from . import protocol as proto
from .l4 import Destinations, L4Rule, L4Target
from .match import MatchInput
from .policy import ACTION_DIRECT_RESPONSE, ACTION_REDIRECT, Route, sticky_hash
from .table import RouteTable


def describe_match(route: Route) -> str:
    m = route.match
    if m.catch_all:
        return "*"
    parts = []
    if m.path is not None:
        parts.append(f"uri {m.path.describe()}")
    if m.method is not None:
        parts.append(f"method {m.method.describe()}")
    if m.scheme is not None:
        parts.append(f"scheme {m.scheme.describe()}")
    if m.authority is not None:
        parts.append(f"authority {m.authority.describe()}")
    if m.port is not None:
        parts.append(f"port {m.port}")
    for h in m.headers:
        parts.append(f"{'!' if h.invert else ''}header {h.name.decode()} {h.matcher.describe()}")
    for q in m.query:
        parts.append(f"query {q.name.decode()} {q.matcher.describe()}")
    return ", ".join(parts)


def describe_action(route: Route) -> str:
    if route.action == ACTION_DIRECT_RESPONSE:
        return f"direct response {route.direct_status}"
    if route.action == ACTION_REDIRECT:
        return f"redirect {route.redirect.code if route.redirect else 301}"
    assert route.picker is not None
    picker = route.picker
    shares = []
    previous = 0
    for dest, bound in zip(picker.choices, picker.upper_bounds):
        cluster = dest.cluster.name if dest.cluster else f"(no cluster: {dest.host} {dest.subset or ''})".strip()
        weight = "" if len(picker.choices) == 1 else f" {100 * (bound - previous) / picker.total:.0f}%"
        endpoints = f" [{', '.join(map(str, dest.cluster.endpoints)) or 'no endpoints'}]" if dest.cluster else ""
        shares.append(f"{cluster}{weight}{endpoints}")
        previous = bound
    return " | ".join(shares)


def describe_table(table: RouteTable) -> str:
    lines = ["VIRTUAL HOST / DOMAINS", "  ROUTE (virtual service, index)  MATCH  ->  DESTINATION"]
    for vhost in sorted(table.virtual_hosts, key=lambda v: v.name):
        lines.append(f"{vhost.name}  [{', '.join(vhost.domains)}]")
        for route in vhost.routes:
            where = f"{route.virtual_service}#{route.index}" if route.virtual_service else "default"
            name = f"{route.name or '-'} ({where})"
            extras = []
            if route.timeout:
                extras.append(f"timeout {route.timeout:g}s")
            if route.fault.active:
                extras.append("fault")
            if route.sticky is not None and route.picker is not None and len(route.picker.choices) > 1:
                extras.append(f"sticky {route.sticky.kind} {route.sticky.name.decode()}")
            extra = f"  [{', '.join(extras)}]" if extras else ""
            lines.append(f"  {name}  {describe_match(route)}  ->  {describe_action(route)}{extra}")
    if table.destinations is not None:
        lines += describe_l4(table.destinations)
    return "\n".join(lines) + "\n"


def _target_line(where: str, target: L4Target) -> str:
    cluster = target.cluster.name if target.cluster is not None else "(no cluster)"
    how = "routed by Host" if proto.is_http(target.protocol) else \
        "sniffed" if proto.is_sniffed(target.protocol) else "tcp"
    rules = "".join(f"; {rule.name}{_rule_match(rule)} -> {_rule_clusters(rule)}" for rule in target.tcp)
    original = " (to the address itself)" if target.original_destination else ""
    return f"{where}  {target.protocol}  {target.service}  ->  {cluster}{original} ({how}){rules}"


def _rule_match(rule: L4Rule) -> str:
    parts = [f"port {rule.port}"] if rule.port is not None else []
    parts += [f"subnet {net}" for net in rule.subnets] + [f"sni {host}" for host in rule.sni_hosts]
    return f" [{', '.join(parts)}]" if parts else ""


def _rule_clusters(rule: L4Rule) -> str:
    picker, previous, shares = rule.picker, 0, []
    for dest, bound in zip(picker.choices, picker.upper_bounds):
        name = dest.cluster.name if dest.cluster is not None else f"(no cluster: {dest.host})"
        shares.append(name if len(picker.choices) == 1 else f"{name} {100 * (bound - previous) / picker.total:.0f}%")
        previous = bound
    return " | ".join(shares)


def describe_l4(destinations: Destinations) -> list[str]:
    """Transparent connections by original destination (like `istioctl proxy-config listeners`)."""
    lines = ["", f"ORIGINAL DESTINATION  PROTOCOL  SERVICE  ->  CLUSTER (outboundTrafficPolicy "
                 f"{destinations.outbound_policy} for the rest)"]
    for (address, port), target in sorted(destinations.exact.items()):
        lines.append(_target_line(f"{address}:{port}", target))
    for net, port, target in destinations.subnets:
        lines.append(_target_line(f"{net}:{port}", target))
    for port, target in sorted(destinations.ports.items()):
        lines.append(_target_line(f"*:{port}", target))
    for rule in destinations.tls:
        lines.append(f"TLS {rule.name}{_rule_match(rule)}  ->  {_rule_clusters(rule)}")
    for host, port, cluster in destinations.tls_services:
        lines.append(f"TLS sni {host} port {port}  ->  {cluster.name}")
    return lines


def describe_retry(route: Route) -> str:
    retry = route.retry
    if retry.num_retries == 0:
        return "no retries"
    on = [name for name, bit in RETRY_ON_BITS.items() if retry.retry_on & bit]
    codes = ",".join(str(c) for c in sorted(retry.retriable_status_codes))
    per_try = f", per try {retry.per_try_timeout:g}s" if retry.per_try_timeout else ""
    held = f", gRPC trailers held up to {retry.grpc_trailers_bytes} bytes" if retry.grpc_trailers_bytes else ""
    return f"{retry.num_retries} retries on {','.join(on)}{f' (codes {codes})' if codes else ''}{per_try}{held}"


def describe_destinations(route: Route, req: MatchInput | None = None) -> list[str]:
    """One line per weighted destination: host, subset, share, cluster, endpoints."""
    if route.action == ACTION_DIRECT_RESPONSE:
        return [f"direct response {route.direct_status} ({len(route.direct_body)} bytes)"]
    if route.action == ACTION_REDIRECT:
        return [f"redirect {route.redirect.code if route.redirect else 301} {route.redirect}"]
    assert route.picker is not None
    picker = route.picker
    lines, previous = [], 0
    for dest, bound in zip(picker.choices, picker.upper_bounds):
        share = ("all requests (one destination)" if len(picker.choices) == 1
                 else f"weight {bound - previous}/{picker.total} ({100 * (bound - previous) / picker.total:.0f}%)")
        subset = f" subset {dest.subset}" if dest.subset else ""
        if dest.cluster is None:
            where = "no cluster: 503 NC"
        else:
            endpoints = ", ".join(map(str, dest.cluster.endpoints)) or "none: 503 UH"
            where = f"cluster {dest.cluster.name}  endpoints {endpoints}"
        lines.append(f"{dest.host}{subset}  {share}  {where}")
        previous = bound
    if route.sticky is not None and len(picker.choices) > 1:
        sticky = f"sticky on {route.sticky.kind} {route.sticky.name.decode()}"
        value = route.sticky.value(req) if req is not None else None
        if req is not None and value is None:
            lines.append(f"{sticky}: not in this request, the pick is random")
        elif value is not None:
            dest = picker.pick_hashed(sticky_hash(value))
            lines.append(f"{sticky}: {value.decode('latin-1')!r} always goes to {dest.host}"
                         + (f" subset {dest.subset}" if dest.subset else ""))
        else:
            lines.append(sticky)
    return lines


def explain_request(table: RouteTable, req: MatchInput) -> tuple[list[str], Route | None]:
    """Why a request takes the route it takes: the virtual host, every earlier route with the reason it
    does not match, then the chosen route and its destinations (`meshproxy route`)."""
    vhost, port = table.virtual_host(req.authority)
    authority = req.authority.decode("latin-1")
    if vhost is None:
        return [f"virtual host: none for authority {authority!r}: 404 NR"], None
    lines = [f"virtual host: {vhost.name}  [{', '.join(vhost.domains)}]  (authority {authority!r}, port {port})"]
    chosen = vhost.match(req, port)  # the data path's answer; the lines below say why
    for i, route in enumerate(vhost.routes):
        where = f"{route.virtual_service} http[{route.index}]" if route.virtual_service else "default route"
        label = f"  route {i}: {where} {route.name or '-'!r}  {describe_match(route)}"
        if route is chosen:
            lines.append(f"{label}\n    yes")
            break
        reason = route.match.explain(req, port)
        lines.append(f"{label}\n    no: {reason or 'matches, but an earlier route won'}")
    if chosen is None:
        lines.append("no route matched: 404 NR")
        return lines, None
    vs = chosen.virtual_service or "(none: default route of the service)"
    lines.append(f"chosen: VirtualService {vs}, http[{chosen.index}], route name {chosen.name or '-'!r}")
    lines += [f"  -> {line}" for line in describe_destinations(chosen, req)]
    policy = [f"timeout {chosen.timeout:g}s" if chosen.timeout else "no timeout", describe_retry(chosen)]
    if chosen.fault.active:
        policy.append("fault injection")
    lines.append(f"  policy: {', '.join(policy)}")
    return lines, chosen
