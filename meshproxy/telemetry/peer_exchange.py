"""Istio's TCP metadata exchange (istio/proxy `metadata_exchange` network filter), sans-IO: how two sidecars tell
each other who they are on a mutual TLS TCP connection whose ALPN chose `istio-peer-exchange`.

Once that ALPN is chosen each side writes, before any application byte, an initial header (the magic 0x3D230467
and the size of what follows, both 32-bit big-endian) and a `google.protobuf.Any` holding a `Struct` with
`x-envoy-peer-metadata` (the node's metadata Struct: NAME, NAMESPACE, LABELS...) and `x-envoy-peer-metadata-id`
(the node id); each side reads the other's and passes on only what comes after it. A peer whose first bytes lack
the magic sent no header (Envoy: "Peer missing TCP MetadataExchange filter"): its bytes pass through untouched.

A sidecar that offered `istio-peer-exchange` and does not speak this would hand the server's header to its client
as application data: meshproxy offers it only on TCP connections, which run `PeerExchangeReader` when it is chosen.
"""

from __future__ import annotations

import base64
import struct as wire
from typing import Final

from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError

from .peer import PEER_METADATA, PEER_METADATA_ID

MAGIC: Final = 0x3D230467
HEADER: Final = wire.Struct(">II")  # magic, data size
STRUCT_TYPE_URL: Final = "type.googleapis.com/google.protobuf.Struct"
METADATA_KEY: Final = PEER_METADATA.decode()  # "x-envoy-peer-metadata"
METADATA_ID_KEY: Final = PEER_METADATA_ID.decode()  # "x-envoy-peer-metadata-id"
MAX_EXCHANGE_BYTES: Final = 64 * 1024  # a larger header is not buffered: its bytes pass through (Envoy has no bound)


def exchange_header(node_id: str, metadata: bytes) -> bytes:
    """What this sidecar writes first: `metadata` is its `x-envoy-peer-metadata` header value (base64 of the
    Struct, telemetry/peer.encode_metadata), `node_id` its node id. b"" when there is nothing to say (as Envoy,
    which then writes nothing)."""
    data = struct_pb2.Struct()
    if metadata:
        node = struct_pb2.Struct()
        node.ParseFromString(base64.b64decode(metadata))
        data.fields[METADATA_KEY].struct_value.CopyFrom(node)
    if node_id:
        data.fields[METADATA_ID_KEY].string_value = node_id
    if not data.fields:
        return b""
    blob = any_pb2.Any(type_url=STRUCT_TYPE_URL, value=data.SerializeToString(deterministic=True))
    payload = blob.SerializeToString(deterministic=True)
    return HEADER.pack(MAGIC, len(payload)) + payload


class PeerExchangeReader:
    """Takes the peer's header off the front of what it sends. `feed` returns the application bytes to pass on
    (b"" while the header is still incomplete); once `done`, `peer` is the peer's metadata as an
    `x-envoy-peer-metadata` value (base64 of its Struct, for telemetry/peer.PeerCache) and `peer_id` its node id,
    both empty when it sent none or sent something that is not one."""

    __slots__ = ("buffer", "done", "peer", "peer_id")

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False
        self.peer = b""
        self.peer_id = ""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        buffer = self.buffer + data
        if len(buffer) < HEADER.size:
            self.buffer = buffer
            return b""
        magic, size = HEADER.unpack_from(buffer)
        if magic != MAGIC or size > MAX_EXCHANGE_BYTES:  # no header (or one we will not buffer): all is payload
            return self._finish(b"", buffer)
        if len(buffer) < HEADER.size + size:
            self.buffer = buffer
            return b""
        return self._finish(buffer[HEADER.size:HEADER.size + size], buffer[HEADER.size + size:])

    def _finish(self, blob: bytes, rest: bytes) -> bytes:
        self.done = True
        self.buffer = b""
        if blob:
            try:
                envelope = any_pb2.Any()
                envelope.ParseFromString(blob)
                data = struct_pb2.Struct()
                if envelope.type_url == STRUCT_TYPE_URL:
                    data.ParseFromString(envelope.value)
            except DecodeError:
                return blob + rest  # Envoy: "Metadata Not found"; the initial header alone is consumed
            node = data.fields.get(METADATA_KEY)
            if node is not None and node.WhichOneof("kind") == "struct_value":
                self.peer = base64.b64encode(node.struct_value.SerializeToString(deterministic=True))
            node_id = data.fields.get(METADATA_ID_KEY)
            if node_id is not None and node_id.WhichOneof("kind") == "string_value":
                self.peer_id = node_id.string_value
        return rest
