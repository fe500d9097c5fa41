"""Human-readable views of a compiled table (`meshproxy routes`, admin /routes)."""

from __future__ import annotations

from .policy import ACTION_DIRECT_RESPONSE, ACTION_REDIRECT, Route
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
        return f"redirect {route.redirect_code}"
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
            extra = f"  [{', '.join(extras)}]" if extras else ""
            lines.append(f"  {name}  {describe_match(route)}  ->  {describe_action(route)}{extra}")
    return "\n".join(lines) + "\n"
