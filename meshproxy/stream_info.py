"""What one exchange was, as Envoy's StreamInfo: filled by the data path, read by telemetry when it is over.

`StreamInfo` is the finished-exchange record: who (listener, connection), what (the request head), where (route,
cluster, endpoint, attempts), the outcome (status, response flags, response code details), sizes and times, and
the trace context. The data path's per-request object extends it, so making the record costs nothing per request;
telemetry is typed on this class alone and never imports the data path.

Response flags are a bit mask with Envoy's own bit values, so that several flags are written in Envoy's fixed order
(`UF,URX`, never `URX,UF`) in the access log and the `response_flags` label alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .messages import RequestHead
    from .routing.cluster import Cluster, Endpoint
    from .routing.policy import Route

# Envoy's CoreResponseFlag values (envoy/stream_info/stream_info.h); the order of the names below is its order.
LH: Final = 0x1  # failed local health check
UH: Final = 0x2  # no healthy upstream
UT: Final = 0x4  # upstream request timeout
LR: Final = 0x8  # local reset
UR: Final = 0x10  # upstream remote reset
UF: Final = 0x20  # upstream connection failure
UC: Final = 0x40  # upstream connection termination
UO: Final = 0x80  # upstream overflow (circuit breaker)
NR: Final = 0x100  # no route
DI: Final = 0x200  # delay injected
FI: Final = 0x400  # fault (abort) injected
RL: Final = 0x800  # rate limited
UAEX: Final = 0x1000  # unauthorized by the external authorization service
RLSE: Final = 0x2000  # rate limit service error
DC: Final = 0x4000  # downstream connection termination
URX: Final = 0x8000  # upstream retry limit exceeded
SI: Final = 0x10000  # stream idle timeout
IH: Final = 0x20000  # invalid x-envoy-* request headers
DPE: Final = 0x40000  # downstream protocol error
UMSDR: Final = 0x80000  # upstream max stream duration reached
RFCF: Final = 0x100000  # response from cache filter
NFCF: Final = 0x200000  # no filter config found
DT: Final = 0x400000  # duration timeout
UPE: Final = 0x800000  # upstream protocol error
NC: Final = 0x1000000  # no cluster
OM: Final = 0x2000000  # overload manager
DF: Final = 0x4000000  # DNS resolution failed
DO: Final = 0x8000000  # drop overload
DR: Final = 0x10000000  # downstream remote reset
UDO: Final = 0x20000000  # unconditional drop overload

FLAG_NAMES: Final = (
    (LH, "LH"), (UH, "UH"), (UT, "UT"), (LR, "LR"), (UR, "UR"), (UF, "UF"), (UC, "UC"), (UO, "UO"), (NR, "NR"),
    (DI, "DI"), (FI, "FI"), (RL, "RL"), (UAEX, "UAEX"), (RLSE, "RLSE"), (DC, "DC"), (URX, "URX"), (SI, "SI"),
    (IH, "IH"), (DPE, "DPE"), (UMSDR, "UMSDR"), (RFCF, "RFCF"), (NFCF, "NFCF"), (DT, "DT"), (UPE, "UPE"), (NC, "NC"),
    (OM, "OM"), (DF, "DF"), (DO, "DO"), (DR, "DR"), (UDO, "UDO"),
)
_FLAG_TEXT: Final[dict[int, str]] = {0: "-"}


def flags_text(flags: int) -> str:
    """`UF,URX` as Envoy's %RESPONSE_FLAGS% writes it, `-` for none (cached: a proxy sees few combinations)."""
    text = _FLAG_TEXT.get(flags)
    if text is None:
        text = ",".join(name for bit, name in FLAG_NAMES if flags & bit) or "-"
        if len(_FLAG_TEXT) < 4096:
            _FLAG_TEXT[flags] = text
    return text


def flag_bits(text: str) -> int:
    """The inverse of flags_text, for tests and tools: `UF,URX` -> UF | URX."""
    names = {name: bit for bit, name in FLAG_NAMES}
    return 0 if text in ("", "-") else sum(names[name] for name in text.split(","))


VIA_UPSTREAM: Final = "via_upstream"
NOT_GRPC: Final = -1  # StreamInfo.grpc_status of a request that is not gRPC
GRPC_NO_STATUS: Final = -2  # a gRPC request whose status is not known (yet, or ever: a reset)


class ConnectionInfo:
    """The downstream connection a request came on, as telemetry needs it; addresses are looked up once."""

    __slots__ = ("peer_ip", "transport", "addresses", "peer_principal", "requested_server_name",
                 "original_destination")

    def __init__(self, peer_ip: bytes = b"unknown", transport: Any = None, peer_principal: str = "") -> None:
        self.peer_ip = peer_ip
        self.transport = transport
        self.addresses: tuple[str, str] | None = None  # (local, remote) as the access log writes them
        # The client's SPIFFE identity from its verified certificate, as Istio's source.principal
        # (`cluster.local/ns/default/sa/sleep`); "" on a plaintext connection (or a certificate naming none).
        self.peer_principal = peer_principal
        self.requested_server_name = ""  # the SNI of a TLS connection (Envoy's; AuthorizationPolicy's connection.sni)
        # (address, port) before iptables redirected it (SO_ORIGINAL_DST), read once on transparent listeners;
        # None elsewhere. An ORIGINAL_DST cluster (PassthroughCluster) connects there.
        self.original_destination: tuple[str, int] | None = None

    def log_addresses(self) -> tuple[str, str]:
        addresses = self.addresses
        if addresses is None:  # get_extra_info is a syscall each time under uvloop
            original = self.original_destination  # as Envoy's %DOWNSTREAM_LOCAL_ADDRESS% on a redirected connection
            local = format_address(original) if original is not None else _address(self.transport, "sockname")
            addresses = self.addresses = (local, _address(self.transport, "peername"))
        return addresses


class L4Info:
    """What one proxied TCP connection was (Envoy's TCP proxy StreamInfo): read by telemetry at open and close."""

    __slots__ = ("connection", "cluster", "endpoint", "rule", "flags", "start", "received", "sent", "sni",
                 "upstream_local", "series", "upstream_principal", "transport_failure", "upstream_peer",
                 "termination_details")

    def __init__(self, connection: ConnectionInfo, start: float) -> None:
        self.connection = connection
        self.cluster: Cluster | None = None
        self.endpoint: str = ""  # `address:port` connected to ("" before a pick)
        self.rule = ""  # the tcp:/tls: rule that chose the cluster ("" for the default)
        self.flags = 0
        self.start = start
        self.received = 0  # bytes from downstream, sent upstream (Istio's istio_tcp_received_bytes_total)
        self.sent = 0  # bytes from upstream, sent downstream (istio_tcp_sent_bytes_total)
        self.sni = ""  # the ClientHello's server name, for TLS passthrough
        self.upstream_local = ""
        self.series: Any = None  # telemetry's counters of this connection, bound at open
        self.upstream_principal = ""  # the upstream's SPIFFE principal over mutual TLS (destination_principal)
        self.transport_failure = ""  # why the upstream connect or TLS handshake failed, in Envoy's words
        self.upstream_peer = b""  # the upstream's metadata from Istio's TCP metadata exchange (b"": none)
        self.termination_details = ""  # why the proxy closed it (Envoy's %CONNECTION_TERMINATION_DETAILS%: rbac)


def format_address(address: tuple[Any, ...] | None) -> str:
    if not address:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _address(transport: object, key: str) -> str:
    info = getattr(transport, "get_extra_info", None)
    address = info(key) if info is not None else None
    if not address:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class StreamInfo:
    """The finished-exchange record (see the module docstring). Times are `time.monotonic()` seconds."""

    __slots__ = (
        "head", "connection", "route", "cluster", "endpoint", "attempts", "reused_retries", "status", "flags",
        "details", "start", "body_size", "response_bytes", "request_id", "trace", "peer", "upstream_principal",
        "transport_failure", "retry_reasons", "grpc_status", "request_messages", "response_messages",
    )
    # `retry_reasons` (why each retry was made, in order) is set only when the exchange retries: never assigned
    # here, so a request that is not retried pays nothing for it; read it with getattr(info, "retry_reasons", ()).
    retry_reasons: list[str]

    def __init__(self, head: RequestHead, connection: ConnectionInfo, start: float) -> None:
        self.head = head
        self.connection = connection
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.endpoint: Endpoint | None = None
        self.attempts = 0  # upstream attempts made (Envoy's %UPSTREAM_REQUEST_ATTEMPT_COUNT%)
        self.reused_retries = 0  # free retries after a reused keep-alive connection was reset (README)
        self.status = 0  # 0 when no response was sent
        self.flags = 0  # response flags, Envoy's bits
        self.details = ""  # Envoy's %RESPONSE_CODE_DETAILS%; "" until known
        self.start = start
        self.body_size = 0  # request body bytes
        self.response_bytes = 0  # response body bytes
        self.request_id: bytes | None = None
        self.trace: tuple[bytes, bytes, bytes | None] | None = None  # (trace id, span id, parent id) when sampled
        self.peer: bytes | None = None  # the other side's peer metadata header
        self.upstream_principal = ""  # the upstream server's SPIFFE principal, when its connection is mutual TLS
        self.transport_failure = ""  # Envoy's %UPSTREAM_TRANSPORT_FAILURE_REASON% of the failure answered (TLS_error...)
        self.grpc_status = NOT_GRPC  # a gRPC request's status (grpc-status of the response), set by its transport
        self.request_messages = 0  # gRPC messages each way, counted by the transport of a gRPC request
        self.response_messages = 0

    def response_code_details(self) -> str:
        return code_details(self.details, self.status, self.cluster is not None)


def code_details(details: str, status: int, upstream: bool) -> str:
    """%RESPONSE_CODE_DETAILS% of a record whose `details` were not set by a local reply."""
    if details:
        return details
    if status == 0:
        return "-"
    return VIA_UPSTREAM if upstream else "direct_response"
