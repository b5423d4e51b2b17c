"""Fixtures of the GC suite: a registry with GC on, on each backing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gcload import GcRegistry, gc_registry
from tests.support.servers import BACKINGS


@pytest.fixture(params=BACKINGS)
def gc_reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GcRegistry]:
    """A registry with a 1 s GC review delay and two orgs: one `skyreg serve` on SQLite +
    filesystem, or two nodes on one PostgreSQL and one S3 bucket (SeaweedFS)."""
    with gc_registry(request, tmp_path, request.param) as reg:
        yield reg
