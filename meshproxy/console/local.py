"""One proxy's console data: its own request and span buffers, its own metrics, its running config."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..routing.describe import describe_action, describe_match, describe_retry, describe_table
from ..which_route import which_route
from .api import ConsoleError
from .records import fault_of, request_record, span_record

if TYPE_CHECKING:
    from ..lifecycle import ConfigState
    from ..routing.table import RouteTable
    from ..telemetry.core import MeshTelemetry


def routes_of(table: RouteTable) -> list[dict[str, Any]]:
    """The compiled routes, in match order per virtual host, in the words of `meshproxy routes`."""
    hosts = []
    for vhost in sorted(table.virtual_hosts, key=lambda v: v.name):
        hosts.append({"name": vhost.name, "domains": list(vhost.domains), "routes": [
            {"name": route.name or "-", "virtual_service": route.virtual_service or None,
             "index": route.index if route.index >= 0 else None, "match": describe_match(route),
             "destination": describe_action(route), "timeout_seconds": route.timeout or None,
             "retries": describe_retry(route), "fault": fault_of(route)}
            for route in vhost.routes]})
    return hosts


class LocalSource:
    def __init__(self, name: str, telemetry: MeshTelemetry, config: Callable[[], ConfigState],
                 metrics: Callable[[], bytes]) -> None:
        self.name = name
        self.telemetry = telemetry
        self.config = config
        self.metrics_text = metrics

    async def proxies(self) -> list[str]:
        return [self.name]

    async def requests(self) -> list[dict[str, Any]]:
        recent = self.telemetry.recent
        if recent is None:
            return []
        offset = time.time() - time.monotonic()
        return [request_record(entry, self.name, offset) for entry in list(recent)]

    async def spans(self) -> list[dict[str, Any]]:
        recorder = self.telemetry.recorder
        buffer = recorder.buffer if recorder is not None else None
        return [span_record(span) for span in list(buffer.spans)] if buffer is not None else []

    async def metrics(self) -> list[str]:
        return [self.metrics_text().decode()]

    async def routes(self) -> list[dict[str, Any]]:
        state = self.config()
        return [{"proxy": self.name, "version": state.version, "loaded_at": state.loaded_at,
                 "files": list(state.snapshot.files), "warnings": [str(p) for p in state.warnings],
                 "virtual_hosts": routes_of(state.table), "table": describe_table(state.table)}]

    async def route(self, proxy: str, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        try:
            answer = which_route(self.config().table, method, url,
                                 [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
        except (ValueError, UnicodeEncodeError) as exc:
            raise ConsoleError(400, str(exc)) from None
        chosen = answer.chosen
        return {"proxy": self.name, "request": answer.request, "lines": answer.lines,
                "chosen": None if chosen is None else {"name": chosen.name or "-",
                                                       "virtual_service": chosen.virtual_service or None,
                                                       "index": chosen.index if chosen.index >= 0 else None,
                                                       "destination": describe_action(chosen)}}
