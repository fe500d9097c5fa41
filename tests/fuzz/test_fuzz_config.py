"""R13: hypothesis over the config loader, the route compiler and the router (Envoy's route_fuzz_test idea).

Invariant: any YAML text loads, or is refused with problems (ConfigError from `load`); a snapshot
that loads compiles; the compiled table answers `match` for any request head. Nothing else may
be raised. Inputs: schema-guided Istio documents (every field of meshproxy/istio/schema.py, with
wrong types, odd numbers and hostile regexes mixed in) and byte mutations of config/bookinfo.
Crashers are kept in tests/corpus/fuzz/config/ and replayed first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.http1.errors import ProtocolError
from meshproxy.http1.head import build_request_head
from meshproxy.istio import schema
from meshproxy.istio.load import load, load_text, snapshot_of
from meshproxy.istio.problems import ConfigError
from meshproxy.routing.compile import Identity, compile_table

REPO = Path(__file__).resolve().parents[2]
REGRESSIONS = REPO / "tests" / "corpus" / "fuzz" / "config"
SAMPLES = sorted((REPO / "config" / "bookinfo").glob("*.yaml"))
SOAK = os.environ.get("MESHPROXY_SOAK") == "1"
EXAMPLES = 2000 if SOAK else 150
pytestmark = pytest.mark.timeout(3600 if SOAK else 120)  # a soak runs far past the CI per-test limit
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SOAK, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

HOSTS = ["reviews", "ratings", "reviews.default.svc.cluster.local", "*", "*.example.com", "example.com",
         "reviews.prod", "10.0.0.1", "", "a..b", "UPPER", "x" * 300]
STRINGS = HOSTS + ["v1", "v2", "mesh", "default", "/", "/api", "^/api/.*$", "(a+)+$", ".{1000}.{1000}.{1000}.{1000}.{1000}",
                   "(?=x)", "[", "*", "end-user", "jason", "http", "HTTP", "x-user", "1s", "abc", "\u00e9", "\x00"]
DURATIONS = ["1s", "0.5s", "10ms", "0s", "-1s", "1m", "1h", "1.0000001s", "abc", "", "1", "99999999999s"]
NUMBERS = [0, 1, -1, 2, 80, 100, 101, 65535, 65536, 2**31, -(2**63), 1.5, math.inf]
REQUESTS = [(b"GET", b"/", [(b"host", b"reviews")]), (b"GET", b"/api/v1?x=1", [(b"host", b"reviews:9080")]),
            (b"POST", b"/productpage", [(b"host", b"a.example.com"), (b"end-user", b"jason")]),
            (b"GET", b"http://ratings/x", []), (b"GET", b"/", [(b"host", b"")]),
            (b"DELETE", b"/a/../b", [(b"host", b"10.0.0.1:80"), (b"x-user", b"x" * 100)])]


def scalar(kind: str) -> st.SearchStrategy[Any]:
    if kind == "string":
        return st.sampled_from(STRINGS)
    if kind == "bool":
        return st.booleans()
    if kind in ("int32", "uint32", "int64"):
        return st.sampled_from(NUMBERS) | st.integers(-3, 300)
    if kind == "double":
        return st.sampled_from([0.0, 0.5, 50, 100, 100.1, -1, math.nan, math.inf]) | st.floats(-10, 200)
    if kind == "duration":
        return st.sampled_from(DURATIONS)
    if kind == "bytes":
        return st.sampled_from(["aGVsbG8=", "!!", ""])
    return st.sampled_from([{}, {"a": 1}, "x", 1, None])  # struct / value


WRONG = st.sampled_from([None, "x", 7, [], {}, True])


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten, a wrongly typed value otherwise (so most documents get past the schema)."""
    return st.one_of(*([good] * 9), WRONG)


def value(typ: Any, depth: int) -> st.SearchStrategy[Any]:
    if depth > 5:
        return WRONG
    if isinstance(typ, tuple):
        if typ[0] == "enum":
            return mostly(st.sampled_from(sorted(typ[1]))) | st.sampled_from([0, 99, "NOPE"])
        if typ[0] == "list":
            return mostly(st.lists(value(typ[1], depth + 1), max_size=3))
        if typ[0] == "map":
            return mostly(st.dictionaries(st.sampled_from(["version", "x-user", "end-user", "app", "", "X_Y"]),
                                          value(typ[1], depth + 1), max_size=2))
    if typ in schema.SCALARS:
        return mostly(scalar(typ))
    fields = schema.MESSAGES[typ]
    chosen = st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)
    return mostly(chosen.flatmap(lambda names: st.fixed_dictionaries({n: value(fields[n], depth + 1) for n in names})))


@st.composite
def documents(draw: st.DrawFn) -> str:
    docs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(sorted(schema.KINDS)))
        spec = draw(value(schema.KINDS[kind], 0))
        doc = {"apiVersion": draw(st.sampled_from(["networking.istio.io/v1", "networking.istio.io/v1beta1",
                                                   "networking.istio.io/v1alpha3", "v1", "apps/v1"])),
               "kind": kind, "metadata": {"name": draw(st.sampled_from(["a", "b", "reviews", "", "x" * 300]))},
               "spec": spec}
        if draw(st.booleans()):
            doc["metadata"]["namespace"] = draw(st.sampled_from(["default", "prod", ""]))
        docs.append(doc)
    return yaml.safe_dump_all(docs, allow_unicode=True)


@st.composite
def mutated_sample(draw: st.DrawFn) -> str:
    text = bytearray(draw(st.sampled_from(SAMPLES)).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            text[at:at] = draw(st.sampled_from([b"&a ", b"*a", b"- ", b": ", b"\n", b"  ", b"{", b"[", b"!!python/object ",
                                                b"'", b"0x", b"-1", b"\t", b"---\n"]))
        elif choice == 1:
            del text[at:at + draw(st.integers(1, 8))]
        elif text:
            text[min(at, len(text) - 1)] = draw(st.integers(32, 126))
    return text.decode("utf-8", "replace")


def check(text: str) -> None:
    """Load (problems collected, never raised), compile, route: nothing may raise."""
    problems: list[Any] = []
    resources = load_text(text, "fuzz.yaml", problems)
    assert all(p.message for p in problems)
    if any(p.severity == "error" for p in problems):
        return  # `load` raises ConfigError here: the declared refusal
    table, _ = compile_table(snapshot_of(resources), Identity())
    for method, target, headers in REQUESTS:
        try:
            head = build_request_head(method, target, list(headers), "1.1", True)
        except ProtocolError:
            continue
        table.match(head)


def test_regression_corpus(tmp_path: Path) -> None:
    files = sorted(REGRESSIONS.glob("*.yaml"))
    assert files, "the regression corpus is empty"
    for path in files:
        check(path.read_text(encoding="utf-8", errors="replace"))
        try:
            load([path])  # through files too: ConfigError or a result, nothing else
        except ConfigError:
            pass


@FUZZ
@given(text=documents())
def test_schema_guided_documents(text: str) -> None:
    check(text)


@FUZZ
@given(text=mutated_sample())
def test_mutated_samples(text: str) -> None:
    check(text)


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None, derandomize=not SOAK, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=documents() | mutated_sample())
def test_load_from_files_raises_only_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load([path])
    except ConfigError as exc:
        assert exc.problems
