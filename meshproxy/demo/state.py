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
from pathlib import Path
from typing import Any

import yaml

from ..istio.load import GROUP, config_files, load, yaml_documents
from ..istio.problems import ConfigError, Problem
from ..routing.compile import compile_table

DEFAULT_DEMO_DIR = Path(os.environ.get("MESHPROXY_DEMO_DIR", Path(tempfile.gettempdir()) / "meshproxy-demo"))


def config_dir(demo_dir: Path) -> Path:
    return demo_dir / "config"


def _file_name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc['kind'].lower()}.{meta.get('namespace', 'default')}.{meta.get('name')}.yaml"


def _documents(paths: Iterable[Path]) -> tuple[list[tuple[str, dict[str, Any]]], list[Problem]]:
    """(file name in the state folder, document) for every Istio networking document of the files."""
    problems: list[Problem] = []
    docs = []
    for path in config_files(paths):
        for _, data in yaml_documents(path.read_text(encoding="utf-8"), str(path), problems):
            if isinstance(data, dict) and str(data.get("apiVersion", "")).startswith(GROUP + "/"):
                docs.append((_file_name(data), data))
    return docs, problems


def change(demo_dir: Path, paths: Iterable[Path], *, delete: bool = False) -> list[str]:
    """Apply or delete the resources of `paths`; returns kubectl-style lines. Raises ConfigError, changing nothing."""
    state = config_dir(demo_dir)
    docs, problems = _documents(paths)
    if problems:
        raise ConfigError(problems)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "config"
        shutil.copytree(state, candidate)
        lines = []
        for name, data in docs:
            target = candidate / name
            what = f"{data['kind'].lower()}.{GROUP}/{data['metadata']['name']}"
            if delete:
                if target.exists():
                    target.unlink()
                    lines.append(f"{what} deleted")
                else:
                    lines.append(f"{what} not found")
            else:
                existed = target.exists()
                target.write_text(yaml.safe_dump(data, sort_keys=False))
                lines.append(f"{what} {'configured' if existed else 'created'}")
        result = load([candidate])  # raises ConfigError: nothing written to the real state yet
        compile_table(result.snapshot)
        for name, _ in docs:  # each file replaced atomically; sidecars see whole files only
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
