"""The package's import graph: no cycles, and the layers of DESIGN.md (dependencies point downward).

Read from the source with `ast`, every import counted, `if TYPE_CHECKING:` ones too: a type-only import is still a
dependency a reader must follow, and a cycle through one is a design cycle (as ../shared/tools/import_graph.py
counts them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshproxy"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the meshproxy modules it imports (a `from pkg import name` of a submodule counts as that)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")
                    elif target in modules:
                        found.add(target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
        found.discard(name)
        graph[name] = {m for m in found if not name.startswith(m + ".")}  # a package's own __init__ is no edge
    return graph


def test_the_import_graph_has_no_cycles() -> None:
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("meshproxy.telemetry", "meshproxy.proxy"),
    ("meshproxy.routing", "meshproxy.proxy"),
    ("meshproxy.routing", "meshproxy.istio.load"),
    ("meshproxy.http1", "meshproxy.proxy"),
    ("meshproxy.http1", "meshproxy.routing"),
    ("meshproxy.istio", "meshproxy.proxy"),
    ("meshproxy.proxy", "meshproxy.istio"),
])
def test_layers_import_nothing_above_them(layer: str, forbidden: str) -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in imports().items() if module.startswith(layer)
                   for target in targets if target == forbidden or target.startswith(forbidden + "."))
    assert not wrong, wrong
