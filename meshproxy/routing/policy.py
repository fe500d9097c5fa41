"""Compiled per-route policy (Envoy's names): what a request does once its route is known.

Every field is ready to use on the hot path: bytes for header names, bitmasks for
retry conditions, per-million integers for fault percentages, float seconds.
Shared defaults (NO_RETRY, NO_FAULT, NO_HEADERS) stand in for "none".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Final

from ..istio.values import RETRY_ON_BITS, retry_on_tokens
from .cluster import Cluster
from .cors import CorsPolicy
from .rewrite import Redirect, Rewrite

if TYPE_CHECKING:
    from .match import MatchInput, RouteMatch
    from .picker import WeightedPicker

# Retry-on conditions as bits (Envoy RetryPolicy::RETRY_ON_*), named from the one retryOn table.
RETRY_ON_5XX: Final = RETRY_ON_BITS["5xx"]
RETRY_ON_GATEWAY_ERROR: Final = RETRY_ON_BITS["gateway-error"]
RETRY_ON_CONNECT_FAILURE: Final = RETRY_ON_BITS["connect-failure"]
RETRY_ON_RETRIABLE_4XX: Final = RETRY_ON_BITS["retriable-4xx"]
RETRY_ON_REFUSED_STREAM: Final = RETRY_ON_BITS["refused-stream"]
RETRY_ON_RETRIABLE_STATUS_CODES: Final = RETRY_ON_BITS["retriable-status-codes"]
RETRY_ON_RESET: Final = RETRY_ON_BITS["reset"]
RETRY_ON_RESET_BEFORE_REQUEST: Final = RETRY_ON_BITS["reset-before-request"]
RETRY_ON_RETRIABLE_HEADERS: Final = RETRY_ON_BITS["retriable-headers"]
RETRY_ON_ENVOY_RATELIMITED: Final = RETRY_ON_BITS["envoy-ratelimited"]
RETRY_ON_HTTP3_POST_CONNECT_FAILURE: Final = RETRY_ON_BITS["http3-post-connect-failure"]
RETRY_ON_GRPC_CANCELLED: Final = RETRY_ON_BITS["cancelled"]
RETRY_ON_GRPC_DEADLINE_EXCEEDED: Final = RETRY_ON_BITS["deadline-exceeded"]
RETRY_ON_GRPC_INTERNAL: Final = RETRY_ON_BITS["internal"]
RETRY_ON_GRPC_RESOURCE_EXHAUSTED: Final = RETRY_ON_BITS["resource-exhausted"]
RETRY_ON_GRPC_UNAVAILABLE: Final = RETRY_ON_BITS["unavailable"]
RETRY_ON_GRPC_ANY: Final = (RETRY_ON_GRPC_CANCELLED | RETRY_ON_GRPC_DEADLINE_EXCEEDED | RETRY_ON_GRPC_INTERNAL
                           | RETRY_ON_GRPC_RESOURCE_EXHAUSTED | RETRY_ON_GRPC_UNAVAILABLE)

# Istio's default when a route has no `retries` (retry.go DefaultPolicy, 1.24+: no 503).
DEFAULT_RETRY_ON: Final = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS: Final = 2
DEFAULT_BACKOFF_BASE: Final = 0.025


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    num_retries: int
    retry_on: int  # RETRY_ON_* bits
    retriable_status_codes: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_BASE * 10
    avoid_previous_hosts: bool = True
    # meshproxy extension (annotation meshproxy.io/retry-grpc-trailers): a gRPC response whose status comes in
    # trailers is held up to this many bytes, so a retriable status there is retried too; 0: off (Envoy's way)
    grpc_trailers_bytes: int = 0

    @classmethod
    def compile(cls, attempts: int, retry_on: str, per_try_timeout: float | None = None,
                backoff: float | None = None, avoid_previous_hosts: bool = True) -> RetryPolicy:
        if attempts <= 0:
            return NO_RETRY
        bits, codes = 0, set()
        for token in retry_on_tokens(retry_on):
            if token.isdigit():
                codes.add(int(token))
                bits |= RETRY_ON_RETRIABLE_STATUS_CODES  # Istio appends it for bare codes
            else:
                bits |= RETRY_ON_BITS[token]
        base = backoff if backoff is not None else DEFAULT_BACKOFF_BASE
        return cls(attempts, bits, frozenset(codes), per_try_timeout, base, base * 10, avoid_previous_hosts)


NO_RETRY: Final = RetryPolicy(num_retries=0, retry_on=0)
DEFAULT_RETRY: Final = RetryPolicy.compile(DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_ON)


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Percentages as Istio sends them to Envoy: per million, truncated (0.57 % -> 5699)."""

    delay: float = 0.0
    delay_per_million: int = 0
    abort_status: int = 0
    abort_grpc_status: str = ""
    abort_per_million: int = 0
    active: bool = field(init=False, compare=False, default=False)  # computed: read on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", self.delay_per_million > 0 or self.abort_per_million > 0)


NO_FAULT: Final = FaultPolicy()


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """Envoy order: remove, then set (overwrite or add), then add (append)."""

    remove: frozenset[bytes] = frozenset()
    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    empty: bool = field(init=False, compare=False, default=True)  # computed: read on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty", not (self.remove or self.set or self.add))


NO_HEADERS: Final = HeaderMutation()


def merge_mutations(first: HeaderMutation, then: HeaderMutation) -> HeaderMutation:
    """Apply `first`, then `then` (whose `set` wins)."""
    if first.empty:
        return then
    if then.empty:
        return first
    set_ = tuple(dict(first.set + then.set).items())  # one value per name: the later `set` wins
    return HeaderMutation(first.remove | then.remove, set_, first.add + then.add)


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """One weighted destination. `cluster` is None when Istio would have no such cluster (503 NC)."""

    host: str
    subset: str
    cluster: Cluster | None
    by_port: Mapping[int, Cluster] = field(default_factory=dict)  # service with several ports, no port given
    request_headers: HeaderMutation = NO_HEADERS
    response_headers: HeaderMutation = NO_HEADERS

    def cluster_for(self, port: int) -> Cluster | None:
        if self.by_port:
            return self.by_port.get(port) or self.cluster
        return self.cluster


ACTION_ROUTE: Final = 0
ACTION_REDIRECT: Final = 1
ACTION_DIRECT_RESPONSE: Final = 2

STICKY_HEADER: Final = "header"
STICKY_COOKIE: Final = "cookie"
COOKIE: Final = b"cookie"


def sticky_hash(value: bytes) -> int:
    """Stable 64-bit hash of a sticky key: the same in every process and release (not Python's salted
    `hash()`), so every worker and every proxy of a workload sends one user to one version."""
    return int.from_bytes(blake2b(value, digest_size=8).digest(), "big")


def cookie_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Value of cookie `name` from the Cookie header lines (first occurrence; quotes removed, as Envoy's
    parseCookieValue)."""
    for key, value in headers:
        if key != COOKIE:
            continue
        for pair in value.split(b";"):
            cookie, sep, content = pair.strip().partition(b"=")
            if sep and cookie == name:
                if len(content) >= 2 and content[:1] == content[-1:] == b'"':
                    content = content[1:-1]
                return content
    return None


@dataclass(frozen=True, slots=True)
class StickyKey:
    """meshproxy extension: what a weighted pick hashes on so one user stays on one destination.

    Set per VirtualService with the annotation `meshproxy.io/sticky-header: <header name>` or
    `meshproxy.io/sticky-cookie: <cookie name>` (Istio has no field for it: its weighted pick is per
    request, istio/istio#9764). See Route.pick.
    """

    kind: str  # STICKY_HEADER | STICKY_COOKIE
    name: bytes  # header name lower-case, or cookie name as written

    def value(self, req: MatchInput) -> bytes | None:
        if self.kind == STICKY_COOKIE:
            return cookie_value(req.headers, self.name)
        name = self.name
        for key, value in req.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Mirror:
    """A shadow copy of the request to another destination, fire-and-forget (`-shadow` host suffix)."""

    destination: RouteDestination
    per_million: int  # mirrorPercentage, as a fraction of a million (absent: 100 %)


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # Envoy route name: `<http route name>.<match name>` or "default"
    virtual_service: str  # "namespace/name", or "" for a default route
    index: int  # HTTPRoute index in its VirtualService (-1 for a default route)
    match: RouteMatch
    action: int
    picker: WeightedPicker[RouteDestination] | None
    timeout: float | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    fault: FaultPolicy = NO_FAULT
    request_headers: HeaderMutation = NO_HEADERS
    response_headers: HeaderMutation = NO_HEADERS
    direct_status: int = 0
    direct_body: bytes = b""
    redirect: Redirect | None = None
    operation: str = ""  # span name / decorator, e.g. reviews.default.svc.cluster.local:9080/*
    sticky: StickyKey | None = None  # meshproxy.io/sticky-header or -cookie of the VirtualService
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: CorsPolicy | None = None
    only: RouteDestination | None = field(init=False, compare=False, default=None)  # one destination: no pick

    def __post_init__(self) -> None:
        if self.picker is not None and len(self.picker.choices) == 1:
            object.__setattr__(self, "only", self.picker.choices[0])

    def pick(self, req: MatchInput, randbelow: Callable[[int], int]) -> RouteDestination:
        """The destination for this request: Envoy's weighted pick (`randbelow(total)` over cumulative
        ranges), or, when the route is sticky and the request carries the key, the stable hash of the
        key's value over the same ranges, so one user always lands on one destination while the weights
        stay the same. Changing weights moves only the users whose hash falls in the changed part of a
        range. A request without the key falls back to the random pick. Only ACTION_ROUTE routes pick.
        """
        picker = self.picker
        assert picker is not None
        sticky = self.sticky
        if sticky is not None and len(picker.choices) > 1:
            value = sticky.value(req)
            if value is not None:
                return picker.pick_hashed(sticky_hash(value))
        return picker.pick(randbelow)
