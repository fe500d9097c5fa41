"""Upstream clusters as Envoy names them: a service port, optionally narrowed to a subset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, int]:
        """What the connection pool is keyed by."""
        return (self.address, self.port)

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Cluster:
    """`outbound|9080|v1|reviews.default.svc.cluster.local`: endpoints fixed at compile time."""

    name: str
    service: str  # FQDN of the service
    port: int
    subset: str
    endpoints: tuple[Endpoint, ...]
    traffic_policy: Mapping[str, object] | None = None
    external: bool = False  # MESH_EXTERNAL: requests leave the mesh, so mesh-internal headers are stripped

    @staticmethod
    def name_of(direction: str, port: int, subset: str, service: str) -> str:
        return f"{direction}|{port}|{subset}|{service}"
