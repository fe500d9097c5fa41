"""Notice config file changes by polling: works for plain files and Kubernetes' ConfigMap symlink swaps.

Pure (no asyncio): lifecycle.ConfigReloader polls it and reloads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .load import config_files


def config_signature(paths: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """What changes when any config file is added, removed, replaced or edited."""
    out = []
    for path in config_files(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
    for given in paths:  # a folder whose listing changed
        try:
            out.append((given, os.stat(given).st_mtime_ns, -1))
        except OSError:
            out.append((given, 0, -2))
    return tuple(out)
