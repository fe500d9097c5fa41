"""Consistency of meshproxy.istio.schema, and the product's validator (meshproxy.istio.load, `meshproxy validate`)
enforcing it: Istio's own sample YAML passes, broken documents give their exact `file:doc: field.path: message`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from meshproxy.cli import main
from meshproxy.istio import schema
from meshproxy.istio.load import load_text
from meshproxy.istio.validate import GROUP
from meshproxy.istio.problems import Problem
from meshproxy.istio.schema import (
    DEPRECATED,
    DEPRECATED_ENUM_VALUES,
    KINDS,
    MESSAGES,
    METADATA,
    ONEOFS,
    SECURITY_KINDS,
)

from harness import ISTIO_CURRENT, LEGACY


def _check_type(t: object, where: str) -> list[str]:
    """Problems with one Type expression (empty when well formed)."""
    if isinstance(t, str):
        return [] if t in schema.SCALARS or t in MESSAGES else [f"{where}: unknown type {t!r}"]
    if isinstance(t, tuple) and len(t) == 2:
        head, arg = t
        if head == "enum":
            ok = isinstance(arg, frozenset) and arg and all(isinstance(n, str) for n in arg)
            return [] if ok else [f"{where}: bad enum {arg!r}"]
        if head in ("list", "map", "portmap"):
            return _check_type(arg, f"{where}[]")
    return [f"{where}: malformed type {t!r}"]


def _messages_in(t: object) -> list[str]:
    if isinstance(t, str):
        return [t] if t in MESSAGES else []
    if t[0] in ("list", "map", "portmap"):
        return _messages_in(t[1])
    return []


def test_every_type_is_well_formed_and_every_message_exists():
    problems = [p for msg, fields in MESSAGES.items() for f, t in fields.items() for p in _check_type(t, f"{msg}.{f}")]
    problems += [p for f, t in METADATA.items() for p in _check_type(t, f"metadata.{f}")]
    assert problems == []
    assert all(spec in MESSAGES for spec in [*KINDS.values(), *SECURITY_KINDS.values()])


def test_every_message_is_reachable_from_a_kind():
    seen: set[str] = set()
    todo = [*KINDS.values(), *SECURITY_KINDS.values()]
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


# ---------------------------------------------------------------- the validator over Istio's samples

SAMPLE_FILES = [*ISTIO_CURRENT, *sorted(LEGACY.rglob("*.yaml"))]


def _networking_documents(text: str) -> int:
    """Documents of a kind meshproxy reads (counted from the YAML alone, independent of the loader)."""
    return sum(1 for doc in yaml.safe_load_all(text) if isinstance(doc, dict) and doc.get("kind") in KINDS
               and str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"))


def test_the_samples_cover_every_kind():
    kinds = {doc.get("kind") for path in SAMPLE_FILES for doc in yaml.safe_load_all(path.read_text())
             if isinstance(doc, dict)}
    assert {"VirtualService", "DestinationRule", "ServiceEntry", "Gateway"} <= kinds
    assert sum(_networking_documents(path.read_text()) for path in SAMPLE_FILES) > 50


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=[p.relative_to(p.parents[1]).as_posix() for p in SAMPLE_FILES])
def test_every_istio_sample_document_passes_the_validator(path: Path):
    """Every field Istio's files use is in the schema: no error, and no document dropped on the way."""
    text = path.read_text()
    problems: list[Problem] = []
    resources = load_text(text, path.name, problems)
    assert [str(p) for p in problems if p.severity == "error"] == []
    assert len(resources) == _networking_documents(text)
    warnings = [str(p) for p in problems]
    if path.parent.name == "istio-1.0.0" and path.name.startswith("virtual-service-ratings-test-"):
        # Istio 1.0's integer `percent`: accepted, deprecated (Istio's proto keeps it, Abort's now reserved)
        kind = path.stem.rsplit("-", 1)[1]
        note = DEPRECATED[(f"HTTPFaultInjection.{kind.capitalize()}", "percent")]
        assert warnings == [f"{path.name}:0: spec.http[0].fault.{kind}.percent: warning: deprecated: {note}"]
    else:
        assert warnings == []  # the current files, and all others of the old releases, use no deprecated field


# ---------------------------------------------------------------- the validator over broken documents

# (YAML, the exact lines `meshproxy validate` prints for it, file name replaced by {file})
BROKEN = {
    "unknown-fields-and-scalar-types": ("""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, colour: blue}
spec:
  hosts: [ratings]
  http:
  - fault:
      delay: {fixdDelay: 7s, percentage: {value: 10}}
    route:
    - destination: {host: ratings, port: {number: -1}}
      weight: "100"
""", [
        "{file}:0: metadata.colour: unknown field 'colour'",
        "{file}:0: spec.http[0].fault.delay.fixdDelay: unknown field 'fixdDelay' (did you mean 'fixedDelay'?)",
        "{file}:0: spec.http[0].route[0].destination.port.number: -1 is out of range for uint32",
        "{file}:0: spec.http[0].route[0].weight: expected int32, got string '100'",
    ]),
    "list-enum-map-in-the-second-document": ("""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec: {host: ratings}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: db.example.com
  ports: [{number: 3306, name: mysql, protocol: MYSQL}]
  resolution: MAGIC
  endpoints: [{address: 10.0.0.1, labels: [version, v1]}]
""", [
        "{file}:1: spec.hosts: expected a list, got string",
        "{file}:1: spec.resolution: 'MAGIC' is not one of DNS, DNS_ROUND_ROBIN, DYNAMIC_DNS, NONE, STATIC",
        "{file}:1: spec.endpoints[0].labels: expected a mapping, got list",
    ]),
    "oneof-bool-duration-double": ("""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /a, prefix: /b}, ignoreUriCase: "yes"}]
    timeout: 5 parsecs
    fault: {abort: {httpStatus: 500, percentage: {value: lots}}}
    route: [{destination: {host: reviews}}]
""", [
        "{file}:0: spec.http[0].match[0].uri: only one of exact, prefix, regex may be set, got exact, prefix",
        "{file}:0: spec.http[0].match[0].ignoreUriCase: expected bool, got string 'yes'",
        "{file}:0: spec.http[0].timeout: '5 parsecs' is not a duration (like 1.5s, 100ms, 1m30s)",
        "{file}:0: spec.http[0].fault.abort.percentage.value: expected double, got string 'lots'",
    ]),
}


def _validate(*paths: Path):
    return CliRunner().invoke(main, ["validate", *map(str, paths)])


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_documents_give_each_problem_at_its_field_path(tmp_path: Path, case: str):
    text, expected = BROKEN[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    expected = [line.format(file=path) for line in expected]
    problems: list[Problem] = []
    load_text(text, str(path), problems)
    assert [str(p) for p in problems] == expected
    result = _validate(path)
    assert result.exit_code == 1
    assert result.output.splitlines() == [*expected, f"invalid: {len(expected)} error(s), 0 warning(s)"]


def test_a_typo_in_an_istio_sample_is_found_where_it_is(tmp_path: Path):
    """Istio's own file with one key misspelt: the one problem, at that key; the file as shipped is valid."""
    original = next(p for p in ISTIO_CURRENT if p.name == "virtual-service-reviews-test-v2.yaml")
    assert _validate(original).exit_code == 0
    text = original.read_text()
    assert text.count("exact: jason") == 1
    broken = tmp_path / original.name
    broken.write_text(text.replace("exact: jason", "exakt: jason"))
    result = _validate(broken)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{broken}:0: spec.http[0].match[0].headers.end-user.exakt: unknown field 'exakt' (did you mean 'exact'?)",
        "invalid: 1 error(s), 0 warning(s)"]


def test_a_deprecated_field_is_a_warning_and_the_file_stays_valid(tmp_path: Path):
    path = tmp_path / "delay.yaml"
    path.write_text("""\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - fault: {delay: {fixedDelay: 7s, percent: 100}}
    route: [{destination: {host: ratings}}]
""")
    assert ("HTTPFaultInjection.Delay", "percent") in DEPRECATED
    result = _validate(path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{path}:0: spec.http[0].fault.delay.percent: warning: deprecated: use percentage"
    assert lines[-1].startswith("valid: 1 file(s), 1 VirtualService,")
