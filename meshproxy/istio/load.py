"""Files and folders of Istio YAML -> a validated Snapshot of model resources.

The orchestration: list the files (read.py reads and parses each), then two passes
per document: the schema (validate.py: unknown fields, wrong types, what the CRD's
structural schema rejects), then the values while building the model (build.py:
what Istio's validation webhook rejects). Every problem is collected with its file,
document index and field path; nothing is applied unless the whole set is valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model as m
from .build import build_resource
from .problems import ConfigError, DocProblems, Problem
from .read import read_text, yaml_documents
from .validate import check_document

YAML_SUFFIXES = (".yaml", ".yml", ".json")


def config_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted, hidden entries skipped as Kubernetes' `..data` links)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and child.suffix in YAML_SUFFIXES and not any(p.startswith(".") for p in rel):
                    files.append(child)
        else:
            files.append(path)
    return files


@dataclass(slots=True)
class LoadResult:
    snapshot: m.Snapshot
    warnings: list[Problem] = field(default_factory=list)


def load(paths: Iterable[str | Path]) -> LoadResult:
    """Load files and folders; raise ConfigError (errors and warnings) if anything is invalid."""
    paths = list(paths)
    named = {Path(p) for p in paths}
    files = config_files(paths)
    problems: list[Problem] = []
    resources: dict[tuple[str, str, str], Any] = {}
    for path in files:
        name = str(path)
        text = read_text(path, problems, named=path in named)
        if text is None:
            continue
        for resource in load_text(text, name, problems):
            key = resource.meta.key
            if key in resources:
                old = resources[key].meta.origin
                problems.append(
                    Problem(name, resource.meta.origin.doc, "metadata.name",
                            f"replaces {key[0]} {key[1]}/{key[2]} from {old}", "warning")
                )
            resources[key] = resource
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return LoadResult(snapshot_of(resources.values(), tuple(str(f) for f in files)), problems)


def snapshot_of(resources: Iterable[Any], files: tuple[str, ...] = ()) -> m.Snapshot:
    items = list(resources)
    return m.Snapshot(
        virtual_services=tuple(r for r in items if isinstance(r, m.VirtualService)),
        destination_rules=tuple(r for r in items if isinstance(r, m.DestinationRule)),
        service_entries=tuple(r for r in items if isinstance(r, m.ServiceEntry)),
        gateways=tuple(r for r in items if isinstance(r, m.Gateway)),
        files=files,
        authorization_policies=tuple(r for r in items if isinstance(r, m.AuthorizationPolicy)),
        peer_authentications=tuple(r for r in items if isinstance(r, m.PeerAuthentication)),
        request_authentications=tuple(r for r in items if isinstance(r, m.RequestAuthentication)),
    )


def load_text(text: str, file: str, problems: list[Problem]) -> list[Any]:
    """Resources of one file's text; problems are appended to `problems`."""
    resources = []
    for index, data in yaml_documents(text, file, problems):
        doc = DocProblems(file, index, problems)
        meta = check_document(data, doc)
        resource = build_resource(doc, meta) if meta is not None else None
        if resource is not None and doc.errors == 0:
            resources.append(resource)
    return resources
