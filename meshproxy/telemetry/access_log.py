"""Access log: one line per request to stdout, Istio's default text format, or Istio's JSON keys.

Off by default (as in Istio without meshConfig.accessLogFile): then the exchange pays one attribute check.
Lines go to stdout (`/dev/stdout`, Istio's default) or a file, never written on the event loop: they are
batched and handed to one writer thread every FLUSH_INTERVAL (or at BATCH_BYTES), as Envoy's access log
flushes every second; a writer that cannot keep up loses lines past MAX_QUEUED_BYTES, counted, rather than
holding memory or the loop.
The text line is Istio's `EnvoyTextLogFormat` (pilot/pkg/model/telemetry_logging.go):

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
    "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS%
    %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%

(one line). JSON uses the keys of Istio's `EnvoyJSONLogFormatIstio`, plus `listener`. Response flags are
Envoy's (`-` when none); bytes are body bytes; the upstream transport failure reason is the connect or TLS
error a failed request was answered for (`TLS_error:|268435581:SSL_routines:...:TLS_error_end`, spaces as
underscores as Envoy writes it); what
meshproxy does not know (upstream local address, upstream service time) is `-` as in Envoy, and so is the
requested server name (SNI) of a connection without TLS. JSON also has `upstream_request_attempt_count`
and `reused_connection_retries` (see the README: a retry Envoy does not make).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TextIO

from ..stream_info import flags_text

if TYPE_CHECKING:
    from ..stream_info import L4Info, StreamInfo

log = logging.getLogger("meshproxy.access_log")

FORMATS: Final = ("off", "text", "json")
STDOUT: Final = "/dev/stdout"
FLUSH_INTERVAL: Final = 0.1  # seconds a line may wait before it is handed to the writer
BATCH_BYTES: Final = 64 * 1024  # ... or this much is pending
MAX_QUEUED_BYTES: Final = 16 * 1024 * 1024  # handed over and not written yet; beyond, lines are dropped


class AccessLog:
    __slots__ = ("enabled", "format", "out", "pending", "pending_bytes", "flush_handle", "writer", "queued_bytes",
                 "dropped", "lock")

    def __init__(self, fmt: str = "off", out: TextIO | None = None, path: str = STDOUT) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self.enabled = fmt != "off"  # read on every request
        if out is None and self.enabled and path != STDOUT:
            out = open(path, "a", encoding="utf-8")  # noqa: SIM115  # open for the life of the process
        self.out = out if out is not None else sys.stdout
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.flush_handle: asyncio.TimerHandle | None = None
        self.writer: queue.SimpleQueue[str | threading.Event] | None = None
        self.queued_bytes = 0  # handed to the writer, not yet written
        self.dropped = 0
        self.lock = threading.Lock()

    def fields(self, info: StreamInfo, listener: str) -> dict[str, object]:
        head = info.head
        route = info.route
        get = head.header
        elapsed = time.monotonic() - info.start
        addresses = info.connection.log_addresses()
        return {
            "start_time": datetime.fromtimestamp(time.time() - elapsed, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": head.method.decode("latin-1"),
            "path": head.path_and_query.decode("latin-1"),
            "protocol": "HTTP/" + head.version.decode(),
            "response_code": info.status,
            "response_flags": flags_text(info.flags),
            "response_code_details": info.response_code_details(),
            "connection_termination_details": "-",
            # spaces as underscores, as Envoy 1.40 writes it (`delayed_connect_error:_Connection_refused`)
            "upstream_transport_failure_reason": info.transport_failure.replace(" ", "_") or "-",
            "bytes_received": info.body_size,
            "bytes_sent": info.response_bytes,
            "duration": int(elapsed * 1000),
            "upstream_service_time": "-",
            "x_forwarded_for": _text(get(b"x-forwarded-for")),
            "user_agent": _text(get(b"user-agent")),
            "request_id": _text(info.request_id),
            "authority": head.authority.decode("latin-1"),
            "upstream_host": str(info.endpoint) if info.endpoint else "-",
            "upstream_cluster": info.cluster.name if info.cluster else "-",
            "upstream_local_address": "-",
            "downstream_local_address": addresses[0],
            "downstream_remote_address": addresses[1],
            "requested_server_name": info.connection.requested_server_name or "-",
            "route_name": (route.name or "-") if route else "-",
            "upstream_request_attempt_count": info.attempts,
            "reused_connection_retries": info.reused_retries,
            "listener": listener,
        }

    def tcp_fields(self, info: L4Info, listener: str) -> dict[str, object]:
        """A TCP proxy's line: Envoy's same format, with `-` for what only HTTP has (as Istio's TCP lines)."""
        elapsed = time.monotonic() - info.start
        addresses = info.connection.log_addresses()
        cluster = info.cluster
        return {
            "start_time": datetime.fromtimestamp(time.time() - elapsed, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "method": "-", "path": "-", "protocol": "-", "response_code": 0,
            "response_flags": flags_text(info.flags), "response_code_details": "-",
            "connection_termination_details": info.termination_details or "-",
            "upstream_transport_failure_reason": info.transport_failure.replace(" ", "_") or "-",
            "bytes_received": info.received, "bytes_sent": info.sent, "duration": int(elapsed * 1000),
            "upstream_service_time": "-", "x_forwarded_for": "-", "user_agent": "-", "request_id": "-",
            "authority": "-", "upstream_host": info.endpoint or "-",
            "upstream_cluster": cluster.name if cluster is not None else "-",
            "upstream_local_address": info.upstream_local or "-",
            "downstream_local_address": addresses[0], "downstream_remote_address": addresses[1],
            "requested_server_name": info.sni or "-", "route_name": info.rule or "-",
            "listener": listener,
        }

    def log_tcp(self, info: L4Info, listener: str) -> None:
        self._add(self._format(self.tcp_fields(info, listener)) + "\n")

    def line(self, info: StreamInfo, listener: str) -> str:
        return self._format(self.fields(info, listener))

    def _format(self, f: dict[str, object]) -> str:
        if self.format == "json":
            return json.dumps(f, separators=(",", ":"))
        return (
            f'[{f["start_time"]}] "{f["method"]} {f["path"]} {f["protocol"]}" {f["response_code"]} '
            f'{f["response_flags"]} {f["response_code_details"]} {f["connection_termination_details"]} '
            f'"{f["upstream_transport_failure_reason"]}" {f["bytes_received"]} {f["bytes_sent"]} '
            f'{f["duration"]} {f["upstream_service_time"]} "{f["x_forwarded_for"]}" "{f["user_agent"]}" '
            f'"{f["request_id"]}" "{f["authority"]}" "{f["upstream_host"]}" {f["upstream_cluster"]} '
            f'{f["upstream_local_address"]} {f["downstream_local_address"]} {f["downstream_remote_address"]} '
            f'{f["requested_server_name"]} {f["route_name"]}'
        )

    def log(self, info: StreamInfo, listener: str) -> None:
        self._add(self.line(info, listener) + "\n")

    def _add(self, line: str) -> None:
        self.pending.append(line)
        self.pending_bytes += len(line)
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()
        elif self.flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): write now, here
                self.out.write("".join(self.pending))
                self.out.flush()
                self.pending.clear()
                self.pending_bytes = 0
                return
            self.flush_handle = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Hand what is pending to the writer thread (started on first use)."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if not self.pending:
            return
        data = "".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        with self.lock:
            if self.queued_bytes + len(data) > MAX_QUEUED_BYTES:
                self.dropped += data.count("\n")
                return
            self.queued_bytes += len(data)
        writer = self.writer
        if writer is None:
            writer = self.writer = queue.SimpleQueue()
            threading.Thread(target=self._write, args=(writer,), name="access-log", daemon=True).start()
            atexit.register(self.close)
        writer.put(data)

    def close(self) -> None:
        """Write everything still pending (at exit, after the drain); waits for the writer, 5 s at most."""
        self.flush()
        if self.writer is not None:
            done = threading.Event()
            self.writer.put(done)  # the writer sets it once everything handed over before it is written
            done.wait(5.0)

    def _write(self, writer: queue.SimpleQueue[str | threading.Event]) -> None:
        out = self.out
        while True:
            data = writer.get()
            if isinstance(data, threading.Event):
                data.set()
                continue
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError) as exc:  # a closed pipe or file: nothing to keep the lines for
                log.warning("access log: %s", exc)
            with self.lock:
                self.queued_bytes -= len(data)
                dropped, self.dropped = self.dropped, 0
            if dropped:
                log.warning("access log: %d lines dropped: the writer could not keep up", dropped)


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value is not None else "-"
