"""The console's request filters and trace assembly, on records as the JSON endpoints carry them."""

from __future__ import annotations

from typing import Any

import pytest

from meshproxy.console.records import filter_requests, flag_matches, search_traces, status_matches, trace_detail


@pytest.mark.parametrize(("status", "wanted", "expected"), [
    (503, "503", True), (503, "500", False), (503, "5xx", True), (404, "5xx", False), (404, "4XX", True),
    (0, "error", True), (500, "error", True), (499, "error", False), (200, "", True), (200, "abc", False),
])
def test_status_filter(status: int, wanted: str, expected: bool) -> None:
    assert status_matches(status, wanted) is expected


@pytest.mark.parametrize(("flags", "wanted", "expected"), [
    ("UF,URX", "URX", True), ("UF,URX", "uf", True), ("UF,URX", "U", False), ("-", "FI", False), ("-", "", True),
])
def test_flag_filter(flags: str, wanted: str, expected: bool) -> None:
    assert flag_matches(flags, wanted) is expected


def test_requests_newest_first_and_limited() -> None:
    records = [{"status": s, "flags": "-", "time": t} for t, s in enumerate([200, 503, 200, 500])]
    assert [r["time"] for r in filter_requests(records, "5xx")] == [3, 1]
    assert [r["time"] for r in filter_requests(records, limit=2)] == [3, 2]


def span(span_id: str, parent: str | None, start: int, ms: float, service: str, flags: str = "-",
         error: bool = False, trace: str = "t1") -> dict[str, Any]:
    return {"trace_id": trace, "span_id": span_id, "parent_id": parent, "name": f"{service}-op", "kind": "client",
            "service": service, "start_us": start, "duration_ms": ms, "error": error, "flags": flags, "status": "200",
            "attributes": {}}


SPANS = [
    span("c", "b", 2_000, 7000.0, "reviews", "DI"),
    span("a", None, 0, 7010.0, "gateway"),
    span("b", "a", 1_000, 7005.0, "reviews"),
    span("d", "a", 1_500, 1.0, "details"),
    span("x", None, 5_000, 2.0, "ratings", "FI", error=True, trace="t2"),
]


def test_traces_are_searched_and_shown_depth_first_with_their_fault() -> None:
    assert [t["trace_id"] for t in search_traces(SPANS)] == ["t2", "t1"]  # newest first
    assert [t["trace_id"] for t in search_traces(SPANS, min_ms=7000)] == ["t1"]
    assert [t["trace_id"] for t in search_traces(SPANS, error=True)] == ["t2"]
    assert [t["trace_id"] for t in search_traces(SPANS, service="detail", operation="reviews")] == ["t1"]
    fault = {"delay_seconds": 7.0, "delay_percent": 100.0, "abort_status": None, "abort_grpc_status": None,
             "abort_percent": 0.0}
    requests = [{"trace_id": "t1", "span_id": "c", "proxy": "reviews-v2", "retry_reasons": [],
                 "route": {"name": "-", "fault": fault}, "explanation": ["fault injection delayed the request 7s"]}]
    detail = trace_detail("t1", SPANS, requests)
    assert detail is not None
    assert [(s["span_id"], s["depth"]) for s in detail["spans"]] == [("a", 0), ("b", 1), ("c", 2), ("d", 1)]
    delayed = detail["spans"][2]
    assert delayed["fault"] == fault and delayed["proxy"] == "reviews-v2"
    assert detail["spans"][1]["fault"] is None and detail["flags"] == ["DI"] and detail["duration_ms"] == 7010.0
    assert trace_detail("nope", SPANS, requests) is None
