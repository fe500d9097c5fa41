"""Notice config file changes by polling: works for plain files and Kubernetes' ConfigMap symlink swaps.

Pure (no asyncio): lifecycle.ConfigReloader polls it and reloads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .load import config_files


def config_signature(paths: Sequence[str]) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any config file is added, removed, replaced or edited.

    A mounted ConfigMap is a folder of links, `x.yaml -> ..data/x.yaml`, with `..data -> ..2026_12_06_...` swapped
    atomically by the kubelet: the files are stat'ed through the links (the new target is another file, another
    inode, even when its size and modification time equal the old one's), and `..*` entries are never read as config
    files of their own (`config_files` skips hidden entries)."""
    out = []
    for path in config_files(paths):
        try:
            st = os.stat(path)  # follows the links
        except OSError:
            continue
        out.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
    for given in paths:  # a folder whose listing changed
        try:
            st = os.stat(given)
            out.append((given, st.st_ino, st.st_mtime_ns, -1))
        except OSError:
            out.append((given, 0, 0, -2))
    return tuple(out)
