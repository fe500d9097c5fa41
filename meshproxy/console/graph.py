"""The console's graph, as Kiali draws it, from the Istio metrics the proxies export on /stats/prometheus.

A scrape (each proxy's text, parsed with prometheus_client's parser) is reduced to counters per edge; rates are
differences between two scrapes, as Prometheus' `rate()` over a window. The console scrapes only when asked (the
page polls while it is open) and keeps a sample at most every SAMPLE_EVERY seconds, so the oldest kept sample
still inside the window is the baseline of the next answer.

Kiali's choices, kept: nodes are workloads (app and version) and services; a request is drawn from the source
proxy's report (reporter="source"), and from the destination's only for callers that report nothing (no proxy, or
a proxy whose metrics were not scraped). Edge health as Kiali's default health config: 5xx above 10 % is red
(failure), above 0 % orange (degraded); 4xx above 20 % red, above 10 % orange; response code 0 (no response) counts
as 5xx.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
SAMPLE_EVERY = 5.0  # seconds between kept samples
KEEP_FOR = 3600.0  # the longest window
# Kiali's default health tolerances (percent): (code class, degraded above, failure above)
TOLERANCES = (("5xx", 0.0, 10.0), ("4xx", 10.0, 20.0))

# What identifies an edge's series, from Istio's labels.
_EDGE_LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_canonical_service",
                "source_canonical_revision", "destination_service", "destination_service_name",
                "destination_service_namespace", "destination_workload", "destination_workload_namespace",
                "destination_canonical_service", "destination_canonical_revision")
SeriesKey = tuple[str, ...]  # _EDGE_LABELS values, then response_code and response_flags


@dataclass
class Sample:
    """Cumulative counters of one scrape of every proxy."""

    at: float
    requests: dict[SeriesKey, float] = field(default_factory=dict)
    buckets: dict[tuple[SeriesKey, float], float] = field(default_factory=dict)  # (edge labels, le) -> count


def parse(texts: Iterable[str], at: float) -> Sample:
    sample = Sample(at)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == REQUESTS:
                    key = tuple(s.labels.get(n, "") for n in _EDGE_LABELS) + (
                        s.labels.get("response_code", ""), s.labels.get("response_flags", "-"))
                    sample.requests[key] = sample.requests.get(key, 0.0) + s.value
                elif s.name == DURATION_BUCKET:
                    edge = tuple(s.labels.get(n, "") for n in _EDGE_LABELS)
                    bucket = (edge, float(s.labels["le"]))
                    sample.buckets[bucket] = sample.buckets.get(bucket, 0.0) + s.value
    return sample


def _delta(now: dict[Any, float], base: dict[Any, float] | None) -> dict[Any, float]:
    """Increase of each counter; a counter lower than at the baseline was reset (a restarted proxy)."""
    out = {}
    for key, value in now.items():
        before = base.get(key, 0.0) if base is not None else 0.0
        out[key] = value - before if value >= before else value
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs: linear within the bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound  # in the +Inf bucket: the highest finite bound, as Prometheus
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def health(requests: float, by_class: dict[str, float]) -> str:
    if requests <= 0:
        return "idle"
    state = "healthy"
    for code_class, degraded, failure in TOLERANCES:
        percent = 100.0 * by_class.get(code_class, 0.0) / requests
        if percent > failure:
            return "failure"
        if percent > degraded:
            state = "degraded"
    return state


def _workload_node(name: str, namespace: str, app: str, version: str) -> dict[str, Any]:
    if name in ("", "unknown"):
        return {"id": "workload:unknown", "kind": "unknown", "label": "unknown", "namespace": ""}
    label = f"{app} {version}" if app and version and version != "unknown" else (app or name)
    return {"id": f"workload:{namespace}/{name}", "kind": "workload", "label": label, "workload": name,
            "namespace": namespace, "app": app, "version": version}


class GraphHistory:
    """The kept samples; `graph()` answers for a window ending now."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def add(self, sample: Sample) -> None:
        if not self.samples or sample.at - self.samples[-1].at >= SAMPLE_EVERY:
            self.samples.append(sample)
        while self.samples and sample.at - self.samples[0].at > KEEP_FOR + SAMPLE_EVERY:
            self.samples.pop(0)

    def baseline(self, now: float, window: float) -> Sample | None:
        older = [s for s in self.samples if s.at <= now - window]
        if older:
            return older[-1]
        earlier = [s for s in self.samples if s.at < now]
        return earlier[0] if earlier else None

    def graph(self, texts: Iterable[str], window: float, now: float | None = None) -> dict[str, Any]:
        at = time.time() if now is None else now
        current = parse(texts, at)
        base = self.baseline(at, window)
        self.add(current)
        return build_graph(current, base, window)


def build_graph(current: Sample, base: Sample | None, window: float) -> dict[str, Any]:
    seconds = current.at - base.at if base is not None else None
    requests = _delta(current.requests, base.requests if base is not None else None)
    buckets = _delta(current.buckets, base.buckets if base is not None else None)
    reported_by_source = {(k[1], k[2], k[5]) for k in current.requests if k[0] == "source"}
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    edge_buckets: dict[tuple[str, str], dict[float, float]] = {}

    def edge(source: str, target: str) -> dict[str, Any]:
        found = edges.get((source, target))
        if found is None:
            found = edges[(source, target)] = {"source": source, "target": target, "requests": 0.0,
                                               "codes": {}, "flags": {}}
        return found

    chosen: list[SeriesKey] = []
    for key in current.requests:
        reporter, src, src_ns, _, _, service = key[:6]
        if reporter == "source" or (reporter == "destination" and (src, src_ns, service) not in reported_by_source):
            chosen.append(key)
    chosen_edges = {k[:len(_EDGE_LABELS)] for k in chosen}
    for key in chosen:
        (_, src, src_ns, src_app, src_version, service, service_name, service_ns, dst, dst_ns, dst_app,
         dst_version, code, flags) = key
        source = _workload_node(src, src_ns, src_app, src_version)
        nodes.setdefault(source["id"], source)
        service_id = f"service:{service}"
        nodes.setdefault(service_id, {"id": service_id, "kind": "service", "label": service_name or service,
                                      "service": service, "namespace": service_ns})
        hops = [(source["id"], service_id)]
        if dst not in ("", "unknown"):
            target = _workload_node(dst, dst_ns, dst_app, dst_version)
            nodes.setdefault(target["id"], target)
            hops.append((service_id, target["id"]))
        count = requests.get(key, 0.0)
        for hop in hops:
            e = edge(*hop)
            e["requests"] += count
            if count:
                e["codes"][code] = e["codes"].get(code, 0.0) + count
                if flags != "-":
                    e["flags"][flags] = e["flags"].get(flags, 0.0) + count
    for (labels, le), count in buckets.items():
        if labels not in chosen_edges:
            continue
        (_, src, src_ns, src_app, src_version, service, *_rest) = labels
        dst, dst_ns, dst_app, dst_version = labels[8], labels[9], labels[10], labels[11]
        hops = [(_workload_node(src, src_ns, src_app, src_version)["id"], f"service:{service}")]
        if dst not in ("", "unknown"):
            hops.append((f"service:{service}", _workload_node(dst, dst_ns, dst_app, dst_version)["id"]))
        for hop in hops:
            per_le = edge_buckets.setdefault(hop, {})
            per_le[le] = per_le.get(le, 0.0) + count
    out_edges = []
    for hop, e in sorted(edges.items()):
        total = e["requests"]
        by_class: dict[str, float] = {}
        for code, count in e["codes"].items():
            code_class = "5xx" if code == "0" or code.startswith("5") else f"{code[:1]}xx"
            by_class[code_class] = by_class.get(code_class, 0.0) + count
        cumulative = sorted(edge_buckets.get(hop, {}).items())
        errors = by_class.get("5xx", 0.0)
        e.update({
            "requests": int(total),
            "codes": {k: int(v) for k, v in sorted(e["codes"].items())},
            "flags": {k: int(v) for k, v in sorted(e["flags"].items())},
            "rate": round(total / seconds, 4) if seconds else None,
            "error_rate": round(100.0 * errors / total, 2) if total else 0.0,
            "errors": int(errors),
            "client_errors": int(by_class.get("4xx", 0.0)),
            "p50_ms": _rounded(quantile(0.5, cumulative)),
            "p99_ms": _rounded(quantile(0.99, cumulative)),
            "health": health(total, by_class),
        })
        out_edges.append(e)
    return {"window_seconds": window, "seconds": round(seconds, 6) if seconds is not None else None,
            "at": current.at, "nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": out_edges}


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None
