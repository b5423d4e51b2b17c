"""Fixtures of the fault suite."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL_DISK_BYTES = 16 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted at `tmp_path/data` (the registry's data dir), unmounted afterwards.

    The data dir is the mount point itself so that the server's log and port file, which
    RunningRegistry keeps beside the data dir, never land on the full disk.
    """
    mountpoint = tmp_path / "data"
    mountpoint.mkdir()
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={SMALL_DISK_BYTES},mode=0700",
            "tmpfs",
            str(mountpoint),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
