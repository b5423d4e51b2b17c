"""Sizes as people write them: `1073741824`, `500MB`, `1.5GiB`, `20 gb` (quotas)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MAX_SIZE = 2**63 - 1  # what a BigInteger column holds on every database

UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+) *([a-z]*)\Z")  # ASCII digits only
SIZE_HELP = "bytes, or a number with a unit: B, kB, MB, GB, TB (1000s), KiB, MiB, GiB, TiB (1024s)"


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from an integer, or a string of a number (decimals allowed) and an optional unit
    (case-insensitive); rounded down to whole bytes. ValueError, naming `what`, for anything
    else, for a negative size, or above 2^63-1 bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be {SIZE_HELP}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            raise ValueError(f"{what} cannot be negative")
        found = _SIZE_RE.match(text) if len(text) <= 64 else None
        if found is None or found.group(2) not in ("", *UNITS):
            raise ValueError(f"invalid {what} {value[:40]!r}: {SIZE_HELP}")
        try:
            number = Decimal(found.group(1))
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
            raise ValueError(f"invalid {what} {value[:40]!r}: {SIZE_HELP}") from None
        size = int(number * UNITS[found.group(2) or "b"])
    else:
        raise ValueError(f"{what} must be {SIZE_HELP}")
    if size < 0:
        raise ValueError(f"{what} cannot be negative")
    if size > MAX_SIZE:
        raise ValueError(f"{what} must be at most {MAX_SIZE} bytes (8 EiB)")
    return size
