"""lifecycle.ConfigReloader: the one reload entry point (file watch, SIGHUP and POST /reload all call it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from meshproxy.istio.problems import ConfigError, Problem
from meshproxy.lifecycle import ConfigReloader

BAD = ConfigError([Problem("vs.yaml", 0, "spec.htp", "unknown field 'htp'"),
                   Problem("vs.yaml", 1, "spec.hosts", "a hint", severity="warning")])


class Loader:
    """Hands out tables "t1", "t2"... or raises what it is told to; the reloader only passes them on."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: ConfigError | None = None

    def __call__(self) -> tuple[Any, Any, list[Problem]]:
        if self.error is not None:
            raise self.error
        self.calls += 1
        return f"t{self.calls}", f"snapshot{self.calls}", []


def test_a_good_reload_swaps_the_table_and_counts_it() -> None:
    loader = Loader()
    swapped: list[Any] = []
    reloader = ConfigReloader([], loader, swapped.append)
    assert (reloader.state.table, reloader.state.version, swapped) == ("t1", 1, [])
    assert reloader.reload("SIGHUP") is True
    state = reloader.state
    assert (state.table, state.snapshot, state.version, state.reloads_accepted, state.reloads_rejected) == \
        ("t2", "snapshot2", 2, 1, 0)
    assert swapped == ["t2"]


def test_a_bad_snapshot_leaves_the_running_table_and_is_logged_with_its_place(
        caplog: pytest.LogCaptureFixture) -> None:
    loader = Loader()
    swapped: list[Any] = []
    reloader = ConfigReloader([], loader, swapped.append)
    loader.error = BAD
    with caplog.at_level(logging.ERROR, logger="meshproxy"):
        assert reloader.reload("admin request") is False
    state = reloader.state
    assert (state.table, state.version, state.reloads_accepted, state.reloads_rejected) == ("t1", 1, 0, 1)
    assert state.last_error == "vs.yaml:0: spec.htp: unknown field 'htp'"  # errors only, with their place
    assert swapped == []
    assert "config rejected (admin request), keeping version 1: vs.yaml:0: spec.htp: unknown field 'htp'" \
        in caplog.text
    loader.error = None
    assert reloader.reload("files changed") is True
    assert (reloader.state.version, reloader.state.reloads_accepted, reloader.state.reloads_rejected) == (2, 1, 1)


def test_the_first_load_must_be_good() -> None:
    loader = Loader()
    loader.error = BAD
    with pytest.raises(ConfigError):
        ConfigReloader([], loader)


def test_a_poll_reloads_only_when_a_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "vs.yaml"
    path.write_text("a")
    loader = Loader()
    reloader = ConfigReloader([str(tmp_path)], loader)
    assert reloader.reload_if_changed() is None
    assert loader.calls == 1
    path.write_text("bb")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert reloader.reload_if_changed() is True
    assert reloader.reload_if_changed() is None
    assert (loader.calls, reloader.state.version) == (2, 2)


def test_a_configmap_data_swap_is_a_change_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    """The kubelet's `..data` swap points `x.yaml -> ..data/x.yaml` at another file; one with the same size and
    modification time (a coarse clock, a copied file) is still seen, by its inode; `..*` entries are not config."""
    from meshproxy.istio.watch import config_signature

    for stamp in ("..2026_12_06_11_00_01.1", "..2026_12_06_11_00_02.2"):
        (tmp_path / stamp).mkdir()
        (tmp_path / stamp / "vs.yaml").write_text(f"# {stamp[-1]}\n")
        os.utime(tmp_path / stamp / "vs.yaml", ns=(1_000_000_000, 1_000_000_000))
    os.symlink("..2026_12_06_11_00_01.1", tmp_path / "..data")
    os.symlink("..data/vs.yaml", tmp_path / "vs.yaml")
    before = config_signature([str(tmp_path)])
    assert [entry[0] for entry in before] == [str(tmp_path / "vs.yaml"), str(tmp_path)]  # read once, by its link
    os.symlink("..2026_12_06_11_00_02.2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    after = config_signature([str(tmp_path)])
    assert after[0] != before[0]  # the file's own entry differs (same size, same time: another inode)
