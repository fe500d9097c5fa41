"""The inbound side's route table: every request to the local app (Istio's inbound|PORT|| cluster)."""

from __future__ import annotations

from typing import Final

from .cluster import Cluster, Endpoint
from .match import CATCH_ALL
from .picker import WeightedPicker
from .policy import ACTION_ROUTE, HeaderMutation, RetryPolicy, Route, RouteDestination
from .table import RouteTable, VirtualHost

INBOUND_SERVER: Final = HeaderMutation(set=((b"server", b"istio-envoy"),))
# Istio's inbound route retry: only what cannot have reached the app (ConvertInboundPolicy).
INBOUND_RETRY: Final = RetryPolicy.compile(2, "reset-before-request,connect-failure")


def inbound_route_table(app: tuple[str, int], bind_address: str = "") -> RouteTable:
    """Every request goes to the app at `app` (cluster inbound|PORT||), from `bind_address` when given (the
    transparent inbound listener's 127.0.0.6)."""
    port = app[1]
    # The app's protocol is not declared here: as Istio's inbound cluster of a sniffed port, it follows the client's
    # (an HTTP/2 or gRPC client reaches the app over HTTP/2, an HTTP/1.1 one over HTTP/1.1).
    cluster = Cluster(Cluster.name_of("inbound", port, "", ""), "", port, "", (Endpoint(app[0], port),),
                      bind_address=bind_address, follows_client=True)
    dest = RouteDestination("", "", cluster)
    route = Route(name="default", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_ROUTE,
                  picker=WeightedPicker.compile([(dest, 1)]), retry=INBOUND_RETRY, operation=f"inbound|{port}||")
    vhost = VirtualHost(f"inbound|http|{port}", ("*",), (route,))
    return RouteTable(exact={}, wildcards=(), catch_all=vhost)


def enforcing(routes: RouteTable, config: RouteTable, port: int) -> RouteTable:
    """An inbound listener's routes with the workload's policy for the app port `port` (AuthorizationPolicy,
    RequestAuthentication): what the traffic this workload receives must pass, on every inbound listener alike."""
    return routes.with_policy(config.security.bind(port, remote_from_xff=True))
