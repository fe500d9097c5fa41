"""The demo's routing state: a folder every sidecar watches, one file per resource.

`apply` and `delete` act as `kubectl apply -f` / `kubectl delete -f`: a resource
replaces the one with the same kind, namespace and name. The whole new state
is validated first; a rejected file changes nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..istio.load import config_files, load
from ..istio.problems import ConfigError, Problem
from ..istio.read import yaml_documents
from ..istio.validate import GROUP
from ..routing.compile import compile_table

DEFAULT_DEMO_DIR = Path(os.environ.get("MESHPROXY_DEMO_DIR", Path(tempfile.gettempdir()) / "meshproxy-demo"))


def config_dir(demo_dir: Path) -> Path:
    return demo_dir / "config"


def _file_name(kind: str, namespace: str, name: str) -> str:
    return f"{kind.lower()}.{namespace}.{name}.yaml"


@dataclass(frozen=True, slots=True)
class _Document:
    file_name: str  # in the state folder
    origin: Problem  # file and document index it came from (path and message unused)
    kind: str
    name: str
    data: dict[str, Any]


def _documents(paths: Iterable[Path]) -> tuple[list[_Document], list[Problem]]:
    """Every Istio networking document of the files, with the name it gets in the state folder."""
    problems: list[Problem] = []
    docs = []
    for path in config_files(paths):
        for index, data in yaml_documents(path.read_text(encoding="utf-8"), str(path), problems):
            if not (isinstance(data, dict) and str(data.get("apiVersion", "")).startswith(GROUP + "/")):
                continue  # Deployments, Services...: not the mesh's business, as `meshproxy run` skips them
            meta = data.get("metadata")
            kind, name = data.get("kind"), meta.get("name") if isinstance(meta, dict) else None
            namespace = meta.get("namespace", "default") if isinstance(meta, dict) else "default"
            if not isinstance(kind, str) or not kind:
                problems.append(Problem(str(path), index, "kind", "is required"))
            elif not isinstance(name, str) or not name:
                problems.append(Problem(str(path), index, "metadata.name", "is required"))
            elif not isinstance(namespace, str) or not namespace:
                problems.append(Problem(str(path), index, "metadata.namespace", "must be a non-empty string"))
            else:
                origin = Problem(str(path), index, "", "")
                docs.append(_Document(_file_name(kind, namespace, name), origin, kind, name, data))
    return docs, problems


def _from_source(problem: Problem, origins: dict[str, Problem], candidate: Path, state: Path) -> Problem:
    """A problem found in the candidate folder, told against the file and document the user gave (or the
    state folder's file, for the resources already there)."""
    message = problem.message.replace(str(candidate), str(state))
    origin = origins.get(Path(problem.file).name)
    if origin is None:
        return replace(problem, file=problem.file.replace(str(candidate), str(state)), message=message)
    return replace(problem, file=origin.file, doc=origin.doc, message=message)


def change(demo_dir: Path, paths: Iterable[Path], *, delete: bool = False) -> list[str]:
    """Apply or delete the resources of `paths`; returns kubectl-style lines (and warnings about those
    resources). Raises ConfigError naming the given files, changing nothing."""
    state = config_dir(demo_dir)
    docs, problems = _documents(paths)
    if problems:
        raise ConfigError(problems)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "config"
        shutil.copytree(state, candidate)
        lines = []
        changed: dict[str, None] = {}  # state file names to write or remove, in order
        for doc in docs:
            target = candidate / doc.file_name
            what = f"{doc.kind.lower()}.{GROUP}/{doc.name}"
            if delete:
                if target.exists():
                    target.unlink()
                    changed[doc.file_name] = None
                    lines.append(f"{what} deleted")
                else:
                    lines.append(f"{what} not found")
                continue
            text = yaml.safe_dump(doc.data, sort_keys=False)
            if target.exists() and target.read_text(encoding="utf-8") == text:
                lines.append(f"{what} unchanged")  # not rewritten: no needless reload in every sidecar
                continue
            lines.append(f"{what} {'configured' if target.exists() else 'created'}")
            target.write_text(text, encoding="utf-8")
            changed[doc.file_name] = None
        origins = {doc.file_name: doc.origin for doc in docs}
        try:
            result = load([candidate])  # raises ConfigError: nothing written to the real state yet
        except ConfigError as exc:
            raise ConfigError([_from_source(p, origins, candidate, state) for p in exc.problems]) from None
        _, compile_warnings = compile_table(result.snapshot)
        for problem in result.warnings + compile_warnings:  # accepted, as Istio does; said, as istioctl does
            if Path(problem.file).name in origins and not delete:
                lines.append(str(_from_source(problem, origins, candidate, state)))
        for name in changed:  # each file replaced atomically; sidecars see whole files only
            src, dst = candidate / name, state / name
            if src.exists():
                tmp_dst = state / f".{name}.tmp"
                shutil.copyfile(src, tmp_dst)
                os.replace(tmp_dst, dst)
            elif dst.exists():
                dst.unlink()
    return lines


def reset(demo_dir: Path, initial: Iterable[Path]) -> None:
    """A fresh state folder holding the initial resources."""
    state = config_dir(demo_dir)
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    change(demo_dir, initial)
