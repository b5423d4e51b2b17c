"""Sizes as people read them (any layer may use it: it imports nothing of skyreg)."""

from __future__ import annotations


def human_size(size: int) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB (one decimal above bytes)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
