"""Unpacking image layers: hostile tarballs, whiteouts, replacement, compression, metadata."""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyreg.machines.unpack import UnpackError, UnpackReport, layer_compression, unpack_layers
from tests.support.layers import (
    DOCKER_GZIP,
    MEDIA,
    OCI_GZIP,
    OCI_TAR,
    OCI_ZSTD,
    Entry,
    dir_,
    file,
    hard,
    opaque,
    special,
    sym,
    whiteout,
    write_layer,
)

ROOT = os.geteuid() == 0


class Box:
    """A rootfs at `<tmp>/box/rootfs`; `box` must hold nothing else after unpacking."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.box = tmp / "box"
        self.rootfs = self.box / "rootfs"
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "target").write_bytes(b"outside")
        self.layers_dir = tmp / "layers"
        self.layers_dir.mkdir()

    def unpack(
        self, *layers: list[Entry], compression: str = "gzip", privileged: bool | None = None
    ) -> UnpackReport:
        paths = []
        for i, entries in enumerate(layers):
            path = write_layer(self.layers_dir / f"{i}.layer", entries, compression)
            paths.append((path, MEDIA[compression]))
        report = unpack_layers(paths, self.rootfs, privileged=privileged)
        self.assert_contained()
        return report

    def assert_contained(self) -> None:
        assert sorted(os.listdir(self.box)) == ["rootfs"]
        assert sorted(os.listdir(self.outside)) == ["target"]
        assert (self.outside / "target").read_bytes() == b"outside"

    def __truediv__(self, name: str) -> Path:
        return self.rootfs / name


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


@pytest.fixture(autouse=True)
def host_passwd_untouched() -> Iterator[None]:
    """Every test: the host's /etc/passwd keeps its bytes, inode, link count and mtime."""
    before = Path("/etc/passwd").read_bytes(), os.stat("/etc/passwd")
    yield
    after = Path("/etc/passwd").read_bytes(), os.stat("/etc/passwd")
    assert after[0] == before[0]
    for attr in ("st_ino", "st_nlink", "st_mtime_ns", "st_mode"):
        assert getattr(after[1], attr) == getattr(before[1], attr)


def rejected(report: UnpackReport) -> set[str]:
    return {r.name for r in report.rejected}


# -- hostile names and links -----------------------------------------------------------------


def test_dotdot_escapes_are_rejected(box: Box) -> None:
    report = box.unpack([file("../escape", b"x"), file("a/../../escape2", b"x"), file("ok", b"1")])
    assert rejected(report) == {"../escape", "a/../../escape2"}
    assert report.rejected_count == 2
    assert (box / "ok").read_bytes() == b"1"
    assert not (box.tmp / "escape").exists()
    assert not (box.tmp / "escape2").exists()


def test_absolute_names_land_inside_the_root(box: Box) -> None:
    report = box.unpack([file("/etc/abs", b"inside"), file("./b/../c", b"c")])
    assert (box / "etc/abs").read_bytes() == b"inside"
    assert (box / "c").read_bytes() == b"c"
    assert not report.rejected


# The payload equals the host file, so even a broken unpacker could not damage it;
# the autouse fixture detects any write through inode and mtime.
PASSWD = Path("/etc/passwd").read_bytes()


@pytest.mark.parametrize("same_layer", [True, False])
def test_symlink_to_slash_is_resolved_inside_the_root(box: Box, same_layer: bool) -> None:
    layers = [[sym("link", "/"), file("link/etc/passwd", PASSWD)]]
    if not same_layer:
        layers = [[sym("link", "/")], [file("link/etc/passwd", PASSWD)]]
    report = box.unpack(*layers)
    assert os.readlink(box / "link") == "/"
    assert stat.S_ISREG(os.lstat(box / "etc/passwd").st_mode)
    assert (box / "etc/passwd").read_bytes() == PASSWD
    assert not report.rejected


def test_absolute_symlink_to_a_host_dir_stays_inside(box: Box) -> None:
    report = box.unpack([sym("out", str(box.outside))], [file("out/pwned", b"x")])
    assert os.readlink(box / "out") == str(box.outside)
    inside = box.rootfs / str(box.outside).lstrip("/") / "pwned"
    assert inside.read_bytes() == b"x"
    assert not report.rejected


@pytest.mark.parametrize(
    ("target", "lands"), [("../../..", ""), ("..", ""), ("d/../../x", "x"), ("/../x", "x")]
)
def test_relative_symlink_climbing_above_the_root_stays_at_the_root(
    box: Box, target: str, lands: str
) -> None:
    # As the machine sees it (rootpath.py): `..` at the root is the root.
    report = box.unpack([dir_("d"), sym("a", target)], [file("a/x", b"x"), file("a/y/z", b"z")])
    assert not report.rejected
    assert os.readlink(box / "a") == target
    assert (box.rootfs / lands / "x").read_bytes() == b"x"
    assert (box.rootfs / lands / "y/z").read_bytes() == b"z"


def test_symlink_loops_are_rejected(box: Box) -> None:
    report = box.unpack([sym("l1", "l2"), sym("l2", "l1"), file("l1/x")])
    assert [r.reason for r in report.rejected] == ["too many levels of symbolic links"]


def test_hard_links_outside_the_root_are_rejected(box: Box) -> None:
    report = box.unpack(
        [
            hard("h1", "/etc/passwd"),
            hard("h2", "../../x"),
            hard("h3", str(box.outside / "target")),
        ]
    )
    assert rejected(report) == {"h1", "h2", "h3"}
    assert os.listdir(box.rootfs) == []


def test_hard_links_through_a_symlink_are_rejected(box: Box) -> None:
    report = box.unpack(
        [dir_("d"), file("d/f", b"f"), sym("s", "d"), sym("e", "/etc"), sym("o", str(box.outside))],
        [hard("h1", "s/f"), hard("h2", "e/passwd"), hard("h3", "o/target"), hard("ok", "d/f")],
    )
    assert rejected(report) == {"h1", "h2", "h3"}
    assert os.stat(box / "ok").st_ino == os.stat(box / "d/f").st_ino
    assert os.stat(box.outside / "target").st_nlink == 1


def test_hard_links_in_the_same_and_lower_layers(box: Box) -> None:
    report = box.unpack(
        [file("lower", b"1")],
        [file("a/same", b"2", mode=0o600), hard("a/to-same", "a/same"), hard("to-lower", "lower")],
    )
    assert report.hardlinks == 2
    assert os.stat(box / "a/to-same").st_ino == os.stat(box / "a/same").st_ino
    assert os.stat(box / "to-lower").st_ino == os.stat(box / "lower").st_ino
    assert (box / "to-lower").read_bytes() == b"1"


def test_hard_link_to_a_directory_or_missing_target_is_rejected(box: Box) -> None:
    report = box.unpack([dir_("d"), hard("h1", "d"), hard("h2", "missing")])
    assert rejected(report) == {"h1", "h2"}


def test_files_replace_symlinks_instead_of_writing_through(box: Box) -> None:
    target = str(box.outside / "target")
    report = box.unpack(
        [sym("f", target), sym("pw", "/etc/passwd"), sym("d", str(box.outside))],
        [file("f", b"new"), file("pw", PASSWD), dir_("d"), file("d/target", b"mine")],
    )
    assert not report.rejected
    for name in ("f", "pw", "d/target"):
        assert stat.S_ISREG(os.lstat(box / name).st_mode)
    assert (box / "f").read_bytes() == b"new"
    assert (box / "d/target").read_bytes() == b"mine"


# -- whiteouts ----------------------------------------------------------------------------


def test_whiteouts_delete_lower_files_and_directories(box: Box) -> None:
    lower = [dir_("a"), file("a/f"), file("a/g"), dir_("d/sub"), file("d/sub/x"), sym("s", "/")]
    upper = [whiteout("a/f"), whiteout("d"), whiteout("s"), whiteout("never-existed")]
    report = box.unpack(lower, upper)
    assert sorted(os.listdir(box.rootfs)) == ["a"]
    assert os.listdir(box / "a") == ["g"]
    assert report.whiteouts == 4


def test_whiteout_does_not_hide_entries_of_its_own_layer(box: Box) -> None:
    box.unpack([file("x", b"old")], [file("x", b"new"), whiteout("x")])
    assert (box / "x").read_bytes() == b"new"


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_opaque_directory_hides_lower_contents_only(box: Box, position: str) -> None:
    lower = [dir_("o"), file("o/old"), file("o/both", b"old"), dir_("o/sub"), file("o/sub/x")]
    lower += [file("other", b"kept")]
    upper = [dir_("o"), file("o/new", b"n"), file("o/both", b"new"), dir_("o/sub"), file("o/sub/y")]
    index = {"first": 0, "middle": 3, "last": len(upper)}[position]
    upper.insert(index, opaque("o"))
    report = box.unpack(lower, upper)
    assert sorted(os.listdir(box / "o")) == ["both", "new", "sub"]
    assert os.listdir(box / "o/sub") == ["y"]
    assert (box / "o/both").read_bytes() == b"new"
    assert (box / "other").read_bytes() == b"kept"
    assert not (box / "o/.wh..wh..opq").exists()
    assert report.opaque_dirs == 1


# -- replacement ------------------------------------------------------------------------------


def test_entries_replace_entries_of_another_type(box: Box) -> None:
    lower = [dir_("p"), file("p/child"), file("q"), file("r"), sym("s", "/"), dir_("t/u")]
    upper = [file("p", b"file"), dir_("q"), file("q/c"), sym("r", "q"), dir_("s"), file("s/x")]
    upper += [dir_("t"), sym("t/u", "..")]
    report = box.unpack(lower, upper)
    assert (box / "p").read_bytes() == b"file"
    assert stat.S_ISDIR(os.lstat(box / "q").st_mode) and os.listdir(box / "q") == ["c"]
    assert os.readlink(box / "r") == "q"
    assert stat.S_ISDIR(os.lstat(box / "s").st_mode) and os.listdir(box / "s") == ["x"]
    assert os.readlink(box / "t/u") == ".."
    assert not (box / "x").exists()
    assert not report.rejected


def test_a_file_in_the_way_of_a_parent_rejects_the_entry(box: Box) -> None:
    report = box.unpack([file("f", b"1")], [file("f/child")])
    assert rejected(report) == {"f/child"}
    assert (box / "f").read_bytes() == b"1"


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
def test_compressions(box: Box, compression: str) -> None:
    report = box.unpack([file("a/b", b"x" * 300_000)], compression=compression)
    assert (box / "a/b").read_bytes() == b"x" * 300_000
    assert (report.files, report.layers) == (1, 1)


@pytest.mark.parametrize(
    ("compression", "media_type"),
    [
        ("gzip", DOCKER_GZIP),
        ("gzip", "application/octet-stream"),
        ("zstd", "application/octet-stream"),
        ("gzip", OCI_TAR),
        ("zstd", ""),
        ("tar", "application/vnd.docker.image.rootfs.diff.tar"),
    ],
)
def test_media_types_and_magic_bytes(tmp_path: Path, compression: str, media_type: str) -> None:
    path = write_layer(tmp_path / "layer", [file("f", b"data")], compression)
    assert layer_compression(media_type, path.read_bytes()[:4]) == compression
    unpack_layers([(path, media_type)], tmp_path / "rootfs")
    assert (tmp_path / "rootfs/f").read_bytes() == b"data"


def test_corrupt_layers_and_busy_rootfs_raise(tmp_path: Path) -> None:
    good = write_layer(tmp_path / "good", [file("f", b"data" * 1000)])
    bad = tmp_path / "bad"
    bad.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(UnpackError):
        unpack_layers([(bad, OCI_GZIP)], tmp_path / "r1")
    with pytest.raises(UnpackError):
        unpack_layers([(good, OCI_ZSTD)], tmp_path / "r2")
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3/x").touch()
    with pytest.raises(UnpackError, match="not empty"):
        unpack_layers([(good, OCI_GZIP)], tmp_path / "r3")


def test_device_nodes_and_fifos_are_skipped(box: Box) -> None:
    report = box.unpack(
        [
            special("dev/null", tarfile.CHRTYPE),
            special("dev/sda", tarfile.BLKTYPE),
            special("fifo", tarfile.FIFOTYPE),
            file("f"),
        ]
    )
    assert report.skipped_special == 3
    assert sorted(os.listdir(box.rootfs)) == ["f"]


# -- metadata ---------------------------------------------------------------------------------


def test_modes_and_mtimes_are_preserved(box: Box) -> None:
    report = box.unpack(
        [dir_("ro", mode=0o555, mtime=1_500_000_000), file("ro/x", b"1", mode=0o640)],
        [file("ro/late", b"2", mode=0o700, mtime=1_400_000_000), dir_("sticky", mode=0o1777)],
    )
    assert stat.S_IMODE(os.stat(box / "ro").st_mode) == 0o555
    assert os.stat(box / "ro").st_mtime == 1_500_000_000
    assert stat.S_IMODE(os.stat(box / "ro/x").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(box / "ro/late").st_mode) == 0o700
    assert os.stat(box / "ro/late").st_mtime == 1_400_000_000
    assert stat.S_IMODE(os.stat(box / "sticky").st_mode) == 0o1777
    assert report.dirs == 2


@pytest.mark.parametrize("privileged", [True, False])
def test_setuid_bits_only_when_privileged(box: Box, privileged: bool) -> None:
    if privileged and not ROOT:
        pytest.skip("needs root")
    box.unpack(
        [file("suid", b"x", mode=0o4755, uid=1234, gid=4321), dir_("sgid", mode=0o2775)],
        privileged=privileged,
    )
    want_file, want_dir = (0o4755, 0o2775) if privileged else (0o755, 0o775)
    assert stat.S_IMODE(os.stat(box / "suid").st_mode) == want_file
    assert stat.S_IMODE(os.stat(box / "sgid").st_mode) == want_dir
    if privileged:
        assert (os.stat(box / "suid").st_uid, os.stat(box / "suid").st_gid) == (1234, 4321)


# -- property: layer ordering -----------------------------------------------------------------

DIRS = ("a", "b")
LEAVES = ("a/x", "a/y", "b/z", "c")
LINK_TARGETS = ("/", "../..", "a", "/etc/passwd", "nowhere")

Node = tuple[str, str]  # (kind, content or symlink target); kind: file | dir | symlink
Model = dict[str, Node]

dir_ops = st.sampled_from(["none", "dir", "file", "whiteout", "opaque"])
leaf_ops = st.one_of(
    st.sampled_from(["none", "whiteout"]),
    st.sampled_from("0123").map(lambda c: f"file:{c}"),
    st.sampled_from(LINK_TARGETS).map(lambda t: f"symlink:{t}"),
)
layer_ops = st.fixed_dictionaries({**{d: dir_ops for d in DIRS}, **{p: leaf_ops for p in LEAVES}})


def _normalise(ops: dict[str, str]) -> dict[str, str]:
    """Make a layer coherent, like a real diff: created leaves have directory parents.

    The result is ordered parents first (directories, then leaves), as tar writers do.
    """
    ops = {path: ops[path] for path in DIRS + LEAVES}
    for leaf in LEAVES:
        parent = leaf.rpartition("/")[0]
        if parent and ops[parent] in ("file", "whiteout"):
            ops[leaf] = "none"
        elif parent and ops[leaf] not in ("none", "whiteout") and ops[parent] == "none":
            ops[parent] = "dir"
    return ops


def _drop(model: Model, path: str) -> None:
    for key in [k for k in model if k == path or k.startswith(path + "/")]:
        del model[key]


def _apply_model(model: Model, ops: dict[str, str]) -> None:
    for path, op in ops.items():
        if op == "whiteout":
            _drop(model, path)
        elif op == "opaque" and model.get(path, ("",))[0] == "dir":
            _drop(model, path)
            model[path] = ("dir", "")
    for path, op in ops.items():  # DIRS come first: parents before children
        if op in ("dir", "opaque"):
            if model.get(path, ("",))[0] != "dir":
                _drop(model, path)
            model[path] = ("dir", "")
        elif op == "file" or op.startswith(("file:", "symlink:")):
            kind, _, value = op.partition(":")
            _drop(model, path)
            model[path] = (kind, value)


def _entries(ops: dict[str, str], marker_slots: list[int]) -> list[Entry]:
    entries: list[Entry] = []
    markers: list[Entry] = []
    for path, op in ops.items():
        if op in ("dir", "opaque"):
            entries.append(dir_(path))
        if op == "opaque":
            markers.append(opaque(path))
        elif op == "whiteout":
            markers.append(whiteout(path))
        elif op == "file" or op.startswith("file:"):
            entries.append(file(path, op.partition(":")[2].encode()))
        elif op.startswith("symlink:"):
            entries.append(sym(path, op.partition(":")[2]))
    for i, marker in enumerate(markers):
        slot = marker_slots[i] if i < len(marker_slots) else len(entries)
        entries.insert(slot % (len(entries) + 1), marker)
    return entries


def _observe(rootfs: Path) -> Model:
    seen: Model = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(rootfs))
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                seen[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(mode):
                seen[rel] = ("dir", "")
            else:
                seen[rel] = ("file", full.read_bytes().decode())
    return seen


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(st.tuples(layer_ops, st.lists(st.integers(0, 20), max_size=6)), max_size=5))
def test_layer_sequences_match_a_simple_model(
    layers: list[tuple[dict[str, str], list[int]]],
) -> None:
    model: Model = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (raw_ops, slots) in enumerate(layers):
            ops = _normalise(raw_ops)
            _apply_model(model, ops)
            path = write_layer(Path(tmp, f"{i}.tar"), _entries(ops, slots), "tar")
            paths.append((path, OCI_TAR))
        report = unpack_layers(paths, Path(tmp, "rootfs"))
        assert not report.rejected
        assert _observe(Path(tmp, "rootfs")) == model
