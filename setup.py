"""Build: the per-request modules are compiled to C extensions with mypyc, when a C compiler is there.

mypyc compiles the same typed Python source (nothing is written in C by hand); the compiled hot path
costs about half the instructions per proxied request (benchmarks/README.md). Without a compiler, or with
MESHPROXY_PURE_PYTHON=1, the package installs as plain Python and works the same, slower:
`meshproxy run` logs which one it runs. Project metadata is in pyproject.toml.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
RECORD = ROOT / "meshproxy" / "_compiled.py"  # what was compiled, from which source (meshproxy/hot_path.py)
# meshproxy/hot_path.py needs only the standard library: run as a file, it lends its list and its hash without
# importing the package (whose dependencies may not be installed in the build environment).
HOT_PATH = runpy.run_path(str(ROOT / "meshproxy" / "hot_path.py"))


def compiled_sources() -> dict[str, Path]:
    """Module name -> source file, for every module meshproxy.hot_path.MODULES lists."""
    return {name: ROOT / (name.replace(".", "/") + ".py") for name in HOT_PATH["MODULES"]}


def remove_built() -> None:
    """An interpreted install must not leave an older build's extensions in the tree (an editable install puts them
    there): Python would import those first."""
    RECORD.unlink(missing_ok=True)
    for path in [*(ROOT / "meshproxy").rglob("*.so"), *ROOT.glob("meshproxy__mypyc.*.so")]:  # all made by mypyc
        path.unlink()


class OptionalBuildExt(build_ext):
    """No C compiler (or no Python headers): install the interpreted package instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  # distutils raises several unrelated types for a missing compiler
            print(f"meshproxy: the hot path was not compiled ({exc}); installing it as plain Python",
                  file=sys.stderr)
            remove_built()


def extensions() -> list:
    remove_built()
    if os.environ.get("MESHPROXY_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    sources = compiled_sources()
    hashes = {name: HOT_PATH["source_hash"](path) for name, path in sources.items()}
    flags = ["--ignore-missing-imports", "--follow-imports=silent"]  # only the compiled modules must type-check
    built = mypycify([*flags, *(str(p.relative_to(ROOT)) for p in sources.values())], group_name="meshproxy",
                     opt_level="3")
    RECORD.write_text('"""Written by setup.py: the sources the hot path was compiled from (sha256)."""\n\n'
                      f"SOURCES = {hashes!r}\n")
    return built


if __name__ == "__main__":  # as setuptools runs it; a test imports the helpers above
    setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
