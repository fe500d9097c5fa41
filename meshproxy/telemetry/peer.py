"""Who is on each side of a request: workload label values, and Istio's peer metadata exchange.

A sidecar knows its own workload from its settings. It learns the other side's from the peer metadata
headers Istio's sidecars exchange (istio/proxy `peer_metadata` filter), in the same format, so meshproxy
and Envoy sidecars understand each other:

- `x-envoy-peer-metadata-id`: the node id, `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`;
- `x-envoy-peer-metadata`: base64 of a serialized `google.protobuf.Struct` with NAME, NAMESPACE,
  WORKLOAD_NAME, CLUSTER_ID, MESH_ID and LABELS (the pod labels plus the canonical service/revision labels
  the injector adds).

The caller's sidecar adds them to requests; the callee's sidecar reads them (reporter=destination gets
real source labels), strips them before its app and adds its own to the response; the caller's sidecar
reads and strips those (reporter=source gets real destination labels). Both values are encoded once per
process. Decoded peers are cached by header value, and the cache is bounded: past `MAX_PEERS` distinct
values every new one counts as the unknown peer, so a client sending made-up metadata cannot grow the
number of metric series.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from ..routing.compile import CLUSTER_DOMAIN

log = logging.getLogger("meshproxy.telemetry")

PEER_METADATA = b"x-envoy-peer-metadata"
PEER_METADATA_ID = b"x-envoy-peer-metadata-id"
PEER_HEADERS = frozenset({PEER_METADATA, PEER_METADATA_ID})
UNKNOWN = "unknown"
MESH_ID = "cluster.local"
DEFAULT_CLUSTER_ID = "Kubernetes"
MAX_PEERS = 256
MAX_METADATA_BYTES = 16 * 1024

CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


class Workload:
    """The label values of one workload, as Istio's metrics and span tags spell them.

    Compared by identity: instances are interned (own identity once, peers by header value), so the
    data path can use them in dictionary keys at the cost of a pointer hash.
    """

    __slots__ = ("workload", "namespace", "app", "version", "canonical_service", "canonical_revision", "cluster",
                 "principal")

    def __init__(self, workload: str = UNKNOWN, namespace: str = UNKNOWN, app: str = UNKNOWN,
                 version: str = UNKNOWN, canonical_service: str = UNKNOWN, canonical_revision: str = UNKNOWN,
                 cluster: str = UNKNOWN, principal: str = UNKNOWN) -> None:
        self.workload = workload
        self.namespace = namespace
        self.app = app
        self.version = version
        self.canonical_service = canonical_service
        self.canonical_revision = canonical_revision
        self.cluster = cluster
        self.principal = principal  # SPIFFE id from a peer certificate: meshproxy has no mTLS, so unknown

    @classmethod
    def of(cls, name: str, namespace: str, labels: Mapping[str, str], cluster: str) -> Workload:
        """Istio's rules (pkg/kube/labels): canonical name and revision from the first label present."""
        canonical = next((labels[k] for k in CANONICAL_NAME_LABELS if labels.get(k)), name or UNKNOWN)
        revision = next((labels[k] for k in CANONICAL_REVISION_LABELS if labels.get(k)), "latest")
        return cls(name or UNKNOWN, namespace or UNKNOWN, labels.get("app") or UNKNOWN,
                   labels.get("version") or UNKNOWN, canonical, revision, cluster or UNKNOWN)

    def __repr__(self) -> str:
        return (f"Workload({self.workload!r}, ns={self.namespace!r}, app={self.app!r}, version={self.version!r}, "
                f"canonical={self.canonical_service!r}/{self.canonical_revision!r}, cluster={self.cluster!r})")


UNKNOWN_WORKLOAD = Workload()


def node_id(workload: str, namespace: str, ip: str = "127.0.0.1", gateway: bool = False) -> str:
    """Istio's proxy node id (`ServiceNode`); the pod name is the workload name here."""
    return f"{'router' if gateway else 'sidecar'}~{ip}~{workload}.{namespace}~{namespace}.{CLUSTER_DOMAIN}"


def encode_metadata(own: Workload, labels: Mapping[str, str]) -> bytes:
    """The `x-envoy-peer-metadata` value of this workload: base64(Struct), built once per process."""
    all_labels = dict(labels)
    all_labels.setdefault("service.istio.io/canonical-name", own.canonical_service)
    all_labels.setdefault("service.istio.io/canonical-revision", own.canonical_revision)
    struct = struct_pb2.Struct()
    struct.update({
        "NAME": own.workload,
        "NAMESPACE": own.namespace,
        "WORKLOAD_NAME": own.workload,
        "CLUSTER_ID": own.cluster,
        "MESH_ID": MESH_ID,
        "LABELS": all_labels,
    })
    return base64.b64encode(struct.SerializeToString(deterministic=True))


def decode_metadata(value: bytes) -> Workload | None:
    """A peer from an `x-envoy-peer-metadata` value; None when it is not base64 of a Struct."""
    if len(value) > MAX_METADATA_BYTES:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
        struct = struct_pb2.Struct()
        struct.ParseFromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None
    fields = struct.fields

    def text(key: str) -> str:
        item = fields.get(key)
        return item.string_value if item is not None and item.WhichOneof("kind") == "string_value" else ""

    labels: dict[str, str] = {}
    item = fields.get("LABELS")
    if item is not None and item.WhichOneof("kind") == "struct_value":
        labels = {k: v.string_value for k, v in item.struct_value.fields.items()
                  if v.WhichOneof("kind") == "string_value"}
    name = text("WORKLOAD_NAME") or text("NAME")
    if not name:
        return None
    return Workload.of(name, text("NAMESPACE"), labels, text("CLUSTER_ID"))


class PeerCache:
    """Header value -> interned Workload, bounded (see the module docstring)."""

    __slots__ = ("peers", "limit", "full_logged")

    def __init__(self, limit: int = MAX_PEERS) -> None:
        self.peers: dict[bytes, Workload] = {}
        self.limit = limit
        self.full_logged = False

    def get(self, value: bytes | None) -> Workload:
        if value is None:
            return UNKNOWN_WORKLOAD
        peer = self.peers.get(value)
        if peer is not None:
            return peer
        return self._miss(value)

    def _miss(self, value: bytes) -> Workload:
        if len(self.peers) >= self.limit:
            if not self.full_logged:
                self.full_logged = True
                log.warning("more than %d distinct peer metadata values: further peers count as unknown", self.limit)
            return UNKNOWN_WORKLOAD
        peer = decode_metadata(value) or UNKNOWN_WORKLOAD
        for known in self.peers.values():  # one object per distinct workload, whatever the encoding
            if _same(known, peer):
                peer = known
                break
        self.peers[value] = peer
        return peer


def _same(a: Workload, b: Workload) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in Workload.__slots__)
