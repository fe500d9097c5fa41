"""Lifecycle of a running process: the one reload entry point and the signals.

Every config change goes through `ConfigReloader.reload`, whatever asked for it: the file watch (polling),
SIGHUP, or the admin's POST /reload. It loads, validates and compiles (the loader `app.py` gives it), then swaps
the running table whole; a bad snapshot leaves the running table in place, is logged with its place
(file:document: field path) and counted in `meshproxy_config_reloads_total{result="rejected"}`.

This lives here, not in `istio/watch.py`: `istio/` is control-plane input without asyncio, and a reload
compiles (`routing/`), which `istio/` does not import. `istio/watch.py` keeps the pure part: what changed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .istio.model import Snapshot
from .istio.problems import ConfigError, Problem
from .istio.watch import config_signature
from .routing.table import RouteTable

log = logging.getLogger("meshproxy")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Loaded = tuple[RouteTable, Snapshot, list[Problem]]


@dataclass(slots=True)
class ConfigState:
    """The running configuration; `table` is replaced whole on reload, never edited."""

    table: RouteTable
    snapshot: Snapshot
    warnings: list[Problem]
    version: int = 1
    loaded_at: float = field(default_factory=time.time)
    reloads_accepted: int = 0
    reloads_rejected: int = 0
    last_error: str = ""


class ConfigReloader:
    """Owns the running ConfigState; `reload` is the only way it changes."""

    def __init__(self, paths: Sequence[str], load: Callable[[], Loaded],
                 on_swap: Callable[[RouteTable], None] = lambda table: None) -> None:
        self.paths = paths
        self.load = load
        self.on_swap = on_swap  # gives the new table to whatever follows the config (the outbound listener)
        table, snapshot, warnings = load()  # raises ConfigError: a process does not start on a bad config
        _log_warnings(warnings)
        self.state = ConfigState(table, snapshot, warnings)
        self.signature = config_signature(paths)

    def reload(self, reason: str) -> bool:
        """Load the config again and swap it in; a bad one changes nothing and says why."""
        state = self.state
        try:
            table, snapshot, warnings = self.load()
        except ConfigError as exc:
            state.reloads_rejected += 1
            errors = [p for p in exc.problems if p.severity == "error"]
            state.last_error = "\n".join(str(p) for p in errors)
            log.error("config rejected (%s), keeping version %d: %s", reason, state.version,
                      "; ".join(str(p) for p in errors))
            return False
        _log_warnings(warnings)
        self.state = ConfigState(table, snapshot, warnings, state.version + 1, time.time(),
                                 state.reloads_accepted + 1, state.reloads_rejected)
        self.on_swap(table)  # requests that already matched keep their route; new ones see this table
        log.info("config version %d loaded (%s)", self.state.version, reason)
        return True

    def reload_if_changed(self) -> bool | None:
        """One poll: reload when a file was added, removed or edited; None when nothing changed."""
        signature = config_signature(self.paths)
        if signature == self.signature:
            return None
        self.signature = signature
        return self.reload("files changed")

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


def _log_warnings(warnings: Sequence[Problem]) -> None:
    for problem in warnings:
        log.warning("%s", problem)


def handle_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[str], None],
                   reload: Callable[[str], object]) -> None:
    """SIGTERM/SIGINT stop (drain), SIGHUP reloads; each handler gets the signal's name as its reason."""
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, signal.Signals(sig).name)
    loop.add_signal_handler(signal.SIGHUP, reload, "SIGHUP")


def ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Once stopping, a repeated SIGTERM/SIGINT (an orchestrator's second signal) must not kill the process on its
    way out: the loop would restore the default action when it closes."""
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
