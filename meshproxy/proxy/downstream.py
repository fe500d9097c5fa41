"""What every downstream connection of one listener shares (limits, budget, table, pool, telemetry), whatever its
wire protocol, and `Connection`, what the listener asks of each (drain). What the exchange asks of a connection
is `exchange.Downstream`, beside the Stream it passes.
"""

from __future__ import annotations

import random
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ..http1.head import DEFAULT_POLICY, ENVOY_CONTROL_HEADERS, ENVOY_PREFIX, HeadPolicy
from ..http1.wire import HOP_BY_HOP
from ..routing.policy import HeaderMutation
from ..routing.table import RouteTable
from ..telemetry.access_log import AccessLog
from ..telemetry.core import Telemetry
from ..telemetry.peer import PEER_HEADERS
from .balancer import Clusters
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from ..settings import Settings

MAX_CONNECTIONS_CAP: Final = 50_000  # Envoy's edge advice for global_downstream_max_connections

H2C_SETTINGS: Final = frozenset({b"http2-settings"})  # only meaningful with an h2c upgrade, which is not taken
# Request headers the proxy writes itself upstream (the exchange): the client's are never forwarded. And
# x-forwarded-for on a listener that appends to it (ListenerLimits.appends_forwarded_for).
PROXY_SET_HEADERS: Final = frozenset({b"host", b"x-envoy-attempt-count", b"x-envoy-expected-rq-timeout-ms",
                                      b"x-envoy-original-path"})
FORWARDED_FOR_NAME: Final = frozenset({b"x-forwarded-for"})

EDGE_NONE: Final = "none"  # outbound sidecar listener: the client is the local app
EDGE_INBOUND: Final = "inbound"  # inbound sidecar listener: Envoy's control headers stripped
EDGE_GATEWAY: Final = "gateway"  # gateway: every x-envoy-* request header stripped


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """One listener's request limits and timeouts (seconds; 0 disables a timeout)."""

    head: HeadPolicy = DEFAULT_POLICY
    request_headers_timeout: float = 10.0
    idle_timeout: float = 3600.0  # Envoy's HTTP connection idle_timeout default (1 h)
    stream_idle_timeout: float = 300.0  # Envoy's default (5 min)
    # Envoy's use_remote_address, as istiod sets it: a gateway appends its client's address to x-forwarded-for; a
    # sidecar's listeners (inbound, outbound) pass the header on as it came, and add none
    appends_forwarded_for: bool = False


DEFAULT_LIMITS: Final = ListenerLimits()


def default_max_connections() -> int:
    """Half the open-file limit (a client connection may need an upstream one too), at most 50 000."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_CONNECTIONS_CAP
    return max(1, min(MAX_CONNECTIONS_CAP, soft // 2))


class ConnectionBudget:
    """Downstream connections open across the listeners of one process; 0 = no limit."""

    __slots__ = ("limit", "open", "refused")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    def take(self) -> bool:
        if self.limit and self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


def listener_limits(settings: Settings, edge: str = EDGE_NONE) -> ListenerLimits:
    """Settings -> the limits of one listener; `edge` says which x-envoy-* headers it strips."""
    strip_names: frozenset[bytes] = ENVOY_CONTROL_HEADERS if edge == EDGE_INBOUND else frozenset()
    strip_prefix = ENVOY_PREFIX if edge == EDGE_GATEWAY else b""
    head = HeadPolicy(max_header_bytes=settings.max_request_headers_kb * 1024,
                      max_header_count=settings.max_request_headers_count,
                      max_body_bytes=settings.max_request_body, underscores=settings.headers_with_underscores,
                      strip_names=strip_names, strip_prefix=strip_prefix, accept_http10=settings.accept_http10)
    return ListenerLimits(head, settings.request_headers_timeout, settings.idle_timeout,
                          settings.stream_idle_timeout, appends_forwarded_for=edge == EDGE_GATEWAY)


def connection_budget(settings: Settings) -> ConnectionBudget:
    limit = settings.max_connections
    return ConnectionBudget(default_max_connections() if limit == 0 else max(0, limit))


class Connection:
    """A downstream connection as its listener sees it."""

    __slots__ = ()

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        raise NotImplementedError

    def reset_after_write(self) -> None:
        """Abort the connection now (the drain time is over, or a response was cut short)."""
        raise NotImplementedError


@dataclass(slots=True)
class ListenerContext:
    """What every connection of one listener shares."""

    name: str  # "outbound" or "inbound"
    table: RouteTable  # read once per request; replaced whole by a reload
    pool: UpstreamPool
    server_name: bytes = b"envoy"
    response_mutation: HeaderMutation | None = None
    rng: random.Random = field(default_factory=random.Random)
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False
    # While draining, an idle HTTP/1.1 connection is closed at once (True), or kept until its next response, which
    # says `connection: close`, or the drain's end (False: a sidecar's listeners stay open; closing an idle
    # connection would race a request its client is sending on it). HTTP/2 gets GOAWAY either way.
    drain_closes_idle: bool = True
    clusters: Clusters = field(default_factory=Clusters)  # shared by all listeners of the process
    telemetry: Telemetry | None = None
    limits: ListenerLimits = DEFAULT_LIMITS
    budget: ConnectionBudget = field(default_factory=ConnectionBudget)  # shared by all listeners of the process
    follows_config: bool = False  # the app gives it each reloaded table (the outbound listener)
    retry_reused: bool = True  # one free retry of an idempotent request whose reused connection was reset (README)
    secure: bool = False  # its connections may be TLS (secure_server.py): each reads its peer's identity once

    strip_request: frozenset[bytes] = field(init=False)  # the client's request headers never forwarded (computed)
    randbelow: Callable[[int], int] = field(init=False)  # rng.randrange, bound once (each HTTP/2 stream reads it)

    def __post_init__(self) -> None:
        if self.telemetry is None:
            self.telemetry = Telemetry(self.name, "outbound", AccessLog())
        self.randbelow = self.rng.randrange
        # once, not per connection: hop-by-hop, what the proxy sets itself, what telemetry replaces, and on a listener
        # whose clients are not the local app (inbound, gateway) the peer metadata, never given to the app even when
        # the metrics that read it are off
        head = self.limits.head
        edge = PEER_HEADERS if head.strip_names or head.strip_prefix else frozenset()
        appended = FORWARDED_FOR_NAME if self.limits.appends_forwarded_for else frozenset()
        self.strip_request = HOP_BY_HOP | H2C_SETTINGS | PROXY_SET_HEADERS | self.telemetry.strip_request | edge | \
            appended

    def start_draining(self, close_idle: bool = True) -> None:
        self.draining = True
        self.drain_closes_idle = close_idle
        for conn in list(self.connections):
            conn.drain()
