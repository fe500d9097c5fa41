"""Istio's TCP metadata exchange, sans-IO: the header meshproxy writes, read back by protobuf as istio/proxy's
filter reads it, and the reader that takes a peer's header off the front of its bytes, however they are split."""

from __future__ import annotations

import random
import struct

from google.protobuf import any_pb2, struct_pb2

from meshproxy.telemetry.peer import Workload, decode_metadata, encode_metadata
from meshproxy.telemetry.peer_exchange import MAX_EXCHANGE_BYTES, PeerExchangeReader, exchange_header

OWN = Workload.of("reviews-v1", "default", {"app": "reviews", "version": "v1"}, "Kubernetes")
NODE = "sidecar~127.0.0.1~reviews-v1.default~default.svc.cluster.local"


def test_the_header_is_istios_wire_format() -> None:
    header = exchange_header(NODE, encode_metadata(OWN, {"app": "reviews", "version": "v1"}))
    magic, size = struct.unpack(">II", header[:8])
    assert magic == 0x3D230467 and size == len(header) - 8
    envelope = any_pb2.Any()
    envelope.ParseFromString(header[8:])
    assert envelope.type_url == "type.googleapis.com/google.protobuf.Struct"
    data = struct_pb2.Struct()
    data.ParseFromString(envelope.value)
    assert data.fields["x-envoy-peer-metadata-id"].string_value == NODE
    node = data.fields["x-envoy-peer-metadata"].struct_value
    assert node.fields["NAMESPACE"].string_value == "default"
    assert node.fields["LABELS"].struct_value.fields["app"].string_value == "reviews"
    assert exchange_header("", b"") == b""  # nothing to say: nothing written, as Envoy


def test_the_reader_takes_the_header_off_however_the_bytes_are_split() -> None:
    header = exchange_header(NODE, encode_metadata(OWN, {"app": "reviews", "version": "v1"}))
    stream = header + b"application bytes"
    rng = random.Random(16)
    for _ in range(20):
        reader, out, i = PeerExchangeReader(), b"", 0
        while i < len(stream):
            step = rng.randint(1, 40)
            out += reader.feed(stream[i:i + step])
            i += step
        assert out == b"application bytes" and reader.done
        assert reader.peer_id == NODE
        peer = decode_metadata(reader.peer)
        assert peer is not None and (peer.workload, peer.namespace, peer.app) == ("reviews-v1", "default", "reviews")


def test_a_peer_without_the_filter_passes_through() -> None:
    reader = PeerExchangeReader()
    assert reader.feed(b"GET") == b""  # fewer bytes than a header: held
    assert reader.feed(b" / HTTP/1.1\r\n") == b"GET / HTTP/1.1\r\n" and reader.done and reader.peer == b""
    assert reader.feed(b"more") == b"more"
    huge = struct.pack(">II", 0x3D230467, MAX_EXCHANGE_BYTES + 1) + b"x"
    reader = PeerExchangeReader()
    assert reader.feed(huge) == huge  # not buffered
    garbage = struct.pack(">II", 0x3D230467, 3) + b"\xff\xff\xff" + b"rest"
    reader = PeerExchangeReader()
    assert reader.feed(garbage) == b"\xff\xff\xffrest" and reader.peer == b""  # as Envoy: only the 8 bytes go
