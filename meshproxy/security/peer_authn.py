"""PeerAuthentication resolved for one workload into the mTLS mode of each inbound port (Istio's composition).

Pure. As istiod's ComposePeerAuthentication: start PERMISSIVE; a mesh-wide policy (root namespace, no selector),
then the namespace policy (no selector), then the workload policy (selector matching this workload's labels) each
override the mode unless theirs is UNSET (which inherits); the workload policy's `portLevelMtls` sets a port's
mode, an UNSET port inheriting the mode resolved so far. When several policies sit at one level, Istio takes the
oldest; a file has no creation time, so the first one read wins (and the loader order is the files' sorted order).

The TLS transport asks `mode_for_port(port)` once per connection: STRICT (TLS with a client certificate required),
PERMISSIVE (TLS or plaintext, told apart by the first bytes) or DISABLE (plaintext).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ..istio import model as m
from .scope import ROOT_NAMESPACE, Workload, labels_match

STRICT: Final = "STRICT"
PERMISSIVE: Final = "PERMISSIVE"
DISABLE: Final = "DISABLE"
UNSET: Final = "UNSET"


@dataclass(frozen=True, slots=True)
class PeerAuthnPolicy:
    """The resolved modes: one for the workload, and the ports a workload policy names."""

    mode: str = PERMISSIVE
    port_modes: Mapping[int, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()  # the policies it was composed from, as ns/name (for /config_dump and logs)

    def mode_for_port(self, port: int) -> str:
        return self.port_modes.get(port, self.mode)


DEFAULT_PEER_AUTHN: Final = PeerAuthnPolicy()


def _first(policies: Iterable[m.PeerAuthentication]) -> m.PeerAuthentication | None:
    return next(iter(policies), None)


def resolve_peer_authn(policies: Iterable[m.PeerAuthentication], workload: Workload,
                       root_namespace: str = ROOT_NAMESPACE) -> PeerAuthnPolicy:
    items = list(policies)
    mesh = _first(p for p in items if p.meta.namespace == root_namespace and p.match_labels is None)
    namespace = _first(p for p in items if p.meta.namespace == workload.namespace and p.match_labels is None
                       and p.meta.namespace != root_namespace)
    selected = _first(p for p in items if p.meta.namespace == workload.namespace and p.match_labels is not None
                      and labels_match(p.match_labels, workload.labels))
    mode = PERMISSIVE
    used = []
    for policy in (mesh, namespace, selected):
        if policy is None:
            continue
        used.append(f"{policy.meta.namespace}/{policy.meta.name}")
        if policy.mode != UNSET:
            mode = policy.mode
    ports: dict[int, str] = {}
    if selected is not None:
        for port, port_mode in selected.port_level_mtls.items():
            ports[port] = mode if port_mode == UNSET else port_mode
    return PeerAuthnPolicy(mode, ports, tuple(used))
