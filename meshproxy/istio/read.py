"""Reading config: a file's text (size-guarded) -> its YAML documents, parsed safely.

Safe means: PyYAML's SafeLoader (no object construction), duplicate keys refused
(YAML allows them, Kubernetes does not), and no document may expand past
MAX_YAML_NODES once aliases are resolved (no alias bombs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from .problems import Problem

log = logging.getLogger("meshproxy.config")

MAX_FILE_BYTES = 1 << 20  # a bigger file is refused, not parsed
MAX_YAML_NODES = 200_000  # counted with aliases expanded: no alias bombs


def read_text(path: Path, problems: list[Problem], *, named: bool) -> str | None:
    """A config file's text; None (with a problem, unless it vanished from a listed folder) if unreadable.

    `named`: the path was given by the user, so it must exist; a file listed in a folder and removed
    before we read it means the folder changed under us, and is skipped.
    """
    name = str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(Problem(name, 0, "", f"file is larger than {MAX_FILE_BYTES} bytes"))
            return None
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if not named:
            log.debug("%s disappeared while loading; skipped", name)
            return None
        problems.append(Problem(name, 0, "", f"cannot read: {exc}"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(name, 0, "", f"cannot read: {exc}"))
    return None


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and documents that expand past MAX_YAML_NODES."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    cached = memo.get(id(node))
    if cached is not None:
        return cached
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle counts as too big
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def _duplicate_key(node: yaml.Node) -> str | None:
    stack = [node]
    seen_nodes: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in keys:
                        return f"duplicate key {key.value!r} at line {key.start_mark.line + 1}"
                    keys.add(key.value)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return None


def yaml_documents(text: str, file: str, problems: list[Problem]) -> list[tuple[int, Any]]:
    """Parse a multi-document YAML stream safely; (index, data) for each non-empty document."""
    docs: list[tuple[int, Any]] = []
    loader = _SafeLoader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                if _expanded_size(node, {}) > MAX_YAML_NODES:
                    problems.append(Problem(file, index, "", f"document expands to more than {MAX_YAML_NODES} nodes"))
                elif (dup := _duplicate_key(node)) is not None:
                    problems.append(Problem(file, index, "", dup))
                else:
                    data = loader.construct_document(node)
                    if data is not None:
                        docs.append((index, data))
            index += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(file, index, "", f"invalid YAML{where}: {reason}"))
    except RecursionError:
        problems.append(Problem(file, index, "", "document nests too deeply"))
    finally:
        loader.dispose()
    return docs
