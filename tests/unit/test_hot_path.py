"""The compiled hot path (setup.py, meshproxy/hot_path.py): what runs is what the source says."""

from __future__ import annotations

import os
import runpy
import sys

import pytest

import meshproxy
from meshproxy import hot_path

PURE = os.environ.get("MESHPROXY_PURE_PYTHON") == "1"


@pytest.mark.skipif(PURE, reason="installed with MESHPROXY_PURE_PYTHON=1: the hot path is interpreted on purpose")
def test_every_hot_module_is_compiled_from_the_current_source() -> None:
    """The suite tests what ships: .ci/run installs a C compiler, so an interpreted module here is a build failure."""
    state = hot_path.status()
    assert state.interpreted == ()
    assert state.stale == ()
    assert state.describe() == f"compiled with mypyc ({len(hot_path.MODULES)} modules)"


@pytest.mark.skipif(not PURE, reason="only the interpreted pass (.ci/run) sets MESHPROXY_PURE_PYTHON=1")
def test_the_interpreted_pass_imports_nothing_compiled() -> None:
    """.ci/run's interpreted pass runs a copy of the tree without extensions: a compiled module here would mean
    the pass tests the compiled code again (an installed package ahead of the copy on sys.path, a stray .so)."""
    state = hot_path.status()
    assert state.compiled == ()
    assert state.interpreted == hot_path.MODULES
    assert state.describe().startswith("interpreted")


@pytest.mark.skipif(PURE, reason="nothing is compiled")
def test_a_source_changed_since_the_build_is_reported_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshproxy import _compiled  # type: ignore[attr-defined]

    changed = dict(_compiled.SOURCES, **{"meshproxy.proxy.exchange": "0" * 64})
    monkeypatch.setattr(_compiled, "SOURCES", changed)
    state = hot_path.status()
    assert state.stale == ("meshproxy.proxy.exchange",)
    assert state.describe().endswith("; STALE, its source changed since the build: meshproxy.proxy.exchange")


def test_without_a_build_record_every_compiled_module_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """No meshproxy/_compiled.py (an extension left from another build): nothing compiled can be trusted."""
    monkeypatch.delattr(meshproxy, "_compiled", raising=False)
    monkeypatch.setitem(sys.modules, "meshproxy._compiled", None)  # import fails
    state = hot_path.status()
    assert state.stale == state.compiled


def test_setup_compiles_a_source_file_for_every_module_hot_path_lists() -> None:
    """A module renamed or moved without its line in hot_path.MODULES fails here, not as a silent build."""
    helpers = runpy.run_path(str(hot_path.PACKAGE_ROOT / "setup.py"), run_name="setup_helpers")
    sources = helpers["compiled_sources"]()
    assert tuple(sources) == hot_path.MODULES
    missing = [str(path) for path in sources.values() if not path.is_file()]
    assert missing == []
