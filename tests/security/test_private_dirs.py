"""Data dirs are made private, but a shared directory is never taken over.

SECURITY.md: "Everything under the registry's data dir is 0700/0600 whatever the umask".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyreg.privatefs import private_dir


def test_a_new_data_dir_and_its_missing_parents_are_private_whatever_the_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        made = private_dir(tmp_path / "a" / "b" / "data")
    finally:
        os.umask(old)
    for d in (made, made.parent, made.parent.parent):
        assert d.stat().st_mode & 0o777 == 0o700, d


def test_a_shared_sticky_directory_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ValueError, match="shared directory"):
        private_dir(shared)
    assert shared.stat().st_mode & 0o7777 == 0o1777


def test_serve_refuses_a_shared_data_dir_with_a_clear_error(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    done = subprocess.run(
        [sys.executable, "-m", "skyreg", "serve", "--port", "0", "--data-dir", str(shared)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "shared directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777
