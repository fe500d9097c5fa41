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
_FLAG_TEXT: dict[int, str] = {0: "-"}


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

    __slots__ = ("peer_ip", "transport", "addresses")

    def __init__(self, peer_ip: bytes = b"unknown", transport: Any = None) -> None:
        self.peer_ip = peer_ip
        self.transport = transport
        self.addresses: tuple[str, str] | None = None  # (local, remote) as the access log writes them

    def log_addresses(self) -> tuple[str, str]:
        addresses = self.addresses
        if addresses is None:  # get_extra_info is a syscall each time under uvloop
            addresses = self.addresses = (_address(self.transport, "sockname"), _address(self.transport, "peername"))
        return addresses


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
        "details", "start", "body_size", "response_bytes", "request_id", "trace", "peer", "grpc_status",
        "request_messages", "response_messages",
    )

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
        self.grpc_status = NOT_GRPC  # a gRPC request's status (grpc-status of the response), set by its transport
        self.request_messages = 0  # gRPC messages each way, counted by the transport of a gRPC request
        self.response_messages = 0

    def response_code_details(self) -> str:
        if self.details:
            return self.details
        if self.status == 0:
            return "-"
        return VIA_UPSTREAM if self.cluster is not None else "direct_response"
