"""The per-request modules, compiled with mypyc at install time when a C compiler is there (see setup.py).

A compiled module is an extension next to its source; Python imports the extension first. After an edit to
the source, the extension still runs the old code until the package is built again (`pip install -e .`), so
the build records each source's hash (meshproxy/_compiled.py, written by setup.py) and `status()` names the
modules whose source changed since.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

MODULES = (  # what setup.py compiles (it runs this file)
    "meshproxy.http1.client",
    "meshproxy.http1.head",
    "meshproxy.http1.server",
    "meshproxy.http1.wire",
    "meshproxy.http2.codec",
    "meshproxy.http2.frames",
    "meshproxy.http2.grpc",
    "meshproxy.http2.head",
    "meshproxy.http2.hpack_codec",
    "meshproxy.messages",
    "meshproxy.proxy.balancer",
    "meshproxy.proxy.downstream",
    "meshproxy.proxy.exchange",
    "meshproxy.proxy.fault",
    "meshproxy.proxy.h2_listener",
    "meshproxy.proxy.h2_upstream",
    "meshproxy.proxy.listener",
    "meshproxy.proxy.retry",
    "meshproxy.proxy.upstream",
    "meshproxy.routing.cluster",
    "meshproxy.routing.cors",
    "meshproxy.routing.match",
    "meshproxy.routing.policy",
    "meshproxy.routing.rewrite",
    "meshproxy.routing.table",
    "meshproxy.routing.traffic",
    "meshproxy.routing.trie",
    "meshproxy.stream_info",
    "meshproxy.telemetry.access_log",
    "meshproxy.telemetry.core",
    "meshproxy.telemetry.metrics",
    "meshproxy.telemetry.propagation",
)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class HotPathStatus:
    compiled: tuple[str, ...]
    interpreted: tuple[str, ...]
    stale: tuple[str, ...]  # compiled from a source that has changed since: the running code is not the source

    def describe(self) -> str:
        if not self.compiled:
            return "interpreted (not compiled: no C compiler at install, or MESHPROXY_PURE_PYTHON=1)"
        if not self.interpreted:
            text = f"compiled with mypyc ({len(self.compiled)} modules)"
        else:
            text = f"{len(self.compiled)} modules compiled with mypyc, interpreted: {', '.join(self.interpreted)}"
        if self.stale:
            text += f"; STALE, its source changed since the build: {', '.join(self.stale)}"
        return text


def status() -> HotPathStatus:
    try:
        from . import _compiled  # type: ignore[attr-defined]  # written by setup.py when it compiles

        built: dict[str, str] = _compiled.SOURCES
    except ImportError:
        built = {}
    compiled, interpreted, stale = [], [], []
    for name in MODULES:
        # The file Python loads the module from, without importing it: a module only some connections use (the
        # HTTP/2 codec) stays out of memory until one does.
        spec = importlib.util.find_spec(name)
        if spec is None or (spec.origin or "").endswith(".py"):
            interpreted.append(name)
            continue
        compiled.append(name)
        source = PACKAGE_ROOT / (name.replace(".", "/") + ".py")
        if source.exists() and built.get(name) != source_hash(source):
            stale.append(name)
    return HotPathStatus(tuple(compiled), tuple(interpreted), tuple(stale))
