"""The schema pass: what the CRD's structural schema rejects (unknown fields, wrong types, oneofs).

A document is first checked as a Kubernetes resource (apiVersion, kind, metadata),
then its spec against `schema.MESSAGES`. Problems carry the field path
(`spec.http[0].fault.delay.fixdDelay: unknown field`). The value pass (what Istio's
webhook rejects) runs while building the model: see build.py.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from typing import Any

from . import model as m
from .problems import DocProblems
from .schema import DEPRECATED, KINDS, MESSAGES, METADATA, ONEOFS, SECURITY_KINDS
from .values import is_duration

log = logging.getLogger("meshproxy.config")

GROUP = "networking.istio.io"
SERVED_VERSIONS = ("v1", "v1beta1", "v1alpha3")
SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")
DNS1123_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_document(data: Any, doc: DocProblems) -> m.Resource | None:
    """The schema pass over one YAML document: a Resource (identity, origin, checked spec) when it is an
    Istio networking resource meshproxy reads and has no error; None otherwise (problems in `doc`)."""
    if not isinstance(data, dict):
        doc.error("", f"a document must be a mapping, got {_type_name(data)}")
        return None
    kind, api_version = data.get("kind"), data.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        missing = [k for k, v in (("apiVersion", api_version), ("kind", kind)) if not isinstance(v, str)]
        doc.error(missing[0], f"not a Kubernetes resource: {' and '.join(missing)} must be set")
        return None
    group, _, version = api_version.rpartition("/")
    if group == SECURITY_GROUP:  # security is never skipped: a policy the proxy did not read protects nothing
        if kind not in SECURITY_KINDS:
            doc.error("kind", f"{kind!r} is not a {SECURITY_GROUP} kind meshproxy knows "
                              f"({', '.join(SECURITY_KINDS)}); refused rather than ignored")
            return None
        served: tuple[str, ...] = SECURITY_VERSIONS
        kinds = SECURITY_KINDS
    elif group != GROUP or kind not in KINDS:
        log.debug("%s:%d: skipping %s %s (not an Istio networking resource meshproxy uses)",
                  doc.file, doc.index, api_version, kind)
        return None
    else:
        served, kinds = SERVED_VERSIONS, KINDS
    if version not in served:
        doc.error("apiVersion", f"{api_version} is not served; use one of {', '.join(f'{group}/{v}' for v in served)}")
        return None
    for key in data:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            doc.error(str(key), f"unknown field {key!r}")
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        doc.error("metadata", "is required and must be a mapping")
        return None
    _check_message(doc, metadata, METADATA, "metadata", "ObjectMeta")
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    if not isinstance(name, str) or not DNS1123_SUBDOMAIN_RE.fullmatch(name):
        doc.error("metadata.name", f"{name!r} is not a valid resource name (lower-case DNS-1123 subdomain)")
    if not isinstance(namespace, str) or not DNS1123_SUBDOMAIN_RE.fullmatch(namespace):
        doc.error("metadata.namespace", f"{namespace!r} is not a valid namespace")
    spec = data.get("spec")
    if spec is None and group == SECURITY_GROUP:
        spec = {}  # `kubectl apply` of a policy without spec: an empty one (an ALLOW policy that allows nothing)
    if not isinstance(spec, dict):
        doc.error("spec", "is required and must be a mapping")
        return None
    message = kinds[kind]
    _check(doc, spec, message, "spec")
    if doc.errors:
        return None
    annotations = metadata.get("annotations") or {}
    return m.Resource(kind, str(name), str(namespace), m.Origin(doc.file, doc.index), spec,
                      {str(k): str(v) for k, v in annotations.items()})


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def _check(doc: DocProblems, value: Any, typ: Any, path: str) -> None:
    if isinstance(typ, tuple):
        tag = typ[0]
        if tag == "list":
            if not isinstance(value, list):
                doc.error(path, f"expected a list, got {_type_name(value)}")
                return
            for i, item in enumerate(value):
                _check(doc, item, typ[1], f"{path}[{i}]")
        elif tag == "map":
            if not isinstance(value, dict):
                doc.error(path, f"expected a mapping, got {_type_name(value)}")
                return
            for key, item in value.items():
                if not isinstance(key, str):
                    doc.error(path, f"keys must be strings, got {_type_name(key)} {key!r}")
                    continue
                _check(doc, item, typ[1], f"{path}.{key}")
        elif tag == "portmap":  # map<uint32, T>: YAML writes the keys as integers, JSON as strings
            if not isinstance(value, dict):
                doc.error(path, f"expected a mapping, got {_type_name(value)}")
                return
            for key, item in value.items():
                if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
                    doc.error(f"{path}.{key}", f"keys must be port numbers, got {_type_name(key)} {key!r}")
                    continue
                _check(doc, item, typ[1], f"{path}.{key}")
        elif tag == "enum":
            if isinstance(value, str) and value in typ[1]:
                return
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(typ[1]):
                return
            doc.error(path, f"{value!r} is not one of {', '.join(sorted(typ[1]))}")
        return
    if typ in MESSAGES:
        if not isinstance(value, dict):
            doc.error(path, f"expected a mapping ({typ}), got {_type_name(value)}")
            return
        _check_message(doc, value, MESSAGES[typ], path, typ)
        return
    _check_scalar(doc, value, typ, path)


def _check_message(doc: DocProblems, value: dict[Any, Any], fields: Mapping[str, Any], path: str, message: str) -> None:
    nulls = [key for key, item in value.items() if item is None and key in fields]
    for key in nulls:  # YAML `field:` / `field: null` is the field left out, for the builders too
        del value[key]
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            doc.error(sub, f"unknown field {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        note = DEPRECATED.get((message, key))
        if note:
            doc.warn(sub, f"deprecated: {note}")
        if item is None:
            continue  # YAML `field:` with no value is the field left out
        _check(doc, item, fields[key], sub)
    for group in ONEOFS.get(message, ()):
        present = [f for f in group if value.get(f) is not None]
        if len(present) > 1:
            doc.error(path, f"only one of {', '.join(group)} may be set, got {', '.join(present)}")


INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1)}


def _check_scalar(doc: DocProblems, value: Any, typ: str, path: str) -> None:
    if typ in ("value", "struct"):
        if typ == "struct" and not isinstance(value, dict):
            doc.error(path, f"expected a mapping, got {_type_name(value)}")
        return
    if typ in ("string", "bytes"):
        ok = isinstance(value, str)
    elif typ == "bool":
        ok = isinstance(value, bool)
    elif typ in INT_RANGES:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not INT_RANGES[typ][0] <= value <= INT_RANGES[typ][1]:
            doc.error(path, f"{value} is out of range for {typ}")
            return
    elif typ == "double":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ == "duration":
        ok = isinstance(value, str) and is_duration(value)
        if not ok:
            doc.error(path, f"{value!r} is not a duration (like 1.5s, 100ms, 1m30s)")
            return
    else:
        raise AssertionError(f"schema names unknown type {typ!r} at {path}")
    if not ok:
        hint = " (quote it)" if typ == "string" and isinstance(value, (int, float, bool)) else ""
        doc.error(path, f"expected {typ}, got {_type_name(value)} {value!r}{hint}")
