"""The console's view of finished requests and spans: buffer entries turned into JSON-ready dicts, filters, and
traces assembled from spans (of one proxy or of many)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..routing.cluster import Cluster
from ..routing.policy import Route
from ..stream_info import DC, DI, FI, NC, NR, UF, UH, UO, URX, UT, code_details, flags_text
from ..telemetry.core import RECENT_FIELDS

PER_MILLION = 10_000  # percent -> per million


def fault_of(route: Route | None) -> dict[str, Any] | None:
    if route is None or not route.fault.active:
        return None
    fault = route.fault
    return {"delay_seconds": fault.delay, "delay_percent": fault.delay_per_million / PER_MILLION,
            "abort_status": fault.abort_status or None, "abort_grpc_status": fault.abort_grpc_status or None,
            "abort_percent": fault.abort_per_million / PER_MILLION}


def route_of(route: Route | None) -> dict[str, Any] | None:
    if route is None:
        return None
    choices = route.picker.choices if route.picker is not None else ()
    return {"name": route.name or "-", "virtual_service": route.virtual_service or None,
            "index": route.index if route.index >= 0 else None, "timeout_seconds": route.timeout or None,
            "retries": route.retry.num_retries, "fault": fault_of(route),
            "destinations": [d.host + (f" subset {d.subset}" if d.subset else "") for d in choices]}


def destination_of(cluster: Cluster | None) -> dict[str, Any] | None:
    if cluster is None:
        return None
    return {"cluster": cluster.name, "service": cluster.service, "port": cluster.port, "subset": cluster.subset or None}


def request_record(entry: tuple[Any, ...], proxy: str, wall_offset: float) -> dict[str, Any]:
    """One buffer entry (telemetry.core.RECENT_FIELDS) as the console shows it; `wall_offset` turns the record's
    monotonic times into wall-clock ones (time.time() - time.monotonic(), read once per answer)."""
    f = dict(zip(RECENT_FIELDS, entry))
    head = f["head"]
    trace = f["trace"]
    flags = flags_text(f["flags"])
    telemetry = f["telemetry"]
    record: dict[str, Any] = {
        "proxy": proxy,
        "listener": telemetry.listener,
        "direction": telemetry.direction,
        "time": f["end"] + wall_offset,
        "duration_ms": round((f["end"] - f["start"]) * 1000.0, 3),
        "method": head.method.decode("latin-1"),
        "authority": head.authority.decode("latin-1"),
        "path": head.path_and_query.decode("latin-1"),
        "status": f["status"],
        "flags": flags,
        "details": code_details(f["details"], f["status"], f["cluster"] is not None),
        "request_id": (f["request_id"] or b"").decode("latin-1") or None,
        "trace_id": trace[0].decode() if trace is not None else None,
        "span_id": trace[1].decode() if trace is not None else None,
        "route": route_of(f["route"]),
        "destination": destination_of(f["cluster"]),
        "endpoint": str(f["endpoint"]) if f["endpoint"] is not None else None,
        "attempts": f["attempts"],
        "retry_reasons": list(f["retry_reasons"] or ()),
        "request_bytes": f["body_size"],
        "response_bytes": f["response_bytes"],
    }
    record["explanation"] = explain(record, f["flags"])
    return record


def explain(record: dict[str, Any], bits: int) -> list[str]:
    """What happened to the request, one sentence per cause, from its route, attempts, flags and details."""
    lines: list[str] = []
    route = record["route"]
    where = ""
    if route is not None:
        vs = route["virtual_service"]
        named = f"route {route['name']!r}" if route["name"] != "-" else "route"
        where = f"{named} of VirtualService {vs} http[{route['index']}]" if vs else "the default route"
    fault = route["fault"] if route is not None else None
    status = record["status"]
    if bits & NR:
        lines.append(f"no route matched {record['authority']}{record['path']}: 404 NR")
    if bits & DI and fault is not None:
        lines.append(f"fault injection delayed the request {fault['delay_seconds']:g}s ({where})")
    if bits & FI:
        lines.append(f"fault injection aborted the request with {status}" + (f" ({where})" if where else ""))
    if route is not None and not bits & (NR | FI):
        dest = record["destination"]
        target = ""
        if dest is not None and dest["service"]:
            target = f" to {dest['service']}" + (f" subset {dest['subset']}" if dest["subset"] else "")
        elif dest is not None:
            target = " to the local app" if record["direction"] == "inbound" else f" to {dest['cluster']}"
        endpoint = f", endpoint {record['endpoint']}" if record["endpoint"] else ""
        lines.append(f"took {where}{target}{endpoint}")
    for n, reason in enumerate(record["retry_reasons"], start=1):
        lines.append(f"attempt {n} retried: {reason}")
    if bits & URX:
        lines.append(f"retries exhausted after {record['attempts']} attempt(s): URX")
    if bits & UT:
        timeout = route["timeout_seconds"] if route is not None else None
        lines.append(f"upstream request timeout{f' (route timeout {timeout:g}s)' if timeout else ''}: {status} UT")
    if bits & UF:
        lines.append(f"upstream connection failure: {record['details']}")
    if bits & UH:
        lines.append("no healthy upstream endpoint: 503 UH")
    if bits & UO:
        lines.append("circuit breaker (connection pool or retry budget) overflowed: UO")
    if bits & DC:
        lines.append(f"the caller closed the connection after {record['duration_ms'] / 1000:.2f}s, before the "
                     f"response was complete: DC")
    if bits & NC:
        lines.append("the route's destination has no cluster: 503 NC")
    if status >= 500 and not bits and record["details"] == "via_upstream":
        lines.append(f"the upstream answered {status}")
    elif status == 0 and not bits & DC:
        lines.append(f"no response was sent ({record['details']}, flags {record['flags']})")
    return lines


def status_matches(status: int, wanted: str) -> bool:
    """`503`, `5xx`, or `error` (5xx or no response)."""
    wanted = wanted.strip().lower()
    if not wanted:
        return True
    if wanted == "error":
        return status == 0 or status >= 500
    if len(wanted) == 3 and wanted.endswith("xx") and wanted[0].isdigit():
        return status // 100 == int(wanted[0])
    return wanted.isdigit() and status == int(wanted)


def flag_matches(flags: str, wanted: str) -> bool:
    wanted = wanted.strip().upper()
    return not wanted or wanted in flags.split(",")


def filter_requests(records: Iterable[dict[str, Any]], status: str = "", flag: str = "",
                    limit: int = 500) -> list[dict[str, Any]]:
    """Newest first."""
    chosen = [r for r in records if status_matches(r["status"], status) and flag_matches(r["flags"], flag)]
    chosen.sort(key=lambda r: r["time"], reverse=True)
    return chosen[:limit]


# --------------------------------------------------------------------------- spans and traces


def span_record(span: Any) -> dict[str, Any]:
    """An OpenTelemetry ReadableSpan as JSON (ids in hex, as the trace headers carry them)."""
    context = span.context
    parent = span.parent
    attributes = {k: str(v) for k, v in (span.attributes or {}).items()}
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": "server" if span.kind.name == "SERVER" else "client",
        "service": str(span.resource.attributes.get("service.name", "")),
        "start_us": start // 1000,
        "duration_ms": round((end - start) / 1e6, 3),
        "error": span.status.status_code.name == "ERROR",
        "flags": attributes.get("response_flags", "-"),
        "status": attributes.get("http.status_code", ""),
        "attributes": attributes,
    }


def trace_summaries(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per trace id, newest first."""
    traces: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], []).append(span)
    return sorted((summary(trace_id, items) for trace_id, items in traces.items()),
                  key=lambda t: t["start_us"], reverse=True)


def summary(trace_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    ids = {s["span_id"] for s in spans}
    start = min(s["start_us"] for s in spans)
    end = max(s["start_us"] + s["duration_ms"] * 1000 for s in spans)
    roots = sorted((s for s in spans if s["parent_id"] not in ids), key=lambda s: s["start_us"])
    root = roots[0] if roots else min(spans, key=lambda s: s["start_us"])  # ids that loop: the earliest span
    flags = sorted({f for s in spans for f in s["flags"].split(",") if f != "-"})
    return {"trace_id": trace_id, "root": root["name"], "root_service": root["service"],
            "services": sorted({s["service"] for s in spans}), "operations": sorted({s["name"] for s in spans}),
            "spans": len(spans), "start_us": start, "duration_ms": round((end - start) / 1000.0, 3),
            "error": any(s["error"] for s in spans), "flags": flags}


def search_traces(spans: Iterable[dict[str, Any]], service: str = "", operation: str = "", min_ms: float = 0.0,
                  error: bool | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Jaeger's search: a trace matches when one of its spans is of `service` (substring) and one is named
    `operation` (substring), it lasts at least `min_ms`, and it has (or has not) an error span."""
    found = []
    for trace in trace_summaries(spans):
        if service and not any(service in s for s in trace["services"]):
            continue
        if operation and not any(operation in o for o in trace["operations"]):
            continue
        if trace["duration_ms"] < min_ms or (error is not None and trace["error"] != error):
            continue
        found.append(trace)
    return found[:limit]


def trace_detail(trace_id: str, spans: Iterable[dict[str, Any]],
                 requests: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """One trace's spans depth first (siblings by start time), each joined to the request the proxy recorded for
    it (by span id): its route, fault, retries and explanation, which the span's tags alone do not carry."""
    mine = [s for s in spans if s["trace_id"] == trace_id]
    if not mine:
        return None
    by_span = {r["span_id"]: r for r in requests if r["trace_id"] == trace_id}
    ids = {s["span_id"] for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(mine, key=lambda s: (s["start_us"], s["kind"] != "client")):
        children.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(span)
    ordered: list[tuple[int, dict[str, Any]]] = []  # Jaeger's order: depth first, siblings by start time
    stack = [(0, span) for span in reversed(children.get(None, []))]
    while stack:
        depth, span = stack.pop()
        ordered.append((depth, span))
        stack.extend((depth + 1, child) for child in reversed(children.get(span["span_id"], [])))
    out = []
    for depth, span in ordered:
        request = by_span.get(span["span_id"])
        fault = request["route"]["fault"] if request is not None and request["route"] is not None else None
        bits = span["flags"].split(",")
        out.append({**span, "depth": depth, "proxy": request["proxy"] if request else None,
                    "route": request["route"] if request else None,
                    "fault": fault if fault is not None and ("DI" in bits or "FI" in bits) else None,
                    "explanation": request["explanation"] if request else [],
                    "retry_reasons": request["retry_reasons"] if request else []})
    return {**summary(trace_id, mine), "spans": out}
