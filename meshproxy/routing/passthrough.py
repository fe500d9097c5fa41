"""The transparent outbound listener's route table: the config's, plus Istio's catch-all virtual host.

Istio adds one more virtual host, domain `*`, to a sidecar's outbound HTTP routes, for hosts outside the
registry (BuildCatchAllVirtualHost): under ALLOW_ANY its route `allow_any` sends to PassthroughCluster (the
connection's original destination, no timeout, no retries); under REGISTRY_ONLY its route `block_all` answers
502 itself, reported as BlackHoleCluster. The explicit outbound listener (`--listen`) keeps 404 `NR` for them: its
client named the host, there is no original destination to pass through to.
"""

from __future__ import annotations

from typing import Final

from .l4 import ALLOW_ANY, BLACKHOLE, BLACKHOLE_CLUSTER, PASSTHROUGH, PASSTHROUGH_CLUSTER
from .match import CATCH_ALL
from .picker import WeightedPicker
from .policy import ACTION_DIRECT_RESPONSE, ACTION_ROUTE, NO_RETRY, Route, RouteDestination
from .table import RouteTable, VirtualHost

ALLOW_ANY_ROUTE: Final = Route(
    name="allow_any", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_ROUTE,
    picker=WeightedPicker.compile([(RouteDestination(PASSTHROUGH_CLUSTER, "", PASSTHROUGH), 1)]), retry=NO_RETRY,
    operation=PASSTHROUGH_CLUSTER)
BLOCK_ALL_ROUTE: Final = Route(
    name="block_all", virtual_service="", index=-1, match=CATCH_ALL, action=ACTION_DIRECT_RESPONSE,
    picker=WeightedPicker.compile([(RouteDestination(BLACKHOLE_CLUSTER, "", BLACKHOLE), 1)]), retry=NO_RETRY,
    direct_status=502, operation=BLACKHOLE_CLUSTER)
ALLOW_ANY_HOST: Final = VirtualHost("allow_any", ("*",), (ALLOW_ANY_ROUTE,))
BLOCK_ALL_HOST: Final = VirtualHost("block_all", ("*",), (BLOCK_ALL_ROUTE,))


def transparent_table(table: RouteTable, port: int) -> RouteTable:
    """The same virtual hosts, and the catch-all one of the table's outboundTrafficPolicy, for connections to `port`
    (the port of a Host header without one); made once per port and reload, never per request."""
    policy = table.destinations.outbound_policy if table.destinations is not None else ALLOW_ANY
    catch_all = table.catch_all or (ALLOW_ANY_HOST if policy == ALLOW_ANY else BLOCK_ALL_HOST)
    return RouteTable(exact=table.exact, wildcards=table.wildcards, catch_all=catch_all, version=table.version,
                      destinations=table.destinations, default_port=port)
