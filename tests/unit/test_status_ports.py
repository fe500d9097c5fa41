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
])
def test_the_annotations_inject_writes(value: str | None, expected: AppScrape | None) -> None:
    environ = {} if value is None else {"ISTIO_PROMETHEUS_ANNOTATIONS": value}
    assert app_scrape_from(environ) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "ISTIO_PROMETHEUS_ANNOTATIONS: not JSON"),
    ('["scrape"]', "expected a JSON object"),
    ('{"scrape":"true","port":"http"}', "ISTIO_PROMETHEUS_ANNOTATIONS: port: 'http' is not a port number"),
    ('{"scrape":"true","port":"80","path":"metrics"}', "path: 'metrics' must start with '/'"),
])
def test_a_malformed_annotation_is_an_error_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("'", "'")):
        app_scrape_from({"ISTIO_PROMETHEUS_ANNOTATIONS": value})


def test_the_merge_is_one_valid_exposition() -> None:
    app = b"# TYPE app_up gauge\napp_up 1\n# EOF\n"
    merged = merge_exposition(OWN.rstrip(b"\n"), app)
    names = [family.name for family in text_string_to_metric_families(merged.decode())]
    assert names == ["meshproxy_config_version", "app_up"]
    assert b"# EOF" not in merged and merged.endswith(b"\n")
    assert merge_exposition(OWN, b"") == OWN


def test_a_worker_gets_a_loopback_admin_and_no_status_ports() -> None:
    settings = Settings(admin=None, health_port=15021, status_port=15020, concurrency=2)
    worker = worker_settings(settings, 1)
    assert (worker.admin, worker.health_port, worker.status_port) == (("127.0.0.1", 0), None, None)
    assert worker_settings(Settings(admin=None, concurrency=2), 0).admin is None
