"""One gateway port's route table, compiled at load: Istio builds a route configuration per gateway port holding
the virtual hosts of the VirtualServices bound to the gateway whose hosts meet the port's servers' `hosts`; a
request for any other host gets 404 (`NR`). A plaintext server with `tls.httpsRedirect: true` answers every
request for its hosts with Envoy's `require_tls: ALL`: 301 to `https://` + the request's Host + path. As on any edge
listener of Envoy (Istio's gateways set use_remote_address), the client's `x-forwarded-proto` is replaced with the
scheme of its connection, `https` on a TLS port: a request mutation set first on every destination of the port's
routes (a route's own header operations still come after it, as Envoy's route headers follow the connection
manager's).

Pure (no I/O): the table is the proxy's whole gateway table narrowed once per load and per port, so a request
costs what it costs on any listener.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..istio import model as m
from .match import CATCH_ALL
from .picker import WeightedPicker
from .policy import ACTION_REDIRECT, HeaderMutation, Route, merge_mutations
from .rewrite import Redirect
from .table import RouteTable, VirtualHost

ANY_HOST: Final = "*"
# Envoy's createSslRedirectPath: https:// + Host + path (the port the client named is kept; 443 is implied).
HTTPS_REDIRECT: Final = Redirect(code=301, scheme=b"https", derive_port="FROM_REQUEST_PORT")
FORWARDED_PROTO: Final = b"x-forwarded-proto"
TERMINATING: Final = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL")


def server_host(host: str) -> str:
    """`ns/host` -> `host` (the namespace selects which VirtualServices may bind; see `namespaces_checked`)."""
    return host.rpartition("/")[2].lower()


def namespaces_checked(host: str) -> bool:
    """True when a server host's namespace part is one meshproxy honours: none, `*` or `.`. A named namespace
    would restrict which VirtualServices bind to the server, which the compiled table cannot tell apart: the
    loader warns about it (gateway_problems)."""
    namespace, sep, _ = host.rpartition("/")
    return not sep or namespace in ("*", ".")


def _redirect_host(name: str) -> VirtualHost:
    route = Route(name="https_redirect", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_REDIRECT,
                  picker=None, redirect=HTTPS_REDIRECT)
    return VirtualHost(name=f"{name}:https_redirect", domains=(name,), routes=(route,))


@dataclass(frozen=True, slots=True)
class PortHosts:
    """What a gateway port serves: host patterns of its servers, and those whose server redirects to https."""

    number: int
    hosts: tuple[str, ...]
    redirect: tuple[str, ...] = ()
    tls: bool = False  # the port terminates TLS: x-forwarded-proto is https

    @classmethod
    def of(cls, number: int, servers: Iterable[m.GatewayServer]) -> PortHosts:
        hosts: dict[str, None] = {}
        redirect: dict[str, None] = {}
        tls = False
        for server in servers:
            tls = tls or (server.tls is not None and server.tls.mode in TERMINATING)
            for host in server.hosts:
                name = server_host(host)
                hosts.setdefault(name)
                if server.tls is not None and server.tls.https_redirect and server.port.protocol != "HTTPS":
                    redirect.setdefault(name)
        return cls(number, tuple(hosts), tuple(redirect), tls)


def port_table(table: RouteTable, port: PortHosts) -> RouteTable:
    """`table` (the gateway's routes) narrowed to the hosts of one port's servers, with https redirects."""
    patterns = [h for h in port.hosts if h not in port.redirect]
    redirect = port.redirect
    exact: dict[str, VirtualHost] = {}
    wildcards: list[tuple[str, VirtualHost]] = []
    catch_all: VirtualHost | None = None

    def add(pattern: str, vhost: VirtualHost) -> None:
        nonlocal catch_all
        if pattern == ANY_HOST:
            catch_all = catch_all or vhost
        elif pattern.startswith("*."):
            if all(suffix != pattern[1:] for suffix, _ in wildcards):
                wildcards.append((pattern[1:], vhost))
        else:
            exact.setdefault(pattern, vhost)

    for pattern in redirect:  # the redirect wins for its hosts: Envoy's require_tls is on the virtual host
        add(pattern, _redirect_host(pattern))
    if ANY_HOST in patterns:
        for name, vhost in table.exact.items():
            add(name, vhost)
        for suffix, vhost in table.wildcards:
            add("*" + suffix, vhost)
        if table.catch_all is not None:
            add(ANY_HOST, table.catch_all)
    else:
        for p in patterns:
            if not p.startswith("*."):  # a host: the virtual host a request for it reaches in the whole table
                reached, _ = table.virtual_host(p.encode())
                if reached is not None:
                    add(p, reached)
                continue
            suffix = p[1:]  # ".example.com"
            for name, vhost in table.exact.items():  # narrower hosts keep their own virtual host
                if name.endswith(suffix):
                    add(name, vhost)
            broader: VirtualHost | None = table.catch_all
            for vs_suffix, vhost in table.wildcards:  # longest first
                if vs_suffix.endswith(suffix) and vs_suffix != suffix:
                    add("*" + vs_suffix, vhost)
                elif suffix.endswith(vs_suffix) and broader is table.catch_all:
                    broader = vhost
            if broader is not None:
                add(p, broader)
    wildcards.sort(key=lambda item: len(item[0]), reverse=True)
    scheme = HeaderMutation(set=((FORWARDED_PROTO, b"https" if port.tls else b"http"),))
    copies: dict[int, VirtualHost] = {}

    def edge(vhost: VirtualHost) -> VirtualHost:
        copy = copies.get(id(vhost))
        if copy is None:
            copy = copies[id(vhost)] = dataclasses.replace(
                vhost, routes=tuple(_with_request_first(route, scheme) for route in vhost.routes))
        return copy

    return RouteTable({name: edge(v) for name, v in exact.items()}, tuple((s, edge(v)) for s, v in wildcards),
                      edge(catch_all) if catch_all is not None else None, table.version, None, port.number,
                      security=table.security, policy=table.policy)


def _with_request_first(route: Route, mutation: HeaderMutation) -> Route:
    """The route with `mutation` applied to its requests before its own request header operations."""
    picker = route.picker
    if picker is None:  # a redirect or a direct response: nothing goes upstream
        return route
    choices = tuple(dataclasses.replace(d, request_headers=merge_mutations(mutation, d.request_headers))
                    for d in picker.choices)
    return dataclasses.replace(route, picker=WeightedPicker(choices, picker.upper_bounds, picker.total))


def serves(gateway: m.Gateway, names: Iterable[str]) -> bool:
    """Is this proxy (`--gateway` names: `name` or `namespace/name`) the Gateway?"""
    for name in names:
        if "/" in name:
            if name == f"{gateway.meta.namespace}/{gateway.meta.name}":
                return True
        elif name == gateway.meta.name:
            return True
    return False
