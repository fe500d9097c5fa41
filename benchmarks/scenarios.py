"""Benchmark scenarios.

A scenario is a function that writes the Istio YAML the proxies under test load, for a backend at a
given address, and returns the request that exercises it (Host header, extra headers, path). Every
target (direct, meshproxy, later Envoy) is driven with that same request. Register new scenarios in
SCENARIOS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from children import Address


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
    config.write_text(SERVICE_ENTRY_AND_ROUTE.format(backend=backend))
    return Request(host="backend")


SCENARIOS: dict[str, Scenario] = {
    "single-route": single_route,
}
