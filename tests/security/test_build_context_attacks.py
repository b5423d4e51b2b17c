"""`unpack_context` against hand-built hostile build contexts (a tenant writes them): climbing
names, absolute names, writing through a symlink, hard links out, device nodes and FIFOs, gzip
bombs (one huge file, many honest-looking files, a huge extended header), too many entries, too
long or too deep names. Each is refused with `ContextError` naming the entry, and nothing
appears or changes outside dest (a sentinel directory beside it is checked, and the whole
temporary directory is compared before and after).

Bombs are written as streams: the tar header, then the same gzip member of zeros repeated
(concatenated gzip members are one stream), so gigabytes are described by a few MiB and
nothing large is held in memory."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from skyreg.client.buildcontext import ContextError, ContextLimits, unpack_context

MiB = 1 << 20
SMALL = ContextLimits(max_bytes=10 * MiB)


@dataclass
class Scene:
    root: Path
    dest: Path
    sentinel: Path
    tar: Path

    def snapshot(self) -> dict[str, tuple[int, int, bytes | str | None]]:
        """Every path under root except dest's tree: kind, mode and content (or link target)."""
        found: dict[str, tuple[int, int, bytes | str | None]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root and self.dest.name in dirnames:
                dirnames.remove(self.dest.name)
            for n in dirnames + filenames:
                path = Path(dirpath) / n
                st = os.lstat(path)
                body: bytes | str | None = None
                if path.is_symlink():
                    body = os.readlink(path)
                elif path.is_file() and path != self.tar:
                    body = path.read_bytes()
                found[str(path)] = (st.st_mode, st.st_size, body)
        return found


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "file").write_bytes(b"original")
    return Scene(root=tmp_path, dest=tmp_path / "dest", sentinel=sentinel, tar=tmp_path / "ctx.tgz")


def info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **attrs: object
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = kind, size, 0o644, 1_600_000_000
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def write_tar(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            ti.size = len(data) if ti.isreg() else ti.size
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)


def write_bomb(path: Path, header: bytes, zeros: int) -> None:
    """`header` then `zeros` zero bytes, gzip'd as a stream of repeated members (no end block)."""
    piece = 64 * MiB
    zero_member = gzip.compress(bytes(piece), compresslevel=9, mtime=0)
    with path.open("wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(zeros // piece):
            f.write(zero_member)
        f.write(gzip.compress(bytes(zeros % piece), mtime=0))


def refused(scene: Scene, match: str, limits: ContextLimits = SMALL) -> None:
    """The archive is refused with `match` in the message, and nothing outside dest changed."""
    before = scene.snapshot()
    with pytest.raises(ContextError, match=match):
        unpack_context(scene.tar, scene.dest, limits=limits)
    assert scene.snapshot() == before
    assert sorted(p.name for p in scene.sentinel.iterdir()) == ["file"]
    assert (scene.sentinel / "file").read_bytes() == b"original"


def dest_bytes(dest: Path) -> int:
    return sum(os.lstat(Path(d) / n).st_size for d, _, files in os.walk(dest) for n in files)


def test_climbing_name(scene: Scene) -> None:
    write_tar(scene.tar, [(info("../sentinel/x"), b"pwned")])
    refused(scene, r"'\.\./sentinel/x' contains '\.\.'")


def test_climbing_name_after_a_directory(scene: Scene) -> None:
    write_tar(scene.tar, [(info("a", tarfile.DIRTYPE), b""), (info("a/../../sentinel/x"), b"p")])
    refused(scene, r"'a/\.\./\.\./sentinel/x' contains '\.\.'")


def test_absolute_name(scene: Scene) -> None:
    write_tar(scene.tar, [(info(str(scene.sentinel / "x")), b"pwned")])
    refused(scene, "is an absolute path")
    write_tar(scene.tar, [(info("/etc/x"), b"pwned")])
    refused(scene, r"'/etc/x' is an absolute path")


def test_symlink_to_root_then_a_file_through_it(scene: Scene) -> None:
    through = "link" + str(scene.sentinel / "pwned")
    write_tar(
        scene.tar, [(info("link", tarfile.SYMTYPE, linkname="/"), b""), (info(through), b"p")]
    )
    refused(scene, "'link'")


def test_relative_symlink_out_then_a_file_through_it(scene: Scene) -> None:
    entries = [
        (info("link", tarfile.SYMTYPE, linkname="../sentinel"), b""),
        (info("link/pwned"), b"p"),
    ]
    write_tar(scene.tar, entries)
    refused(scene, "'link'")


def test_file_through_an_inside_symlink_is_refused(scene: Scene) -> None:
    """A symlink that stays inside is not written through either (the data filter allows it)."""
    entries = [
        (info("d", tarfile.DIRTYPE), b""),
        (info("l", tarfile.SYMTYPE, linkname="d"), b""),
        (info("l/x"), b"through"),
    ]
    write_tar(scene.tar, entries)
    refused(scene, r"entry 'l/x': l is not a directory")


def test_file_entry_replaces_a_symlink_of_the_same_name(scene: Scene) -> None:
    """A symlink entry, then a file entry of the same name: the file replaces the link."""
    entries = [(info("f", tarfile.SYMTYPE, linkname="target"), b""), (info("f"), b"data")]
    write_tar(scene.tar, entries)
    before = scene.snapshot()
    unpack_context(scene.tar, scene.dest, limits=SMALL)
    assert not (scene.dest / "f").is_symlink() and (scene.dest / "f").read_bytes() == b"data"
    assert not (scene.dest / "target").exists()
    assert scene.snapshot() == before


def test_directory_entry_replaces_a_symlink_of_the_same_name(scene: Scene) -> None:
    """A directory entry where a symlink stands makes a real directory (no chmod/utime through)."""
    entries = [
        (info("inner", tarfile.DIRTYPE), b""),
        (info("d", tarfile.SYMTYPE, linkname="inner"), b""),
        (info("d", tarfile.DIRTYPE, mtime=1), b""),
    ]
    write_tar(scene.tar, entries)
    unpack_context(scene.tar, scene.dest, limits=SMALL)
    assert (scene.dest / "d").is_dir() and not (scene.dest / "d").is_symlink()
    assert (scene.dest / "inner").stat().st_mtime != 1


def test_realpath_overflow_symlink_chain(scene: Scene) -> None:
    """CVE-2025-4517's shape (the data filter of Python < 3.11.13 lets it out): a chain of
    symlinks that makes the resolved path longer than PATH_MAX, then a link climbing out
    through it. Refused at the first entry written below a symlink."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    entries: list[tuple[tarfile.TarInfo, bytes]] = []
    path = ""
    for step in steps:
        entries.append((info(os.path.join(path, comp), tarfile.DIRTYPE), b""))
        entries.append((info(os.path.join(path, step), tarfile.SYMTYPE, linkname=comp), b""))
        path = os.path.join(path, comp)
    linkpath = os.path.join("/".join(steps), "l" * 254)
    up = "../" * len(steps)
    entries.append((info(linkpath, tarfile.SYMTYPE, linkname=up), b""))
    escape = linkpath + "/../sentinel"
    entries.append((info("escape", tarfile.SYMTYPE, linkname=escape), b""))
    entries.append((info("escape/pwned"), b"p"))
    write_tar(scene.tar, entries)
    refused(scene, r"entry 'a/b/.*: a is not a directory")


def test_hardlink_to_etc_passwd(scene: Scene) -> None:
    write_tar(scene.tar, [(info("pw", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")])
    refused(scene, r"link target of '/etc/passwd' is an absolute path")


def test_hardlink_climbing_out(scene: Scene) -> None:
    write_tar(scene.tar, [(info("f", tarfile.LNKTYPE, linkname="../sentinel/file"), b"")])
    refused(scene, r"contains '\.\.'")


def test_hardlink_through_a_symlink(scene: Scene) -> None:
    entries = [
        (info("s", tarfile.SYMTYPE, linkname="../sentinel"), b""),
        (info("h", tarfile.LNKTYPE, linkname="s/file"), b""),
    ]
    write_tar(scene.tar, entries)
    refused(scene, "'s'")


def test_hardlink_to_itself_cannot_make_tarfile_reread_the_stream(scene: Scene) -> None:
    """tarfile copies an earlier member again when a link fails: refused (one pass only)."""
    entries = [(info("a"), b"data"), (info("a", tarfile.LNKTYPE, linkname="a"), b"")]
    write_tar(scene.tar, entries)
    refused(scene, "read backwards")


def test_hardlink_inside_is_kept(scene: Scene) -> None:
    entries = [(info("a"), b"shared"), (info("b", tarfile.LNKTYPE, linkname="a"), b"")]
    write_tar(scene.tar, entries)
    unpack_context(scene.tar, scene.dest, limits=SMALL)
    assert os.path.samefile(scene.dest / "a", scene.dest / "b")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, b"V"])
def test_device_nodes_and_fifos(scene: Scene, kind: bytes) -> None:
    write_tar(scene.tar, [(info("dev", kind, devmajor=1, devminor=3), b"")])
    refused(scene, "entry 'dev' is not a file, directory or link")
    assert not (scene.dest / "dev").exists()


def test_setuid_bits_are_dropped(scene: Scene) -> None:
    write_tar(scene.tar, [(info("suid", mode=0o6777), b"#!/bin/sh\n")])
    unpack_context(scene.tar, scene.dest, limits=SMALL)
    assert (scene.dest / "suid").stat().st_mode & 0o7777 == 0o755


def test_gzip_bomb_one_huge_file(scene: Scene) -> None:
    """3 GiB of zeros in a few MiB: refused before anything past max_bytes is written."""
    header = info("bomb", size=3 << 30).tobuf(format=tarfile.PAX_FORMAT)
    write_bomb(scene.tar, header, 3 << 30)
    assert scene.tar.stat().st_size < 16 * MiB
    refused(scene, r"larger than 10\.0 MiB \(at entry 'bomb'\)")
    assert dest_bytes(scene.dest) <= SMALL.max_bytes


def test_gzip_bomb_of_many_honest_files(scene: Scene) -> None:
    """Each header tells the truth; together they pass max_bytes: stops there, not after."""
    write_tar(scene.tar, [(info(f"f{i}"), bytes(MiB)) for i in range(40)])
    refused(scene, r"larger than 10\.0 MiB \(at entry 'f10'\)")
    assert dest_bytes(scene.dest) <= SMALL.max_bytes


def test_huge_extended_header_is_not_read_into_memory(scene: Scene) -> None:
    pax = info("././@PaxHeader", tarfile.XHDTYPE, size=3 << 30).tobuf(format=tarfile.USTAR_FORMAT)
    write_bomb(scene.tar, pax, 3 << 30)
    refused(scene, "tar header larger than")


def test_too_many_entries(scene: Scene) -> None:
    write_tar(scene.tar, [(info(f"f{i}"), b"") for i in range(51)])
    refused(scene, "more than 50 entries", ContextLimits(max_entries=50))


def test_name_longer_than_max_name(scene: Scene) -> None:
    write_tar(scene.tar, [(info("n" * 5000), b"")])
    refused(scene, "longer than 4096 bytes", ContextLimits())


def test_link_target_longer_than_max_name(scene: Scene) -> None:
    write_tar(scene.tar, [(info("l", tarfile.SYMTYPE, linkname="t" * 200), b"")])
    refused(scene, "longer than 100 bytes", ContextLimits(max_name=100))


def test_name_deeper_than_max_depth(scene: Scene) -> None:
    write_tar(scene.tar, [(info("d/" * 300 + "f"), b"")])
    refused(scene, "deeper than 256 directories", ContextLimits())


def test_not_gzip_or_not_tar(scene: Scene) -> None:
    scene.tar.write_bytes(b"plain text, not gzip")
    refused(scene, "not a valid gzip'd tar")
    scene.tar.write_bytes(gzip.compress(b"\x01" * 2048))
    refused(scene, "not a valid tar")
