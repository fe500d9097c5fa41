"""Which security policies apply to this proxy's workload, as Istio selects them.

A policy in the root namespace (`istio-system`, Istio's default `rootNamespace`) without a selector is mesh-wide;
any other policy applies to workloads of its own namespace: all of them without a selector, those whose labels
include `selector.matchLabels` with one. A `targetRef(s)` policy applies only to what it names: a Kubernetes
Gateway's own pods (labelled `gateway.networking.k8s.io/gateway-name: NAME` by Istio's deployment controller);
Services, ServiceEntries and GatewayClasses are waypoint targets, which a sidecar never enforces (Istio's sidecars
ignore them too), so they are reported, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..istio import model as m

ROOT_NAMESPACE = "istio-system"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True, slots=True)
class Workload:
    """The workload this proxy fronts: its namespace and labels (Settings: --namespace, --label)."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def is_mesh_wide(meta: m.Resource, match_labels: Mapping[str, str] | None,
                 root_namespace: str = ROOT_NAMESPACE) -> bool:
    return meta.namespace == root_namespace and match_labels is None


def selects(meta: m.Resource, scope: m.WorkloadScope, workload: Workload,
            root_namespace: str = ROOT_NAMESPACE) -> bool:
    """Does a policy with this scope apply to `workload`?"""
    if scope.target_refs:
        if meta.namespace != workload.namespace:
            return False
        name = workload.labels.get(GATEWAY_NAME_LABEL)
        return name is not None and any(
            ref.group == GATEWAY_GROUP and ref.kind == "Gateway" and ref.name == name for ref in scope.target_refs)
    if is_mesh_wide(meta, scope.match_labels, root_namespace):
        return True
    if meta.namespace != workload.namespace:
        return False
    return scope.match_labels is None or labels_match(scope.match_labels, workload.labels)


def waypoint_only(scope: m.WorkloadScope) -> bool:
    """True when every targetRef names a waypoint target (Service, ServiceEntry, GatewayClass): never a sidecar."""
    return bool(scope.target_refs) and all(
        not (ref.group == GATEWAY_GROUP and ref.kind == "Gateway") for ref in scope.target_refs)
