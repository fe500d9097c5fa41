"""Access log: one line per request to stdout, Istio's default text format, or Istio's JSON keys.

Off by default (as in Istio without meshConfig.accessLogFile): then the exchange pays one attribute check.
The text line is Istio's `EnvoyTextLogFormat` (pilot/pkg/model/telemetry_logging.go):

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
    "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS%
    %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%

(one line). JSON uses the keys of Istio's `EnvoyJSONLogFormatIstio`, plus `listener`. Response flags are
Envoy's (`-` when none); bytes are body bytes; what meshproxy does not know (upstream local address,
upstream service time, TLS server name) is `-` as in Envoy.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from ..proxy.exchange import Stream

FORMATS: Final = ("off", "text", "json")

# Envoy's %RESPONSE_CODE_DETAILS% for the replies a flag stands for (StreamInfo::ResponseCodeDetails).
DETAILS: Final = {
    "NR": "route_not_found",
    "NC": "cluster_not_found",
    "UH": "no_healthy_upstream",
    "UF": "upstream_reset_before_response_started{connection_failure}",
    "UO": "upstream_reset_before_response_started{overflow}",
    "UPE": "upstream_reset_before_response_started{protocol_error}",
    "UT": "response_timeout",
    "SI": "stream_idle_timeout",
    "FI": "fault_filter_abort",
    "DC": "downstream_remote_disconnect",
    "DPE": "http1.codec_error",
}


class AccessLog:
    __slots__ = ("enabled", "format", "out")

    def __init__(self, fmt: str = "off", out: TextIO | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self.out = out or sys.stdout
        self.enabled = fmt != "off"  # read on every request

    def fields(self, stream: Stream, listener: str) -> dict[str, object]:
        head = stream.head
        route = stream.route
        get = head.header
        elapsed = time.monotonic() - stream.start
        conn = stream.conn
        addresses = conn.log_addresses
        if addresses is None:  # once per connection: get_extra_info is a syscall each time under uvloop
            addresses = conn.log_addresses = (_address(conn.transport, "sockname"), _address(conn.transport, "peername"))
        return {
            "start_time": datetime.fromtimestamp(time.time() - elapsed, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": head.method.decode("latin-1"),
            "path": head.path_and_query.decode("latin-1"),
            "protocol": "HTTP/" + head.version.decode(),
            "response_code": stream.status,
            "response_flags": ",".join(stream.flags) or "-",
            "response_code_details": response_code_details(stream),
            "connection_termination_details": "-",
            "upstream_transport_failure_reason": "-",
            "bytes_received": stream.body_size,
            "bytes_sent": stream.response_bytes,
            "duration": int(elapsed * 1000),
            "upstream_service_time": "-",
            "x_forwarded_for": _text(get(b"x-forwarded-for")),
            "user_agent": _text(get(b"user-agent")),
            "request_id": _text(stream.request_id),
            "authority": head.authority.decode("latin-1"),
            "upstream_host": str(stream.endpoint) if stream.endpoint else "-",
            "upstream_cluster": stream.cluster.name if stream.cluster else "-",
            "upstream_local_address": "-",
            "downstream_local_address": addresses[0],
            "downstream_remote_address": addresses[1],
            "requested_server_name": "-",
            "route_name": (route.name or "-") if route else "-",
            "listener": listener,
        }

    def log(self, stream: Stream, listener: str) -> None:
        f = self.fields(stream, listener)
        if self.format == "json":
            line = json.dumps(f, separators=(",", ":"))
        else:
            line = (
                f'[{f["start_time"]}] "{f["method"]} {f["path"]} {f["protocol"]}" {f["response_code"]} '
                f'{f["response_flags"]} {f["response_code_details"]} {f["connection_termination_details"]} '
                f'"{f["upstream_transport_failure_reason"]}" {f["bytes_received"]} {f["bytes_sent"]} '
                f'{f["duration"]} {f["upstream_service_time"]} "{f["x_forwarded_for"]}" "{f["user_agent"]}" '
                f'"{f["request_id"]}" "{f["authority"]}" "{f["upstream_host"]}" {f["upstream_cluster"]} '
                f'{f["upstream_local_address"]} {f["downstream_local_address"]} {f["downstream_remote_address"]} '
                f'{f["requested_server_name"]} {f["route_name"]}'
            )
        self.out.write(line + "\n")
        self.out.flush()


def response_code_details(stream: Stream) -> str:
    """Why this response: the local reply a flag stands for, else `via_upstream` when an upstream answered."""
    for flag in stream.flags:
        detail = DETAILS.get(flag)
        if detail is not None:
            return detail
        if flag == "UC":
            return ("upstream_reset_after_response_started{connection_termination}" if stream.status and
                    stream.response_bytes else "upstream_reset_before_response_started{connection_termination}")
    if stream.status == 0:
        return "-"
    if stream.cluster is not None:
        return "via_upstream"
    return "direct_response"


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value is not None else "-"


def _address(transport: object, key: str) -> str:
    info = getattr(transport, "get_extra_info", None)
    address = info(key) if info is not None else None
    if not address:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
