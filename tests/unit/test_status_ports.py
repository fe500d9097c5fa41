"""status_ports.py's pure parts: ISTIO_PROMETHEUS_ANNOTATIONS, the merged exposition, and which Settings a
--concurrency worker gets (the supervisor serves the ports, the workers need their loopback admin for it)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.settings import Settings
from meshproxy.status_ports import AppScrape, app_scrape_from, merge_exposition
from meshproxy.workers import worker_settings

OWN = b"# HELP meshproxy_config_version v\n# TYPE meshproxy_config_version gauge\nmeshproxy_config_version 1.0\n"


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ('{"scrape":"true","port":"8080","path":"/stats"}', AppScrape(8080, "/stats")),
    ('{"scrape":"true","port":"9090"}', AppScrape(9090, "/metrics")),  # Prometheus's default path
    ('{"scrape":"false","port":"9090"}', None),
    ('{"scrape":"","path":"","port":"9090"}', AppScrape(9090, "/metrics")),  # on unless "false", as pilot-agent
    ('{"scrape":"true"}', AppScrape(80, "/metrics")),  # pilot-agent's default port
])
def test_the_annotations_inject_writes(value: str | None, expected: AppScrape | None) -> None:
    environ = {} if value is None else {"ISTIO_PROMETHEUS_ANNOTATIONS": value}
    assert app_scrape_from(environ) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "ISTIO_PROMETHEUS_ANNOTATIONS: not JSON"),
    ('["scrape"]', "expected a JSON object"),
    ('{"scrape":"true","port":"http"}', "ISTIO_PROMETHEUS_ANNOTATIONS: port: 'http' is not a port number"),
    ('{"scrape":"true","port":"80","path":"metrics"}', "path: 'metrics' must start with '/'"),
    ('{"scrape":"true","port":"15020"}', "port: 15020 is the status port itself"),
])
def test_a_malformed_annotation_is_an_error_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("'", "'")):
        app_scrape_from({"ISTIO_PROMETHEUS_ANNOTATIONS": value}, status_port=15020)


def test_the_merge_is_one_valid_exposition() -> None:
    app = b"# TYPE app_up gauge\napp_up 1\n# EOF\n"
    merged = merge_exposition(OWN.rstrip(b"\n"), app)
    names = [family.name for family in text_string_to_metric_families(merged.decode())]
    assert names == ["meshproxy_config_version", "app_up"]
    assert b"# EOF" not in merged and merged.endswith(b"\n")
    assert merge_exposition(OWN, b"") == OWN


def test_a_worker_gets_a_loopback_admin_and_no_status_ports() -> None:
    settings = Settings(admin=None, health_port=15021, status_port=15020, prometheus_port=15090, concurrency=2)
    worker = worker_settings(settings, 1)
    assert (worker.admin, worker.pod_ports) == (("127.0.0.1", 0), (None, None, None))
    assert worker_settings(Settings(admin=None, prometheus_port=15090, concurrency=2), 0).admin == ("127.0.0.1", 0)
    assert worker_settings(Settings(admin=None, concurrency=2), 0).admin is None


def test_what_inject_writes_is_what_the_status_port_scrapes() -> None:
    """`meshproxy inject` moves the app's prometheus.io annotations into the sidecar's ISTIO_PROMETHEUS_ANNOTATIONS and
    points Prometheus at 15020; the status port reads that variable back to the app's port and path."""
    import yaml

    from meshproxy.sidecar.inject import InjectOptions, inject_text

    pod = """apiVersion: v1
kind: Pod
metadata:
  name: shop
  labels: {app: shop}
  annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9102", prometheus.io/path: /shop/metrics}
spec:
  containers: [{name: shop, image: shop:1}]
"""
    out, problems = inject_text(pod, "pod.yaml", InjectOptions())
    assert not [p for p in problems if p.severity == "error"]
    doc = yaml.safe_load(out)
    assert doc["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    sidecar = next(c for c in doc["spec"]["containers"] if c["name"] == "istio-proxy")
    environ = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert app_scrape_from(environ, status_port=15020) == AppScrape(9102, "/shop/metrics")


def test_a_pods_termination_drain_duration_becomes_the_sidecars_drain_time() -> None:
    """proxy.istio.io/config's terminationDrainDuration, as Istio's injector passes it to the sidecar; a bad one is an
    error at its place."""
    import yaml

    from meshproxy.sidecar.inject import InjectOptions, inject_text

    pod = """apiVersion: v1
kind: Pod
metadata:
  name: shop
  annotations: {proxy.istio.io/config: "terminationDrainDuration: %s"}
spec:
  containers: [{name: shop, image: shop:1}]
"""
    out, _ = inject_text(pod % "20s", "pod.yaml", InjectOptions())
    sidecar = next(c for c in yaml.safe_load(out)["spec"]["containers"] if c["name"] == "istio-proxy")
    assert sidecar["args"][-2:] == ["--drain-time", "20"]
    from meshproxy.istio.problems import ConfigError

    with pytest.raises(ConfigError, match=r"pod.yaml:0: metadata.annotations\['proxy.istio.io/config'\]"
                                        r".terminationDrainDuration: 'soon' is not a duration"):
        inject_text(pod % "soon", "pod.yaml", InjectOptions())
