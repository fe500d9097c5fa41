"""Istio networking resources as frozen dataclasses, named as in Istio's API.

Only what the data plane acts on is typed here; every resource also keeps its
validated `spec` mapping for `/config_dump`. Durations are float seconds,
percentages are floats in 0..100, host names are as written (short names are
expanded by the compiler, which knows the namespace rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from, for messages: file and 0-based document index."""

    file: str
    doc: int

    def __str__(self) -> str:
        return f"{self.file}:{self.doc}"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""
    # The RE2 program of a regex match, compiled once by the loader (which must compile it to validate it).
    regex: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int = 0
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str = ""
    prefix_rewrite: str = ""
    authority: str = ""
    scheme: str = ""
    port: int | None = None
    derive_port: str = ""
    redirect_code: int = 301


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str = ""
    authority: str = ""
    uri_regex_match: str = ""
    uri_regex_rewrite: str = ""
    uri_regex: Any = field(default=None, compare=False, repr=False)  # uri_regex_match, compiled by the loader


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: str = ""
    retry_remote_localities: bool = False
    retry_ignore_previous_hosts: bool = True
    backoff: float | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    fixed_delay: float
    percentage: float  # 0..100; 0 when absent (a missing percentage never fires)


@dataclass(frozen=True, slots=True)
class Abort:
    http_status: int = 0
    grpc_status: str = ""
    percentage: float = 0.0


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: Delay | None = None
    abort: Abort | None = None


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()  # allowOrigins, then the deprecated exact allowOrigin
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool = False
    unmatched_preflights: str = "FORWARD"


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """Common part of every resource: identity and where it was read."""

    kind: str
    name: str
    namespace: str
    origin: Origin
    spec: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)  # metadata.annotations (meshproxy.io/* extensions)

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity as `kubectl apply` sees it: a later resource with the same key replaces this one."""
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    """A `tcp:` route's match block; `sni_hosts` only in a `tls:` route's (TLSMatchAttributes)."""

    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    gateways: tuple[str, ...] = ()
    sni_hosts: tuple[str, ...] = ()
    never: bool = False  # a condition meshproxy cannot check (the deprecated sourceSubnet): the block never matches


@dataclass(frozen=True, slots=True)
class L4Route:
    """A VirtualService `tcp:` (TCPRoute) or `tls:` (TLSRoute) entry: matches, weighted destinations."""

    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()  # RouteDestination: destination and weight (no headers)


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Resource
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]
    http: tuple[HTTPRoute, ...]
    export_to: tuple[str, ...] = ()
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()
    # meshproxy.io/retry-grpc-trailers (istio/retry_annotation.py): http route index -> response bytes held
    retry_grpc_trailers: Mapping[int, int] = field(default_factory=dict)


# ---- DestinationRule traffic policy. Fields left out in YAML keep the proto's zero value here (0, "",
# None); routing/traffic.py fills in Istio's defaults when it compiles a cluster's policy.


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str
    path: str = ""
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    """The hash key: one of header, cookie, source IP, query parameter; and the table (ring or Maglev)."""

    http_header_name: str = ""  # lower-case
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    minimum_ring_size: int = 0  # ringHash.minimumRingSize, or the deprecated top-level field
    maglev: bool = False
    maglev_table_size: int = 0  # maglev.tableSize


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: str = "UNSPECIFIED"
    consistent_hash: ConsistentHashLB | None = None


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int = 0
    connect_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int = 0
    http2_max_requests: int = 0
    max_requests_per_connection: int = 0
    max_retries: int = 0
    idle_timeout: float | None = None
    h2_upgrade_policy: str = "DEFAULT"  # DEFAULT (the mesh's: DO_NOT_UPGRADE) | DO_NOT_UPGRADE | UPGRADE
    max_concurrent_streams: int = 0
    use_client_protocol: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings = TCPSettings()
    http: HTTPSettings = HTTPSettings()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int = 5  # or the deprecated consecutiveErrors
    consecutive_gateway_errors: int = 0
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: str = "DISABLE"  # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool = False
    ca_crl: str = ""


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    """portLevelSettings[]: the blocks it sets replace the policy's for clusters of that port."""

    port: int | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Resource
    host: str
    subsets: tuple[Subset, ...]
    traffic_policy: TrafficPolicy | None = None
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str
    ports: Mapping[str, int] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: int = 0
    service_account: str = ""  # the workload's identity: its SPIFFE id is checked by ISTIO_MUTUAL clients


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Resource
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    location: str
    resolution: str
    endpoints: tuple[WorkloadEntry, ...]
    subject_alt_names: tuple[str, ...] = ()  # identities the hosts' servers may present (ISTIO_MUTUAL checks them)


@dataclass(frozen=True, slots=True)
class ServerTLSSettings:
    """A Gateway server's `tls` (istio/build_gateway.py checks it; security/server_tls.py compiles it)."""

    mode: str = "PASSTHROUGH"  # Istio's enum default
    https_redirect: bool = False
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    min_protocol_version: str = "TLS_AUTO"
    max_protocol_version: str = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayServer:
    port: ServicePort  # number, protocol (upper case), name
    hosts: tuple[str, ...]  # as written: `host`, `*`, `ns/host`
    tls: ServerTLSSettings | None = None
    name: str = ""
    path: str = ""  # `spec.servers[i]`, for messages
    unsupported: tuple[tuple[str, str], ...] = ()  # (field path, message): what meshproxy's gateway refuses


@dataclass(frozen=True, slots=True)
class Gateway:
    meta: Resource
    selector: Mapping[str, str]
    servers: tuple[GatewayServer, ...]


# ---- security.istio.io: typed as written (lists of strings, validated by the loader); security/ compiles them.


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    group: str = ""
    kind: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadScope:
    """Which workloads of its namespace a policy selects: `selector.matchLabels` (None: every workload) or
    `targetRef(s)` (Gateways and waypoints)."""

    match_labels: Mapping[str, str] | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """`from` entries OR, `to` entries OR, `when` conditions AND; the three parts AND (none given: any)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Resource
    scope: WorkloadScope
    action: str  # ALLOW | DENY | AUDIT (CUSTOM is refused by the loader)
    rules: tuple[Rule, ...]  # empty: no rules (an ALLOW policy then matches nothing)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Resource
    match_labels: Mapping[str, str] | None  # None: namespace-wide (mesh-wide in the root namespace)
    mode: str  # UNSET | DISABLE | PERMISSIVE | STRICT
    port_level_mtls: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JWTHeader:
    name: str  # lower-case
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str  # lower-case
    claim: str


@dataclass(frozen=True, slots=True)
class JWTRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""  # lower-case
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: float | None = None  # jwksUri fetch timeout, seconds


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    meta: Resource
    scope: WorkloadScope
    jwt_rules: tuple[JWTRule, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every resource of one configuration, in the order read."""

    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    files: tuple[str, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
