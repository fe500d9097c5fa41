"""Access log: one line per request, Envoy/Istio's default text format, or JSON.

Off by default (as in Istio without meshConfig.accessLogFile): then the exchange
pays one attribute check. Response flags are Envoy's (`-` when none).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..proxy.exchange import Stream

FORMATS = ("off", "text", "json")


class AccessLog:
    __slots__ = ("format", "out")

    def __init__(self, fmt: str = "off", out: TextIO | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self.out = out or sys.stdout

    @property
    def enabled(self) -> bool:
        return self.format != "off"

    def fields(self, stream: Stream, listener: str) -> dict[str, object]:
        head = stream.head
        route = stream.route
        get = head.header
        return {
            "start_time": datetime.fromtimestamp(time.time() - (time.monotonic() - stream.start), timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": head.method.decode("latin-1"),
            "path": head.path_and_query.decode("latin-1"),
            "protocol": "HTTP/" + head.version.decode(),
            "response_code": stream.status,
            "response_flags": ",".join(stream.flags) or "-",
            "bytes_received": head.content_length or 0,
            "bytes_sent": stream.response_bytes,
            "duration": int((time.monotonic() - stream.start) * 1000),
            "x_forwarded_for": _text(get(b"x-forwarded-for")),
            "user_agent": _text(get(b"user-agent")),
            "request_id": _text(stream.request_id),
            "authority": head.authority.decode("latin-1"),
            "upstream_host": str(stream.endpoint) if stream.endpoint else "-",
            "upstream_cluster": stream.cluster.name if stream.cluster else "-",
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
                f'{f["response_flags"]} {f["bytes_received"]} {f["bytes_sent"]} {f["duration"]} '
                f'"{f["x_forwarded_for"]}" "{f["user_agent"]}" "{f["request_id"]}" "{f["authority"]}" '
                f'"{f["upstream_host"]}" {f["upstream_cluster"]} {f["route_name"]} {listener}'
            )
        self.out.write(line + "\n")
        self.out.flush()


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value is not None else "-"
