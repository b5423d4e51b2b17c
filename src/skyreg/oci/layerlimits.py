"""What unpacking one image's layers may cost: the bounds the unpacker (`machines/unpack.py`)
and the lazily mounted tree (`lazy/tree.py`) both apply, so both refuse the same images."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """Bounds on what unpacking one image may cost; the defaults admit a real 10 GB image."""

    layer_bytes: int = 16 << 30  # decompressed tar bytes of one layer
    image_bytes: int = 32 << 30  # ... of all layers together
    entries: int = 1_000_000  # tar entries in one layer
    header_bytes: int = 1 << 20  # the extended headers (PAX, GNU long name/link) of one entry
    path_bytes: int = 4096  # an entry's name or link target, in bytes (UTF-8)
    path_depth: int = 256  # components of an entry's name or hard link target, also resolved

    @property
    def path_nodes(self) -> int:
        """Path components the unpacker tracks at once (implicit parent directories count)."""
        return 4 * self.entries
