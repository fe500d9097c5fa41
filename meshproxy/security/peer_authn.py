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
from ..istio.problems import Problem
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


NO_CERTIFICATES: Final = ("this proxy has no workload certificates (--cert-dir), so plaintext clients would be "
                          "accepted; refused rather than ignored (use PERMISSIVE until certificates are configured)")


def strict_without_tls(policies: Iterable[m.PeerAuthentication], workload: Workload,
                       root_namespace: str = ROOT_NAMESPACE, reason: str = NO_CERTIFICATES) -> list[Problem]:
    """Errors for a STRICT mode this proxy cannot honour (`reason`: why every connection would be plaintext):
    accepting plaintext under STRICT would be a hole, not a fallback. Each error names the policy and field that
    made the mode STRICT (PERMISSIVE and DISABLE are honoured by plaintext as they are)."""
    items = list(policies)
    resolved = resolve_peer_authn(items, workload, root_namespace)
    problems: list[Problem] = []
    message = f"STRICT mutual TLS is not enforced: {reason}"
    strict_ports = sorted(port for port, mode in resolved.port_modes.items() if mode == STRICT)
    if resolved.mode == STRICT or strict_ports:
        for policy in _levels(items, workload, root_namespace):
            if policy.mode == STRICT and resolved.mode == STRICT:
                problems.append(Problem(policy.meta.origin.file, policy.meta.origin.doc, "spec.mtls.mode", message))
            for port, mode in policy.port_level_mtls.items():
                if port in strict_ports and (mode == STRICT or (mode == UNSET and policy.mode == STRICT)):
                    problems.append(Problem(policy.meta.origin.file, policy.meta.origin.doc,
                                            f"spec.portLevelMtls.{port}.mode", message))
        if not problems:  # STRICT inherited through UNSET levels: name the policy it came from
            for policy in _levels(items, workload, root_namespace):
                if policy.mode == STRICT:
                    problems.append(Problem(policy.meta.origin.file, policy.meta.origin.doc, "spec.mtls.mode",
                                            message))
    return problems


def _levels(items: list[m.PeerAuthentication], workload: Workload,
            root_namespace: str) -> list[m.PeerAuthentication]:
    """The policies that take part in the workload's mode: mesh, namespace, workload (those present)."""
    mesh = _first(p for p in items if p.meta.namespace == root_namespace and p.match_labels is None)
    namespace = _first(p for p in items if p.meta.namespace == workload.namespace and p.match_labels is None
                       and p.meta.namespace != root_namespace)
    selected = _first(p for p in items if p.meta.namespace == workload.namespace and p.match_labels is not None
                      and labels_match(p.match_labels, workload.labels))
    return [p for p in (mesh, namespace, selected) if p is not None]


def _first(policies: Iterable[m.PeerAuthentication]) -> m.PeerAuthentication | None:
    return next(iter(policies), None)


def resolve_peer_authn(policies: Iterable[m.PeerAuthentication], workload: Workload,
                       root_namespace: str = ROOT_NAMESPACE) -> PeerAuthnPolicy:
    levels = _levels(list(policies), workload, root_namespace)
    selected = next((p for p in levels if p.match_labels is not None), None)
    mode = PERMISSIVE
    used = []
    for policy in levels:
        used.append(f"{policy.meta.namespace}/{policy.meta.name}")
        if policy.mode != UNSET:
            mode = policy.mode
    ports: dict[int, str] = {}
    if selected is not None:
        for port, port_mode in selected.port_level_mtls.items():
            ports[port] = mode if port_mode == UNSET else port_mode
    return PeerAuthnPolicy(mode, ports, tuple(used))
