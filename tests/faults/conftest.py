"""Fixtures of the fault suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.disks import small_tmpfs

SMALL_DISK_BYTES = 16 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted at `tmp_path/data` (the registry's data dir), unmounted afterwards.

    The data dir is the mount point itself so that the server's log and port file, which
    RunningRegistry keeps beside the data dir, never land on the full disk.
    """
    with small_tmpfs(tmp_path / "data", SMALL_DISK_BYTES) as mountpoint:
        yield mountpoint
