"""Directories only their owner can enter, whatever the process umask.

Everything skyreg keeps on a host (blobs, uploads, the database, keys, the agent's cache, unpacked
trees, machine logs) lies below a directory made here, so no other host user can reach it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: Path, *, mode: int = 0o700, parents_mode: int = 0o700) -> Path:
    """Make `path` a directory with exactly `mode` (tightening an existing one); returns it.

    Missing parents are created with `parents_mode` (never world-writable, as `mkdir -p` under
    umask 000 would make them); existing parents are left alone. A shared directory (sticky,
    like /tmp, or /) is refused with ValueError rather than taken over.
    """
    if os.path.lexists(path):
        st = os.stat(path)
        if st.st_mode & stat.S_ISVTX or os.path.realpath(path) == "/":
            # /tmp and the like: shared by design; taking them over would break the host.
            raise ValueError(f"{path} is a shared directory: give skyreg a directory of its own")
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # another process made it: `path` still gets our mode below
            continue
        if d != path:
            os.chmod(d, parents_mode)
    os.chmod(path, mode)
    return path
