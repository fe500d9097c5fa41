"""Consistency of meshproxy.istio.schema, and that it covers the real Istio sample YAML."""

from __future__ import annotations


import pytest
import yaml

from meshproxy.istio import schema
from meshproxy.istio.schema import DEPRECATED, DEPRECATED_ENUM_VALUES, KINDS, MESSAGES, METADATA, ONEOFS

from harness import SAMPLES


def _check_type(t: object, where: str) -> list[str]:
    """Problems with one Type expression (empty when well formed)."""
    if isinstance(t, str):
        return [] if t in schema.SCALARS or t in MESSAGES else [f"{where}: unknown type {t!r}"]
    if isinstance(t, tuple) and len(t) == 2:
        head, arg = t
        if head == "enum":
            ok = isinstance(arg, frozenset) and arg and all(isinstance(n, str) for n in arg)
            return [] if ok else [f"{where}: bad enum {arg!r}"]
        if head in ("list", "map"):
            return _check_type(arg, f"{where}[]")
    return [f"{where}: malformed type {t!r}"]


def _messages_in(t: object) -> list[str]:
    if isinstance(t, str):
        return [t] if t in MESSAGES else []
    if t[0] in ("list", "map"):
        return _messages_in(t[1])
    return []


def test_every_type_is_well_formed_and_every_message_exists():
    problems = [p for msg, fields in MESSAGES.items() for f, t in fields.items() for p in _check_type(t, f"{msg}.{f}")]
    problems += [p for f, t in METADATA.items() for p in _check_type(t, f"metadata.{f}")]
    assert problems == []
    assert all(spec in MESSAGES for spec in KINDS.values())


def test_every_message_is_reachable_from_a_kind():
    seen: set[str] = set()
    todo = list(KINDS.values())
    while todo:
        msg = todo.pop()
        if msg in seen:
            continue
        seen.add(msg)
        for t in MESSAGES[msg].values():
            todo.extend(_messages_in(t))
    assert set(MESSAGES) - seen == set()


def test_oneof_and_deprecated_names_exist():
    for msg, groups in ONEOFS.items():
        for group in groups:
            assert len(group) >= 2, (msg, group)
            assert set(group) <= set(MESSAGES[msg]), (msg, group)
    for (msg, field) in DEPRECATED:
        assert field in MESSAGES[msg], (msg, field)
    for (msg, field, value) in DEPRECATED_ENUM_VALUES:
        t = MESSAGES[msg][field]
        assert t[0] == "enum" and value in t[1], (msg, field, value)


def test_nested_message_names_have_their_parent():
    for name in MESSAGES:
        if "." in name and not name.startswith("istio."):
            assert name.rsplit(".", 1)[0] in MESSAGES, name


# ---------------------------------------------------------------- the samples

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1)}


def _walk(value: object, t: object, path: str, errors: list[str], deprecated: set[tuple[str, str]]) -> None:
    """A small structural check of one value against a Type, collecting errors by field path."""
    if isinstance(t, tuple) and t[0] == "list":
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _walk(item, t[1], f"{path}[{i}]", errors, deprecated)
    elif isinstance(t, tuple) and t[0] == "map":
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for k, v in value.items():
            _walk(v, t[1], f"{path}[{k!r}]", errors, deprecated)
    elif isinstance(t, tuple) and t[0] == "enum":
        if value not in t[1]:
            errors.append(f"{path}: {value!r} is not one of {sorted(t[1])}")
    elif t in MESSAGES:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({t})")
            return
        for k, v in value.items():
            if k not in MESSAGES[t]:
                errors.append(f"{path}.{k}: unknown field of {t}")
                continue
            if (t, k) in DEPRECATED:
                deprecated.add((t, k))
            _walk(v, MESSAGES[t][k], f"{path}.{k}", errors, deprecated)
    elif t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            errors.append(f"{path}: expected {t}, got {value!r}")
    elif t == "double":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
    elif t == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a bool, got {value!r}")
    elif t in ("string", "duration", "bytes"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")


def _check_doc(doc: dict) -> tuple[list[str], set[tuple[str, str]]]:
    errors: list[str] = []
    deprecated: set[tuple[str, str]] = set()
    for k, v in (doc.get("metadata") or {}).items():
        if k not in METADATA:
            errors.append(f"metadata.{k}: unknown field")
    _walk(doc.get("spec") or {}, KINDS[doc["kind"]], "spec", errors, deprecated)
    return errors, deprecated


def _istio_docs() -> list[tuple[str, int, dict]]:
    docs = []
    for path in sorted(SAMPLES.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") in KINDS and "networking.istio.io" in str(doc.get("apiVersion")):
                docs.append((str(path.relative_to(SAMPLES)), i, doc))
    return docs


ISTIO_DOCS = _istio_docs() if SAMPLES.is_dir() else []


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared/istio-samples not present")
def test_samples_are_found():
    kinds = {doc["kind"] for _, _, doc in ISTIO_DOCS}
    assert {"VirtualService", "DestinationRule", "ServiceEntry", "Gateway"} <= kinds
    assert len(ISTIO_DOCS) > 50


@pytest.mark.parametrize(("file", "index", "doc"), ISTIO_DOCS, ids=[f"{f}#{i}" for f, i, _ in ISTIO_DOCS])
def test_every_sample_field_is_in_the_schema(file, index, doc):
    errors, deprecated = _check_doc(doc)
    assert errors == []
    if not file.startswith("legacy/"):
        # The current Bookinfo files use no deprecated field.
        assert deprecated == set()


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared/istio-samples not present")
def test_istio_1_0_integer_fault_percent_is_accepted_as_deprecated():
    seen: set[tuple[str, str]] = set()
    for file, _, doc in ISTIO_DOCS:
        if file.startswith("legacy/istio-1.0.0/virtual-service-ratings-test-"):
            seen |= _check_doc(doc)[1]
    assert {("HTTPFaultInjection.Abort", "percent"), ("HTTPFaultInjection.Delay", "percent")} <= seen


def test_walker_reports_typos_and_wrong_types_by_path():
    doc = yaml.safe_load(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: r, colour: blue}
        spec:
          hosts: [ratings]
          http:
          - fault:
              delay: {fixdDelay: 7s, percentage: {value: 10}}
            route:
            - destination: {host: ratings, port: {number: -1}}
              weight: "100"
        """
    )
    errors, _ = _check_doc(doc)
    assert sorted(errors) == sorted(
        [
            "metadata.colour: unknown field",
            "spec.http[0].fault.delay.fixdDelay: unknown field of HTTPFaultInjection.Delay",
            "spec.http[0].route[0].destination.port.number: expected uint32, got -1",
            "spec.http[0].route[0].weight: expected int32, got '100'",
        ]
    )
