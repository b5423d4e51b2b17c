"""Timestamps as the APIs write them."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z` suffix, e.g. `2026-11-23T12:00:00.123456Z`."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
