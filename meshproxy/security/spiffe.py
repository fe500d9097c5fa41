"""SPIFFE identities as Istio writes them: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

Istio's `source.principal` (AuthorizationPolicy, Envoy's RBAC `principal`) is the URI without `spiffe://`;
its metrics labels (`source_principal`, `destination_principal`) carry the whole URI.
"""

from __future__ import annotations

import re
from typing import Final

SCHEME: Final = "spiffe://"
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
# DNS-1123 labels (a Kubernetes namespace, a service account name), and a trust domain of dot-separated labels.
_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SA: Final = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?", re.IGNORECASE)


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """`spiffe://cluster.local/ns/default/sa/bookinfo-reviews`; ValueError naming the part that is not valid."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(f"trust domain {trust_domain!r} is not a DNS name")
    if not _NAME.fullmatch(namespace) or len(namespace) > 63:
        raise ValueError(f"namespace {namespace!r} is not a Kubernetes name (DNS-1123 label)")
    if not _SA.fullmatch(service_account) or len(service_account) > 253:
        raise ValueError(f"service account {service_account!r} is not a Kubernetes name (DNS-1123 subdomain)")
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def principal_of(uri: str) -> str:
    """`spiffe://td/ns/x/sa/y` -> `td/ns/x/sa/y` (Istio's source.principal); "" for a URI that is not SPIFFE."""
    return uri[len(SCHEME):] if uri.startswith(SCHEME) else ""


def trust_domain_of(uri: str) -> str:
    return principal_of(uri).partition("/")[0]
