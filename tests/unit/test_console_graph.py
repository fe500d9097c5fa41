"""The console's graph from Istio metrics text: Kiali's choice of reporter, its health thresholds, Prometheus'
histogram_quantile and rate over a window (counter resets included)."""

from __future__ import annotations

import math

import pytest

from meshproxy.console.graph import GraphHistory, build_graph, health, parse, quantile

LABELS = ('reporter="{reporter}",source_workload="{src}",source_workload_namespace="default",'
          'source_canonical_service="{src_app}",source_canonical_revision="v1",'
          'destination_service="ratings.default.svc.cluster.local",destination_service_name="ratings",'
          'destination_service_namespace="default",destination_workload="{dst}",'
          'destination_workload_namespace="default",destination_canonical_service="ratings",'
          'destination_canonical_revision="v1",response_code="{code}",response_flags="{flags}"')


def requests(count: float, *, reporter: str = "source", src: str = "reviews-v2", dst: str = "ratings-v1",
             code: str = "200", flags: str = "-") -> str:
    labels = LABELS.format(reporter=reporter, src=src, src_app=src.split("-")[0], dst=dst, code=code, flags=flags)
    return f"istio_requests_total{{{labels}}} {count}\n"


def buckets(counts: dict[str, float], *, reporter: str = "source", code: str = "200") -> str:
    labels = LABELS.format(reporter=reporter, src="reviews-v2", src_app="reviews", dst="ratings-v1", code=code,
                           flags="-")
    lines = [f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {n}' for le, n in counts.items()]
    total = max(counts.values())
    lines += [f"istio_request_duration_milliseconds_count{{{labels}}} {total}",
              f"istio_request_duration_milliseconds_sum{{{labels}}} 0"]
    return ("# TYPE istio_request_duration_milliseconds histogram\n" + "\n".join(lines) + "\n")


HEADER = "# TYPE istio_requests_total counter\n"  # as prometheus_client writes it


@pytest.mark.parametrize(("q", "points", "expected"), [
    (0.5, [(10.0, 5.0), (25.0, 10.0), (math.inf, 10.0)], 10.0),  # the rank ends the first bucket
    (0.75, [(10.0, 5.0), (25.0, 10.0), (math.inf, 10.0)], 17.5),  # linear inside (10, 25]
    (0.5, [(5.0, 0.0), (10.0, 4.0), (math.inf, 4.0)], 7.5),  # between 5 and 10
    (0.99, [(10.0, 1.0), (math.inf, 10.0)], 10.0),  # in +Inf: the highest finite bound, as Prometheus
    (0.5, [(10.0, 0.0), (math.inf, 0.0)], None),  # no observations
])
def test_quantile_is_prometheus_histogram_quantile(q: float, points: list[tuple[float, float]],
                                                   expected: float | None) -> None:
    assert quantile(q, points) == expected


@pytest.mark.parametrize(("total", "by_class", "expected"), [
    (0, {}, "idle"),
    (100, {}, "healthy"),
    (1000, {"5xx": 1}, "degraded"),  # any 5xx: Kiali's degraded 0 %
    (100, {"5xx": 10}, "degraded"),  # 10 % is not above 10 %
    (100, {"5xx": 11}, "failure"),
    (100, {"4xx": 10}, "healthy"),
    (100, {"4xx": 11}, "degraded"),
    (100, {"4xx": 21}, "failure"),
])
def test_health_follows_kiali_default_tolerances(total: int, by_class: dict[str, float], expected: str) -> None:
    assert health(total, by_class) == expected


def test_source_reports_win_and_destination_reports_fill_in_for_callers_without_a_proxy() -> None:
    reviews = HEADER + requests(8, code="200") + requests(2, code="500", flags="FI", dst="unknown")
    ratings = (HEADER + requests(8, reporter="destination")  # the same 8 requests, seen by ratings' sidecar
               + requests(3, reporter="destination", src="unknown"))  # curl without a proxy
    graph = build_graph(parse([reviews, ratings], 10.0), parse([], 0.0), 60.0)
    edges = {(e["source"], e["target"]): e for e in graph["edges"]}
    first = edges[("workload:default/reviews-v2", "service:ratings.default.svc.cluster.local")]
    assert first["requests"] == 10 and first["codes"] == {"200": 8, "500": 2} and first["flags"] == {"FI": 2}
    assert first["health"] == "failure" and first["rate"] == 1.0 and first["error_rate"] == 20.0
    assert edges[("service:ratings.default.svc.cluster.local", "workload:default/ratings-v1")]["requests"] == 11
    assert edges[("workload:unknown", "service:ratings.default.svc.cluster.local")]["requests"] == 3
    labels = {n["id"]: n["label"] for n in graph["nodes"]}
    assert labels["workload:default/reviews-v2"] == "reviews v1" and labels["workload:unknown"] == "unknown"


def test_rates_are_differences_over_the_window_and_survive_a_restart() -> None:
    history = GraphHistory()
    first = history.graph([HEADER + requests(100) + buckets({"10": 50, "25": 100, "+Inf": 100})], 60.0, now=1000.0)
    assert first["seconds"] is None and first["edges"][0]["rate"] is None  # nothing to compare with yet
    later = history.graph([HEADER + requests(130) + buckets({"10": 50, "25": 130, "+Inf": 130})], 60.0, now=1010.0)
    [edge] = [e for e in later["edges"] if e["source"].startswith("workload:")]
    assert later["seconds"] == 10.0 and edge["requests"] == 30 and edge["rate"] == 3.0
    assert edge["p50_ms"] == 17.5  # all 30 new requests in (10, 25]
    restarted = history.graph([HEADER + requests(5)], 60.0, now=1020.0)  # lower than before: a restarted proxy
    [edge] = [e for e in restarted["edges"] if e["source"].startswith("workload:")]
    assert edge["requests"] == 5 and restarted["seconds"] == 20.0
    assert history.baseline(1075.0, 60.0).at == 1010.0  # the newest kept sample older than the window
