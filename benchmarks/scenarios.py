"""Benchmark scenarios.

A scenario is a function that writes the Istio YAML the proxies under test load, for a backend at a
given address, and returns the request that exercises it (Host header, extra headers, path). Every
target (direct, meshproxy, later Envoy) is driven with that same request. Register new scenarios in
SCENARIOS.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from children import Address, free_port


@dataclass(frozen=True, slots=True)
class Request:
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str = "/"


Scenario = Callable[[Path, Address], Request]

SERVICE_ENTRY_AND_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {backend.host}, ports: {{http: {backend.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  http: [{{route: [{{destination: {{host: backend}}}}]}}]
"""


def single_route(config: Path, backend: Address) -> Request:
    """One VirtualService with one catch-all route to one static endpoint: the proxy's floor cost."""
    proxy_environment()  # meshproxy's defaults: Istio metrics on, tracing at 1 %
    config.write_text(SERVICE_ENTRY_AND_ROUTE.format(backend=backend))
    return Request(host="backend")


# Telemetry is switched by meshproxy's command-line options, which also read MESHPROXY_* variables, and
# targets.py starts meshproxy with this process's environment, after the scenario function ran. So a
# scenario states the telemetry of the proxies it starts by setting those variables; every scenario sets
# all of them (unset = meshproxy's default), so none leaks into the next scenario.
TELEMETRY_VARIABLES = ("MESHPROXY_METRICS", "MESHPROXY_TRACING", "MESHPROXY_TRACING_SAMPLING",
                       "MESHPROXY_OTLP_ENDPOINT", "MESHPROXY_ACCESS_LOG")


def proxy_environment(**variables: str) -> None:
    for name in TELEMETRY_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(variables)


def telemetry_off(config: Path, backend: Address) -> Request:
    """single-route with all telemetry off: no metrics, no peer metadata, trace headers not touched
    (x-request-id is still generated: Envoy always does). The baseline of telemetry's cost."""
    proxy_environment(MESHPROXY_METRICS="off", MESHPROXY_TRACING="off", MESHPROXY_ACCESS_LOG="off")
    config.write_text(SERVICE_ENTRY_AND_ROUTE.format(backend=backend))
    return Request(host="backend")


def telemetry_on(config: Path, backend: Address) -> Request:
    """single-route with Istio's default telemetry: the four standard metrics with peer metadata, B3/W3C
    headers rewritten per hop, 1 % of requests (new traces: wrk sends no trace headers) recorded as spans and
    exported by OTLP/HTTP to a port where no collector listens (encoded, sent, dropped), access log off."""
    proxy_environment(MESHPROXY_METRICS="on", MESHPROXY_TRACING="on", MESHPROXY_TRACING_SAMPLING="1",
                      MESHPROXY_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}/v1/traces",
                      MESHPROXY_ACCESS_LOG="off")
    config.write_text(SERVICE_ENTRY_AND_ROUTE.format(backend=backend))
    return Request(host="backend")


SCENARIOS: dict[str, Scenario] = {
    "single-route": single_route,
    "telemetry-off": telemetry_off,
    "telemetry-on": telemetry_on,
}
