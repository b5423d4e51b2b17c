"""A path inside a rootfs never leads outside it: one resolver (`machines/rootpath.py`) for
unpacking layers and for running machines, with the rule the machine itself sees (a chroot).

Every test builds a hostile tree in `tmp_path/rootfs` beside a sentinel directory
`tmp_path/outside` (a passwd-format `secret` naming the user `outsider`, and a subdirectory).
inotify watches the sentinel and `tmp_path` before the code under test runs: the kernel queues an
event for every open, read, write, create or delete in them as the call happens, so "no event"
means nothing outside the rootfs was opened, read or created (no timing involved). The tree of the
sentinel is also compared before and after.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from skyreg.machines import rootpath
from skyreg.machines.rootpath import (
    BadName,
    NotADirectory,
    PathNotFound,
    PathTooDeep,
    RootPathError,
    SymlinkLoop,
    SymlinkNotAllowed,
)
from skyreg.machines.runtime import ImageConfig, MachineError, resolve_user, start_machine
from skyreg.machines.unpack import UnpackReport, unpack_layers
from tests.support.sentinel import Sentinel

INSIDE_PASSWD = b"inside:x:7:8::/:/bin/sh\n"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"

# --------------------------------------------------------------------------- the sentinel


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    s = Sentinel(tmp_path)
    s.watch()
    try:
        yield s
    finally:
        s.close()


def build(rootfs: Path, tree: list[tuple[str, str, str]]) -> None:
    """Make `tree` inside `rootfs`: ("d", path, "") dirs, ("f", path, text), ("l", path, target)."""
    for kind, name, arg in tree:
        path = rootfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "d":
            path.mkdir(exist_ok=True)
        elif kind == "f":
            path.write_text(arg)
        else:
            path.symlink_to(arg)


# --------------------------------------------------------------------------- the resolver

DEEP = "/".join(["a"] * 200)


@dataclass(frozen=True)
class Case:
    """A hostile tree, a path resolved in it, options, and the outcome: the physical parent
    and last name, or the error."""

    id: str
    tree: list[tuple[str, str, str]]
    path: str
    options: dict[str, bool]
    parts: tuple[str, ...] = ()
    name: str | None = None
    error: type[RootPathError] | None = None


DECOY = [("d", "outside", ""), ("f", "outside/secret", "decoy")]
CASES = [
    Case("dotdot-chain-stays-at-root", DECOY, "../../../outside/secret", {},
         ("outside",), "secret"),
    Case("dotdot-above-root-then-create", [], "../../outside/new", {"create_dirs": True},
         ("outside",), "new"),
    Case("relative-symlink-out", [*DECOY, ("l", "l", "../../../outside")], "l/secret", {},
         ("outside",), "secret"),
    Case("relative-symlink-to-parent-of-root", [*DECOY, ("l", "l", "..")], "l/outside/secret",
         {}, ("outside",), "secret"),
    Case("absolute-symlink-to-slash", [("d", "etc", ""), ("l", "l", "/")], "l/l/etc/x", {},
         ("etc",), "x"),
    Case("absolute-symlink-out-is-created-inside", [("l", "l", "@OUTSIDE")], "l/dir/x",
         {"create_dirs": True}, ("@OUTSIDE", "dir"), "x"),
    Case("last-symlink-followed-stays-inside",
         [*DECOY, ("d", "etc", ""), ("l", "etc/passwd", "../../../../outside/secret")],
         "/etc/passwd", {"follow_last": True}, ("outside",), "secret"),
    Case("last-symlink-not-followed", [("d", "etc", ""), ("l", "etc/passwd", "/")],
         "/etc/passwd", {"follow_last": False}, ("etc",), "passwd"),
    Case("last-symlink-to-missing-target", [("l", "p", "../../outside/secret")], "p",
         {"follow_last": True}, error=PathNotFound),
    Case("symlink-loop", [("l", "l1", "l2"), ("l", "l2", "l1")], "l1/x", {}, error=SymlinkLoop),
    Case("self-loop-last", [("l", "s", "s")], "s", {"follow_last": True}, error=SymlinkLoop),
    Case("growing-loop", [("l", "g", "g/g")], "g/x", {"create_dirs": True}, error=SymlinkLoop),
    Case("symlink-to-file-as-dir", [("f", "f", "x"), ("l", "l", "f")], "l/x", {},
         error=NotADirectory),
    Case("symlink-to-file-as-dir-create", [("f", "f", "x"), ("l", "l", "f")], "l/x/y",
         {"create_dirs": True}, error=NotADirectory),
    Case("symlink-to-outside-file-as-dir", [("l", "l", "@OUTSIDE/secret")], "l/x", {},
         error=PathNotFound),
    Case("missing-parent", [], "nope/x", {}, error=PathNotFound),
    Case("too-deep", [], "a/" * 300 + "f", {"create_dirs": True}, error=PathTooDeep),
    Case("too-deep-through-symlink", [("d", DEEP, ""), ("l", "x", DEEP)], "x/" + "b/" * 60 + "f",
         {"create_dirs": True}, error=PathTooDeep),
    Case("nul-in-name", [], "etc/pa\0sswd", {}, error=BadName),
    Case("name-too-long", [], "x" * 256, {"create_dirs": True}, error=BadName),
    Case("path-too-long", [], "a/" * 2100, {"create_dirs": True}, error=BadName),
    Case("no-symlinks-allowed", [("d", "d", ""), ("l", "l", "d")], "l/x",
         {"follow_symlinks": False}, error=SymlinkNotAllowed),
]  # fmt: skip


def _outside_parts(sentinel: Sentinel, parts: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for p in parts:
        out.extend(sentinel.outside.parts[1:] if p == "@OUTSIDE" else [p])
    return tuple(out)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_resolver_never_leaves_the_rootfs(sentinel: Sentinel, case: Case) -> None:
    build(
        sentinel.rootfs,
        [(k, n, a.replace("@OUTSIDE", str(sentinel.outside))) for k, n, a in case.tree],
    )
    sentinel.events()  # building the tree is not under test
    root_fd = rootpath.open_root(sentinel.rootfs)
    try:
        if case.error is not None:
            with pytest.raises(case.error):
                rootpath.resolve(root_fd, case.path, **case.options)
        else:
            with rootpath.resolve(root_fd, case.path, **case.options) as loc:
                parts = _outside_parts(sentinel, case.parts)
                assert (loc.parts, loc.name) == (parts, case.name)
                where = os.stat(sentinel.rootfs.joinpath(*parts), follow_symlinks=False)
                got = os.fstat(loc.dir_fd)
                assert (got.st_dev, got.st_ino) == (where.st_dev, where.st_ino)
    finally:
        os.close(root_fd)
    sentinel.assert_untouched()


@pytest.mark.parametrize(
    ("tree", "path", "create", "parts"),
    [
        ([("l", "up", "../../..")], "up/made", True, ("made",)),
        ([("d", "a", ""), ("l", "a/b", "/")], "a/b/a/b/a", False, ("a",)),
        ([("l", "etc", "../outside")], "etc", True, ("outside",)),
        ([], "..", False, ()),
    ],
)
def test_open_dir_resolves_like_a_chroot(
    sentinel: Sentinel, tree: list[tuple[str, str, str]], path: str, create: bool,
    parts: tuple[str, ...],
) -> None:  # fmt: skip
    build(sentinel.rootfs, tree)
    sentinel.events()
    root_fd = rootpath.open_root(sentinel.rootfs)
    try:
        with rootpath.open_dir(root_fd, path, create=create) as loc:
            assert (loc.parts, loc.name) == (parts, None)
            where = os.stat(sentinel.rootfs.joinpath(*parts))
            assert os.fstat(loc.dir_fd).st_ino == where.st_ino
    finally:
        os.close(root_fd)
    sentinel.assert_untouched()


# --------------------------------------------------------------------------- unpacking


def _tar(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info, data = m if isinstance(m, tuple) else (m, b"")
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, target: str = "", **pax: str
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o755
    info.pax_headers = dict(pax)
    return info


def _unpack(sentinel: Sentinel, *layers: bytes) -> UnpackReport:
    files = []
    for i, raw in enumerate(layers):
        path = sentinel.spare / f"layer{i}.tar"
        path.write_bytes(raw)
        files.append((path, OCI_TAR))
    shutil.rmtree(sentinel.rootfs)
    sentinel.events()  # removing the empty rootfs is not under test
    return unpack_layers(files, sentinel.rootfs)


def test_a_hostile_layer_lands_where_the_machine_would_see_it(sentinel: Sentinel) -> None:
    """A relative symlink climbing above the root is followed like a chroot: `up/x` is `/x`."""
    lower = _tar([
        _member("up", tarfile.SYMTYPE, "../../../.."),
        _member("out", tarfile.SYMTYPE, str(sentinel.outside)),
        _member("rel", tarfile.SYMTYPE, "../outside"),
    ])  # fmt: skip
    upper = _tar([
        (_member("up/x"), b"x"),
        (_member("up/outside/secret"), b"mine"),
        (_member("out/secret"), b"abs"),
        (_member("rel/dir/y"), b"y"),
    ])  # fmt: skip
    report = _unpack(sentinel, lower, upper)
    assert report.rejected == []
    root = sentinel.rootfs
    assert (root / "x").read_bytes() == b"x"
    assert (root / "outside/secret").read_bytes() == b"mine"
    assert (root / "outside/dir/y").read_bytes() == b"y"
    assert root.joinpath(*sentinel.outside.parts[1:], "secret").read_bytes() == b"abs"
    sentinel.assert_untouched()


def test_unusable_names_in_a_layer_reject_the_entry_not_the_layer(sentinel: Sentinel) -> None:
    layer = _tar([
        (_member("placeholder", path="a\0b/x"), b"nul"),
        (_member("x" * 300 + "/f"), b"long"),
        _member("s", tarfile.SYMTYPE, "placeholder", linkpath="t\0u"),
        (_member("f"), b"file"),
        _member("lf", tarfile.SYMTYPE, "f"),
        (_member("lf/under"), b"under"),
        _member("loop", tarfile.SYMTYPE, "loop/loop"),
        (_member("loop/x"), b"loop"),
        (_member("ok"), b"ok"),
    ])  # fmt: skip
    report = _unpack(sentinel, layer)
    assert {r.name for r in report.rejected} == {
        "a\0b/x", "x" * 300 + "/f", "s", "lf/under", "loop/x",
    }  # fmt: skip
    assert sorted(os.listdir(sentinel.rootfs)) == ["f", "lf", "loop", "ok"]
    sentinel.assert_untouched()


# --------------------------------------------------------------------------- running


@pytest.mark.parametrize(
    "tree",
    [
        [("l", "etc/passwd", "../../../outside/secret")],
        [("l", "etc/passwd", "@OUTSIDE/secret")],
        [("l", "etc", "../outside")],
        [("l", "etc", "@OUTSIDE")],
        [("d", "etc", ""), ("l", "etc/passwd", "/proc/self/root@OUTSIDE/secret")],
        [("l", "etc", "/../../../.."), ("l", "passwd", "../../outside/secret")],
    ],
    ids=["relative", "absolute", "dir-relative", "dir-absolute", "proc-root", "root-loop"],
)
def test_resolve_user_never_reads_a_file_outside_the_rootfs(
    sentinel: Sentinel, tree: list[tuple[str, str, str]]
) -> None:
    build(
        sentinel.rootfs, [(k, n, a.replace("@OUTSIDE", str(sentinel.outside))) for k, n, a in tree]
    )
    sentinel.events()
    for user in ("outsider", "outsider:outsider", "root"):  # root: the host's passwd has it
        with pytest.raises(MachineError, match="unknown user"):
            resolve_user(sentinel.rootfs, user)
    assert resolve_user(sentinel.rootfs, "") == (0, 0)
    sentinel.assert_untouched()


def test_resolve_user_follows_an_escaping_symlink_back_inside(sentinel: Sentinel) -> None:
    build(sentinel.rootfs, [
        ("d", "outside", ""),
        ("f", "outside/secret", INSIDE_PASSWD.decode()),
        ("l", "etc", "../../../.."),
        ("l", "passwd", "../../../outside/secret"),
        ("l", "group", "/etc/../../../../outside/secret"),
    ])  # fmt: skip
    sentinel.events()
    assert resolve_user(sentinel.rootfs, "inside") == (7, 8)
    sentinel.assert_untouched()


@pytest.mark.parametrize(
    ("workdir", "message"),
    [("/srv/a\0b", "NUL"), ("/" + "/".join(["d"] * 300), "too deep")],
)
def test_a_hostile_working_dir_is_a_clear_error_before_anything_runs(
    sentinel: Sentinel, workdir: str, message: str
) -> None:
    config = ImageConfig(entrypoint=("/bin/true",), working_dir=workdir)
    try:
        machine = start_machine(
            sentinel.rootfs, config, log_path=sentinel.spare / "log", hostname="m"
        )
    except MachineError as e:
        assert message in str(e)
        assert len(str(e)) < 1000
    else:  # a regression: never leave it running
        machine.stop(grace=0)
        pytest.fail("the machine was started")
    assert not (sentinel.spare / "log").exists()
    # directories are made on the way (inside), never more than the depth limit
    assert not (sentinel.rootfs / "d").joinpath(*["d"] * 256).exists()
    sentinel.assert_untouched()
