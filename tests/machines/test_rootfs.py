"""A machine's own rootfs over the shared image tree (`skyreg.machines.rootfs`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyreg.machines.rootfs import fresh_rootfs, release_rootfs


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "image"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("image\n")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (tree / "bin" / "tool").chmod(0o755)
    (tree / "bin" / "link").symlink_to("tool")
    tree.chmod(0o755)
    return tree


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "machine"
    try:
        yield home
    finally:
        release_rootfs(home)  # never leave a mount behind, pass or fail


def _snapshot(tree: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            content: bytes | str | None = None
            if p.is_symlink():
                content = os.readlink(p)
            elif p.is_file():
                content = p.read_bytes()
            out[str(p.relative_to(tree))] = (st.st_mode, content)
    return out


def test_machine_writes_never_reach_the_shared_image_tree(image_tree: Path, home: Path) -> None:
    before = _snapshot(image_tree)
    rootfs, method = fresh_rootfs(image_tree, home)
    assert rootfs == home / "rootfs"
    assert method in ("overlay", "reflink", "copy")
    assert (rootfs / "etc" / "hostname").read_text() == "image\n"
    assert os.readlink(rootfs / "bin" / "link") == "tool"
    assert (rootfs / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    (rootfs / "etc" / "hostname").write_text("changed\n")
    (rootfs / "bin" / "tool").unlink()
    (rootfs / "new").write_text("new\n")
    assert _snapshot(image_tree) == before


def test_every_start_gets_a_fresh_rootfs(image_tree: Path, home: Path) -> None:
    rootfs, _ = fresh_rootfs(image_tree, home)
    (rootfs / "written").write_text("first run\n")
    (rootfs / "etc" / "hostname").write_text("changed\n")
    again, _ = fresh_rootfs(image_tree, home)
    assert again == rootfs
    assert not (again / "written").exists()
    assert (again / "etc" / "hostname").read_text() == "image\n"


def test_release_unmounts_and_removes_everything(image_tree: Path, home: Path) -> None:
    rootfs, _ = fresh_rootfs(image_tree, home)
    (rootfs / "x").write_text("x")
    release_rootfs(home)
    assert not os.path.ismount(rootfs)
    assert sorted(p.name for p in home.iterdir()) == []
    release_rootfs(home)  # twice is fine
    assert (image_tree / "etc" / "hostname").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")
def test_root_gets_an_overlay_owned_like_the_image_root(image_tree: Path, home: Path) -> None:
    image_tree.chmod(0o750)
    rootfs, method = fresh_rootfs(image_tree, home)
    assert method == "overlay"
    assert os.path.ismount(rootfs)
    assert rootfs.stat().st_mode & 0o7777 == 0o750
    (rootfs / "new").write_text("in the upper layer\n")
    assert (home / "overlay" / "upper" / "new").read_text() == "in the upper layer\n"
    # What the machine writes (setuid files included) is root's alone; so is the mount.
    assert stat.S_IMODE((home / "overlay").stat().st_mode) == 0o700
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    options = next(ln.split()[5] for ln in mounts if ln.split()[4] == str(rootfs))
    assert {"nosuid", "nodev"} <= set(options.split(","))
