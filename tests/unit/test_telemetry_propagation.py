"""Trace propagation table: every B3 / W3C / x-request-id combination, malformed ones included.

Each case goes through the data path's hook (`Telemetry.on_request`) with a seeded id generator, and
checks what the upstream request carries: the trace id kept (or a new one), this hop's own span id, the
incoming span as parent, the sampling decision, and which formats are written.
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

import pytest

from harness import record, upstream_headers

from meshproxy.http1.head import build_request_head
from meshproxy.stream_info import StreamInfo
from meshproxy.telemetry.access_log import AccessLog
from meshproxy.telemetry.core import MeshTelemetry, Telemetry
from meshproxy.telemetry.peer import Workload
from meshproxy.telemetry.propagation import (
    TRACE_HEADERS,
    RequestIds,
    extract,
    first_values,
    parse_b3_single,
    parse_traceparent,
    request_id_dice,
    uuid_texts,
)

T128 = "463ac35c9f6413ad48485a3953bb6124"
T64 = "463ac35c9f6413ad"
S = "a2fb4a1d1a96d312"
P = "0020000000000001"
W3C_T = "0af7651916cd43dd8448eb211c80319c"
W3C_P = "b7ad6b7169203331"
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
NEW = "new"  # expected: a fresh 128-bit trace id
# x-request-ids whose Envoy dice (first 8 hex digits mod 10000) are 0 and 7295: under / over 1 %
LUCKY = "00000000-0000-4000-8000-000000000000"
UNLUCKY = "ffffffff-0000-4000-8000-000000000000"


class Recorder:
    def __init__(self) -> None:
        self.spans: list[tuple[Any, ...]] = []

    def record(self, *args: Any) -> None:
        self.spans.append(args)

    def close(self) -> None:
        pass


def mesh(sampling: float = 1.0, seed: int = 7, **kw: Any) -> MeshTelemetry:
    return MeshTelemetry(Workload.of("productpage-v1", "default", {"app": "productpage", "version": "v1"},
                                     "Kubernetes"), {"app": "productpage"}, sampling=sampling,
                         recorder=Recorder(), rng=random.Random(seed), **kw)  # type: ignore[arg-type]


def request(headers: list[tuple[str, str]], telemetry: Telemetry | None = None) -> tuple[StreamInfo, dict[str, list[str]]]:
    """Run on_request for a request with these headers; the extra upstream headers by name."""
    telemetry = telemetry or Telemetry("outbound", "outbound", AccessLog(), mesh(), )
    head = build_request_head(b"GET", b"/productpage", [(b"host", b"reviews:9080")] +
                              [(k.lower().encode(), v.encode()) for k, v in headers], "1.1", True)
    stream = record(head)
    out: dict[str, list[str]] = {}
    for name, value in upstream_headers(telemetry, stream):
        out.setdefault(name.decode(), []).append(value.decode())
    return stream, out


def one(out: dict[str, list[str]], name: str) -> str | None:
    values = out.get(name)
    if values is None:
        return None
    assert len(values) == 1, (name, values)
    return values[0]


# (case, incoming headers, expected trace id (NEW or the id), parent span id, sampled, debug, b3 single written,
#  tracestate forwarded)
CASES = [
    ("no trace headers, lucky request id", [("x-request-id", LUCKY)], NEW, None, True, False, False, None),
    ("no trace headers, unlucky request id", [("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("b3 multi 128-bit sampled", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-parentspanid", P),
                                  ("x-b3-sampled", "1")], T128, S, True, False, False, None),
    ("b3 multi 64-bit keeps its width", [("x-b3-traceid", T64), ("x-b3-spanid", S), ("x-b3-sampled", "1")],
     T64, S, True, False, False, None),
    ("b3 multi upper case is read, written lower", [("x-b3-traceid", T128.upper()), ("x-b3-spanid", S.upper()),
                                                    ("x-b3-sampled", "1")], T128, S, True, False, False, None),
    ("b3 sampled 0 denies", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-sampled", "0"),
                             ("x-request-id", LUCKY)], T128, S, False, False, False, None),
    ("b3 sampled true", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-sampled", "true"),
                         ("x-request-id", UNLUCKY)], T128, S, True, False, False, None),
    ("b3 sampled false", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-sampled", "false"),
                          ("x-request-id", LUCKY)], T128, S, False, False, False, None),
    ("b3 sampled junk: this proxy decides", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-sampled", "yes"),
                                             ("x-request-id", UNLUCKY)], T128, S, False, False, False, None),
    ("b3 sampled absent: this proxy decides", [("x-b3-traceid", T128), ("x-b3-spanid", S),
                                               ("x-request-id", LUCKY)], T128, S, True, False, False, None),
    ("x-b3-flags 1 is debug", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-flags", "1"),
                               ("x-request-id", UNLUCKY)], T128, S, True, True, False, None),
    ("debug wins over sampled 0", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-flags", "1"),
                                   ("x-b3-sampled", "0")], T128, S, True, True, False, None),
    ("x-b3-flags junk is ignored", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-flags", "2"),
                                    ("x-b3-sampled", "0")], T128, S, False, False, False, None),
    ("sampled 1 alone: new trace, accepted", [("x-b3-sampled", "1"), ("x-request-id", UNLUCKY)], NEW, None, True,
     False, False, None),
    ("sampled 0 alone: new trace, denied", [("x-b3-sampled", "0"), ("x-request-id", LUCKY)], NEW, None, False,
     False, False, None),
    ("bad span id keeps the trace id", [("x-b3-traceid", T128), ("x-b3-spanid", "xyz"), ("x-b3-sampled", "1")],
     T128, None, True, False, False, None),
    ("empty span id keeps the trace id", [("x-b3-traceid", T128), ("x-b3-spanid", ""), ("x-b3-sampled", "1")],
     T128, None, True, False, False, None),
    ("all-zero span id keeps the trace id", [("x-b3-traceid", T128), ("x-b3-spanid", "0" * 16),
                                             ("x-b3-sampled", "1")], T128, None, True, False, False, None),
    ("bad parent span id is ignored", [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-parentspanid", "zz"),
                                       ("x-b3-sampled", "1")], T128, S, True, False, False, None),
    ("bad trace id: new trace, decision kept", [("x-b3-traceid", "xyz"), ("x-b3-spanid", S),
                                                ("x-b3-sampled", "1"), ("x-request-id", UNLUCKY)], NEW, None, True,
     False, False, None),
    ("empty trace id: new trace", [("x-b3-traceid", ""), ("x-b3-spanid", S), ("x-b3-sampled", "0")], NEW, None,
     False, False, False, None),
    ("all-zero trace id: new trace", [("x-b3-traceid", "0" * 32), ("x-b3-spanid", S), ("x-b3-sampled", "1")], NEW,
     None, True, False, False, None),
    ("trace id of 20 digits: new trace", [("x-b3-traceid", "463ac35c9f6413ad4848"), ("x-b3-spanid", S),
                                          ("x-b3-sampled", "1")], NEW, None, True, False, False, None),
    ("first x-b3-traceid wins", [("x-b3-traceid", T128), ("x-b3-traceid", W3C_T), ("x-b3-spanid", S),
                                 ("x-b3-sampled", "1")], T128, S, True, False, False, None),
    ("b3 single full", [("b3", f"{T128}-{S}-1-{P}")], T128, S, True, False, True, None),
    ("b3 single without state: this proxy decides", [("b3", f"{T64}-{S}"), ("x-request-id", UNLUCKY)], T64, S,
     False, False, True, None),
    ("b3 single debug", [("b3", f"{T128}-{S}-d"), ("x-request-id", UNLUCKY)], T128, S, True, True, True, None),
    ("b3 single deny", [("b3", f"{T128}-{S}-0"), ("x-request-id", LUCKY)], T128, S, False, False, True, None),
    ("b3: 0 alone denies a new trace", [("b3", "0"), ("x-request-id", LUCKY)], NEW, None, False, False, True, None),
    ("b3: d alone is debug", [("b3", "d"), ("x-request-id", UNLUCKY)], NEW, None, True, True, True, None),
    ("b3 single bad state is ignored", [("b3", f"{T128}-{S}-x"), ("x-request-id", LUCKY)], T128, S, True, False,
     True, None),
    ("b3 single bad span keeps trace id", [("b3", f"{T128}-nothex-1")], T128, None, True, False, True, None),
    ("b3 single junk falls back to multi", [("b3", "garbage"), ("x-b3-traceid", T128), ("x-b3-spanid", S),
                                            ("x-b3-sampled", "1")], T128, S, True, False, False, None),
    ("b3 single of five fields is junk", [("b3", f"{T128}-{S}-1-{P}-{P}"), ("x-request-id", UNLUCKY)], NEW, None,
     False, False, False, None),
    ("b3 single wins over multi", [("b3", f"{T64}-{S}-1"), ("x-b3-traceid", T128), ("x-b3-spanid", P),
                                   ("x-b3-sampled", "0")], T64, S, True, False, True, None),
    ("b3 single trace, multi decision", [("b3", f"{T128}-{S}"), ("x-b3-sampled", "1"),
                                         ("x-request-id", UNLUCKY)], T128, S, True, False, True, None),
    ("empty b3 header is ignored", [("b3", ""), ("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("traceparent sampled, tracestate passed", [("traceparent", f"00-{W3C_T}-{W3C_P}-01"),
                                                ("tracestate", "congo=t61rcWkgMzE")], W3C_T, W3C_P, True, False,
     False, "congo=t61rcWkgMzE"),
    ("traceparent not sampled", [("traceparent", f"00-{W3C_T}-{W3C_P}-00"), ("x-request-id", LUCKY)], W3C_T, W3C_P,
     False, False, False, None),
    ("traceparent random-trace flag only", [("traceparent", f"00-{W3C_T}-{W3C_P}-02")], W3C_T, W3C_P, False, False,
     False, None),
    ("traceparent version ff: ignored with tracestate", [("traceparent", f"ff-{W3C_T}-{W3C_P}-01"),
                                                         ("tracestate", "a=b"), ("x-request-id", UNLUCKY)], NEW,
     None, False, False, False, None),
    ("traceparent upper case: ignored", [("traceparent", f"00-{W3C_T.upper()}-{W3C_P}-01"),
                                         ("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("traceparent zero trace id: ignored", [("traceparent", f"00-{'0' * 32}-{W3C_P}-01"),
                                            ("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("traceparent zero parent id: ignored", [("traceparent", f"00-{W3C_T}-{'0' * 16}-01"),
                                             ("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("traceparent v00 with more fields: ignored", [("traceparent", f"00-{W3C_T}-{W3C_P}-01-abcd"),
                                                   ("x-request-id", UNLUCKY)], NEW, None, False, False, False, None),
    ("traceparent later version with more fields: read", [("traceparent", f"cc-{W3C_T}-{W3C_P}-01-what-the-future")],
     W3C_T, W3C_P, True, False, False, None),
    ("traceparent truncated: ignored", [("traceparent", f"00-{W3C_T}-{W3C_P}"), ("x-request-id", UNLUCKY)], NEW,
     None, False, False, False, None),
    ("traceparent empty: ignored", [("traceparent", ""), ("tracestate", "a=b"), ("x-request-id", UNLUCKY)], NEW,
     None, False, False, False, None),
    ("tracestate without traceparent: dropped", [("tracestate", "a=b"), ("x-request-id", UNLUCKY)], NEW, None,
     False, False, False, None),
    ("B3 wins over traceparent; same trace keeps tracestate",
     [("x-b3-traceid", W3C_T), ("x-b3-spanid", S), ("x-b3-sampled", "0"),
      ("traceparent", f"00-{W3C_T}-{W3C_P}-01"), ("tracestate", "a=b")], W3C_T, S, False, False, False, "a=b"),
    ("B3 64-bit and traceparent of the padded id keep tracestate",
     [("x-b3-traceid", T64), ("x-b3-spanid", S), ("x-b3-sampled", "1"),
      ("traceparent", f"00-{'0' * 16}{T64}-{W3C_P}-01"), ("tracestate", "a=b")], T64, S, True, False, False, "a=b"),
    ("B3 wins over traceparent of another trace, whose tracestate is dropped",
     [("x-b3-traceid", T128), ("x-b3-spanid", S), ("x-b3-sampled", "1"),
      ("traceparent", f"00-{W3C_T}-{W3C_P}-00"), ("tracestate", "a=b")], T128, S, True, False, False, None),
    ("bad B3 trace id falls back to traceparent", [("x-b3-traceid", "nope"), ("traceparent", f"00-{W3C_T}-{W3C_P}-01")],
     W3C_T, W3C_P, True, False, False, None),
    ("B3 decision with a traceparent context", [("x-b3-sampled", "0"), ("traceparent", f"00-{W3C_T}-{W3C_P}-01")],
     W3C_T, W3C_P, False, False, False, None),
]


@pytest.mark.parametrize(("case", "headers", "trace_id", "parent", "sampled", "debug", "b3_single", "tracestate"),
                         CASES, ids=[c[0] for c in CASES])
def test_propagation_table(case: str, headers: list[tuple[str, str]], trace_id: str, parent: str | None,
                           sampled: bool, debug: bool, b3_single: bool, tracestate: str | None) -> None:
    stream, out = request(headers)
    sent_trace = one(out, "x-b3-traceid")
    span = one(out, "x-b3-spanid")
    assert sent_trace is not None and span is not None
    if trace_id == NEW:
        assert HEX32.match(sent_trace), sent_trace
        assert sent_trace not in (T128, W3C_T)
    else:
        assert sent_trace == trace_id
    assert HEX16.match(span) and span not in (S, P, W3C_P)  # this hop's own span
    assert one(out, "x-b3-parentspanid") == parent
    if debug:
        assert one(out, "x-b3-flags") == "1" and "x-b3-sampled" not in out
    else:
        assert one(out, "x-b3-sampled") == ("1" if sampled else "0") and "x-b3-flags" not in out
    padded = sent_trace if len(sent_trace) == 32 else "0" * 16 + sent_trace
    assert one(out, "traceparent") == f"00-{padded}-{span}-{'01' if sampled else '00'}"
    if b3_single:
        state = "d" if debug else "1" if sampled else "0"
        assert one(out, "b3") == "-".join([sent_trace, span, state] + ([parent] if parent else []))
    else:
        assert "b3" not in out
    assert one(out, "tracestate") == tracestate
    # a sampled request keeps the ids for its span; an unsampled one keeps nothing
    assert stream.trace == ((sent_trace.encode(), span.encode(), parent.encode() if parent else None)
                            if sampled else None)


def test_incoming_trace_headers_are_never_forwarded_as_received() -> None:
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh())
    assert TRACE_HEADERS <= telemetry.strip_request
    assert b"x-request-id" not in telemetry.strip_request  # kept as is, never rewritten


def test_tracing_off_forwards_trace_headers_unchanged_and_adds_none() -> None:
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(tracing=False))
    assert not (TRACE_HEADERS & telemetry.strip_request)
    stream, out = request([("x-b3-traceid", T128), ("x-b3-sampled", "1"), ("x-request-id", LUCKY)], telemetry)
    assert not any(name in out for name in ("x-b3-traceid", "traceparent", "x-b3-spanid"))
    assert stream.trace is None


def test_a_missing_request_id_is_a_fresh_uuid4_sent_upstream() -> None:
    stream, out = request([])
    rid = one(out, "x-request-id")
    assert rid is not None and uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid
    assert stream.request_id == rid.encode()
    stream, out = request([("X-Request-Id", "caller-chosen")])
    assert "x-request-id" not in out and stream.request_id == b"caller-chosen"


def test_every_hop_gets_its_own_span_id_and_the_same_trace() -> None:
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=100))
    incoming: list[tuple[str, str]] = [("x-request-id", UNLUCKY)]
    seen_spans, traces = [], set()
    for _ in range(5):  # each hop forwards what the previous one sent
        _, out = request(incoming, telemetry)
        traces.add(one(out, "x-b3-traceid"))
        parent = one(out, "x-b3-parentspanid")
        assert parent == (seen_spans[-1] if seen_spans else None)
        seen_spans.append(one(out, "x-b3-spanid"))
        incoming = [(k, v[0]) for k, v in out.items()]
    assert len(traces) == 1 and len(set(seen_spans)) == 5


@pytest.mark.parametrize(("sampling", "expected"), [(0, 0), (1, 100), (50, 5000), (100, 10000)])
def test_sampling_percentage_is_envoys_request_id_dice(sampling: float, expected: int) -> None:
    """Random sampling as Envoy's: the request id's first 8 hex digits mod 10000 under percent x 100."""
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=sampling))
    sampled = 0
    for dice in range(0, 10000, 1):
        rid = f"{dice:08x}-0000-4000-8000-000000000000"
        assert request_id_dice(rid.encode()) == dice
        stream, _ = request([("x-request-id", rid)], telemetry)
        sampled += stream.trace is not None
    assert sampled == expected


def test_generated_request_ids_sample_about_the_percentage() -> None:
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=10, seed=3))
    sampled = sum(request([], telemetry)[0].trace is not None for _ in range(4000))
    assert 300 < sampled < 500  # 10 % of 4000, seeded


def test_a_new_request_samples_by_the_dice_of_the_request_id_it_gets() -> None:
    """The first proxy draws the request id, the trace and its span at once; the sampling decision is the one
    every later proxy would roll from that request id."""
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=30, seed=9))
    sampled = 0
    for _ in range(500):
        stream, out = request([], telemetry)
        rid = one(out, "x-request-id")
        assert rid is not None and uuid.UUID(rid).version == 4 and uuid.UUID(rid).variant == uuid.RFC_4122
        dice = request_id_dice(rid.encode())
        assert dice is not None and (stream.trace is not None) == (dice < 3000)
        assert one(out, "x-b3-sampled") == ("1" if dice < 3000 else "0")
        trace, span = one(out, "x-b3-traceid"), one(out, "x-b3-spanid")
        assert trace and span and HEX32.match(trace) and HEX16.match(span) and int(trace, 16) and int(span, 16)
        sampled += stream.trace is not None
    assert 100 < sampled < 200


def test_a_request_id_that_is_not_hex_rolls_the_proxy_dice() -> None:
    assert request_id_dice(b"not-a-uuid") is None
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=100))
    assert request([("x-request-id", "not-a-uuid")], telemetry)[0].trace is not None
    telemetry = Telemetry("outbound", "outbound", AccessLog(), mesh(sampling=0))
    assert request([("x-request-id", "not-a-uuid")], telemetry)[0].trace is None


def test_unsampled_requests_make_no_span() -> None:
    recorder = Recorder()
    shared = MeshTelemetry(Workload(), sampling=0, recorder=recorder,  # type: ignore[arg-type]
                           rng=random.Random(1))
    telemetry = Telemetry("outbound", "outbound", AccessLog(), shared)
    for _ in range(200):
        stream, _ = request([("x-b3-sampled", "0")], telemetry)
        assert stream.trace is None
        telemetry.on_complete(stream)
    assert recorder.spans == []


def test_request_ids_are_version_4_uuids_of_their_random_digits() -> None:
    """Each id is 36 hex digits of its draw, in order, with the 8-4-4-4-12 dashes, the version `4` and the RFC 4122
    variant written over four digits; a new draw every 64 ids."""
    draws: list[int] = []

    def randbits(count: int) -> int:
        draws.append(random.Random(len(draws)).getrandbits(count))
        return draws[-1]

    ids = RequestIds(randbits)
    texts = [ids.next().decode() for _ in range(130)]
    assert len(draws) == 3
    for at, text in enumerate(texts):
        digits = f"{draws[at // 64]:0{64 * 36}x}"[at % 64 * 36:][:36]
        variant = "89ab"[int(digits[19], 16) % 4]
        assert text == f"{digits[:8]}-{digits[9:13]}-4{digits[15:18]}-{variant}{digits[20:23]}-{digits[24:]}"
        value = uuid.UUID(text)
        assert value.version == 4 and value.variant == uuid.RFC_4122 and str(value) == text
    assert len(set(texts)) == 130
    for bits in (0, (1 << 144) - 1):
        assert uuid_texts(bits, 1).decode() == str(uuid.UUID(int=0 if bits == 0 else (1 << 128) - 1, version=4))


def test_parsers_never_raise_on_junk() -> None:
    rng = random.Random(11)
    alphabet = b"0123456789abcdefABCDEF-xz \t"
    for _ in range(3000):
        value = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        parse_traceparent(value)
        parse_b3_single(value)
        request_id_dice(value)
        extract(first_values([(name, value) for name in TRACE_HEADERS]))
