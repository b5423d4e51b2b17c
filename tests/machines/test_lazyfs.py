"""The lazy filesystem (machines/lazyfs.py), mounted for real with FUSE: the merged tree of a
gzip + zstd (several frames) + plain image, walked through the kernel, is the tree the unpacker
writes from the same layers; a flipped byte in a layer is EIO for its file only; writes are
refused; nothing stays mounted."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from skyreg.lazy.index import LayerIndex, build, decode_index
from skyreg.lazy.reader import FileSource, LayerReader
from skyreg.lazy.tree import Tree, merge
from skyreg.machines.unpack import unpack_layers
from tests.support.layers import Entry, dir_, file, hard, opaque, special, sym, whiteout

pyfuse3 = pytest.importorskip("pyfuse3")
from skyreg.machines.lazyfs import Mount, mount  # noqa: E402 - needs pyfuse3

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="needs /dev/fuse and root (the tree is a root unpack's)",
)

CHUNK = 64 * 1024
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
BIG = os.urandom(3 * 1024 * 1024 + 77)
NON_UTF8 = b"na\xefve-\xff".decode("utf-8", "surrogateescape")


def pax_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for e in entries:
            tar.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return buf.getvalue()


def with_xattr(entry: Entry, name: str, value: str) -> Entry:
    entry.info.pax_headers = {f"SCHILY.xattr.{name}": value}
    return entry


def zstd_frames(data: bytes, frame: int = 4096) -> bytes:
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(data[i : i + frame]) for i in range(0, len(data), frame))


def sparse_layer(tmp: Path) -> bytes:
    """A GNU tar of a directory holding a sparse file (holes stored as a map)."""
    src = tmp / "sparse-src"
    (src / "var").mkdir(parents=True)
    with (src / "var/sparse.img").open("wb") as f:
        f.seek(2 * 1024 * 1024)
        f.write(b"data in the middle")
        f.seek(6 * 1024 * 1024)
        f.write(b"tail")
    return subprocess.run(
        ["tar", "--format=gnu", "--sparse", "--owner=0", "--group=0", "-cf", "-", "-C", str(src),
         "var"],
        check=True,
        capture_output=True,
    ).stdout  # fmt: skip


def layers(tmp: Path) -> list[bytes]:
    """gzip, zstd and plain layers with whiteouts, opaque directories, hard links, symlinks,
    non-ASCII and non-UTF-8 names, a large file, a sparse one and device nodes."""
    base = [
        dir_("etc", mode=0o755),
        file("etc/hostname", b"lazy\n", mode=0o644, uid=0, gid=0),
        file("etc/shadow", b"root:*:1::::::\n", mode=0o640, uid=0, gid=42),
        dir_("usr/lib", mode=0o755),
        file("usr/lib/big.bin", BIG, mode=0o755),
        with_xattr(file("usr/bin/ping", b"\x7fELF ping", mode=0o4755), "user.skyreg", "cap"),
        sym("bin", "usr/bin"),
        dir_("opt/app", mode=0o750, uid=1000, gid=1000),
        file("opt/app/old.txt", b"old"),
        file("opt/app/kept-by-opaque-later.txt", b"lower"),
        dir_("var/cache", mode=0o1777),
        file("var/cache/gone", b"x"),
        special("dev/null", tarfile.CHRTYPE),
    ]
    middle = [
        whiteout("var/cache/gone"),
        file("caf\u00e9/\u65e5\u672c\u8a9e.txt", "\u3053\u3093\u306b\u3061\u306f".encode()),
        file(NON_UTF8, b"bytes name"),
        hard("etc/hostname.hard", "etc/hostname"),
        hard("usr/lib/big.hard", "usr/lib/big.bin"),
        sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
        file("bin/busybox", b"#!busybox", mode=0o755),  # through the `bin` symlink
        special("fifo", tarfile.FIFOTYPE),
    ]
    top = [
        file("opt/app/new.txt", b"new", uid=1000, gid=1000),
        opaque("opt/app"),
        dir_("opt/app", mode=0o700, uid=1000, gid=1000),
        whiteout("etc/shadow"),
        file("../escape", b"rejected"),
        file("etc/hostname", b"replaced\n"),  # the hard link keeps the old bytes
    ]
    return [pax_tar(base), pax_tar(middle), pax_tar(top), sparse_layer(tmp)]


COMPRESS: list[Callable[[bytes], bytes]] = [
    lambda tar: gzip.compress(tar, 6, mtime=0),
    zstd_frames,
    lambda tar: tar,
    lambda tar: gzip.compress(tar, 1, mtime=0),
]


def index_of(path: Path, digest: str) -> tuple[LayerIndex, bytes | None]:
    with path.open("rb") as blob:
        index, points = build(blob, digest, chunk_size=CHUNK)
    return decode_index(index.encode()), points


class Image:
    """The layers on disk, unpacked into `rootfs`, merged into `tree`."""

    def __init__(self, tmp: Path, *, keep_xattrs: bool = False) -> None:
        self.blobs: list[Path] = []
        self.indexes: list[LayerIndex] = []
        self.points: list[bytes | None] = []
        for i, raw in enumerate(layers(tmp)):
            path = tmp / f"layer{i}"
            path.write_bytes(COMPRESS[i](raw))
            index, points = index_of(path, f"sha256:{i}")
            self.blobs.append(path)
            self.indexes.append(index)
            self.points.append(points)
        self.rootfs = tmp / "rootfs"
        unpack_layers([(p, OCI_TAR) for p in self.blobs], self.rootfs)
        self.tree: Tree = merge(self.indexes, keep_xattrs=keep_xattrs)

    def readers(self, blobs: list[Path] | None = None) -> list[LayerReader]:
        return [
            LayerReader(index, FileSource(str(blob)), points)
            for index, blob, points in zip(
                self.indexes, blobs or self.blobs, self.points, strict=True
            )
        ]


def mounted_at(path: Path) -> bool:
    return (
        subprocess.run(["findmnt", "--mountpoint", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Callable[[Tree, list[LayerReader]], Path]]:
    """Mount a tree at a fresh directory; every mount is unmounted at the end, test failed or
    not, and none is left behind."""
    handles: list[Mount] = []

    def do(tree: Tree, readers: list[LayerReader]) -> Path:
        point = tmp_path / f"mnt{len(handles)}"
        point.mkdir()
        handles.append(mount(tree, readers, point))
        assert mounted_at(point)
        return point

    try:
        yield do
    finally:
        for handle in handles:
            handle.unmount()
        for handle in handles:
            assert not mounted_at(handle.mountpoint)


def observe(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path below `root` ("" for the root): type, mode, owner, size, links, contents or
    target, mtime, xattr of `user.skyreg` (or its errno)."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in ([""] if rel_dir == "." else []) + dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = Path(root, rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                kind, body = "symlink", os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                kind, body = "dir", None
            else:
                assert stat.S_ISREG(st.st_mode), rel
                kind, body = "file", hashlib.sha256(full.read_bytes()).hexdigest()
            try:
                xattr: object = os.getxattr(full, "user.skyreg", follow_symlinks=False)
            except OSError as e:
                xattr = errno.errorcode[e.errno or 0]
            size = None if kind == "dir" else st.st_size
            seen[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_nlink,
                         body, xattr)  # fmt: skip
            seen[f"{rel}@mtime"] = (st.st_mtime_ns,)
    return seen


def comparable(image: Image, seen: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """`seen` without the times of directories made as missing parents (the unpacker's are the
    time of unpacking)."""
    out = dict(seen)
    for key in seen:
        if key.endswith("@mtime"):
            node = image.tree.lookup(key.removesuffix("@mtime"))
            assert node is not None, key
            if node.mtime_ns is None:
                del out[key]
    return out


def test_the_mounted_tree_is_the_unpacked_tree(tmp_path: Path, mounts: Callable[..., Path]) -> None:
    image = Image(tmp_path)
    point = mounts(image.tree, image.readers())
    unpacked, lazy = comparable(image, observe(image.rootfs)), comparable(image, observe(point))
    assert lazy == unpacked
    # What the image holds, through the mount.
    assert (point / "etc/hostname").read_bytes() == b"replaced\n"
    assert (point / "etc/hostname.hard").read_bytes() == b"lazy\n"
    assert (point / "usr/lib/big.bin").read_bytes() == BIG
    assert os.stat(point / "usr/lib/big.hard").st_ino == os.stat(point / "usr/lib/big.bin").st_ino
    assert sorted(os.listdir(point / "opt/app")) == ["new.txt"]
    assert os.listdir(point / "var/cache") == []
    assert not (point / "etc/shadow").exists() and not (point / "fifo").exists()
    assert os.readlink(point / "bin") == "usr/bin"
    assert (point / "usr/bin/busybox").read_bytes() == b"#!busybox"
    assert (point / NON_UTF8).read_bytes() == b"bytes name"
    assert stat.S_IMODE(os.stat(point / "usr/bin/ping").st_mode) == 0o4755
    with (point / "var/sparse.img").open("rb") as f:
        f.seek(2 * 1024 * 1024 - 2)
        assert f.read(22) == b"\0\0data in the middle\0\0"
    assert os.stat(point / "var/sparse.img").st_size == 6 * 1024 * 1024 + 4
    assert os.statvfs(point).f_namemax == 255


def test_xattrs_are_served_when_the_tree_keeps_them(
    tmp_path: Path, mounts: Callable[..., Path]
) -> None:
    image = Image(tmp_path, keep_xattrs=True)
    point = mounts(image.tree, image.readers())
    assert os.getxattr(point / "usr/bin/ping", "user.skyreg") == b"cap"
    assert os.listxattr(point / "usr/bin/ping") == ["user.skyreg"]
    with pytest.raises(OSError) as missing:
        os.getxattr(point / "etc/hostname.hard", "user.skyreg")
    assert missing.value.errno == errno.ENODATA


def test_a_flipped_byte_is_eio_for_its_file_and_other_files_still_read(
    tmp_path: Path, mounts: Callable[..., Path]
) -> None:
    image = Image(tmp_path)
    # The plain layer (layer 2) holds new.txt and the new etc/hostname: flip a byte of the
    # latter's data; the gzip layer's big file gets a flipped byte in its compressed bytes.
    plain = bytearray(image.blobs[2].read_bytes())
    [hostname] = [e for e in image.indexes[2].entries if e.name == "etc/hostname"]
    assert hostname.offset is not None
    plain[hostname.offset + 2] ^= 0x01
    gzipped = bytearray(image.blobs[0].read_bytes())
    gzipped[len(gzipped) // 2] ^= 0x40
    bad = [tmp_path / "bad0", image.blobs[1], tmp_path / "bad2", image.blobs[3]]
    bad[0].write_bytes(gzipped)
    bad[2].write_bytes(plain)
    point = mounts(image.tree, image.readers(bad))
    for name in ("etc/hostname", "usr/lib/big.bin"):
        with pytest.raises(OSError) as failed:
            (point / name).read_bytes()
        assert failed.value.errno == errno.EIO, name
    # Verification is by chunk: files sharing a bad chunk fail too (here all of the small plain
    # layer), files in other chunks and layers read.
    assert (point / "etc/hostname.hard").read_bytes() == b"lazy\n"
    assert (point / "caf\u00e9/\u65e5\u672c\u8a9e.txt").read_bytes().decode() == "こんにちは"
    assert (point / "usr/bin/busybox").read_bytes() == b"#!busybox"


def test_writes_are_refused(tmp_path: Path, mounts: Callable[..., Path]) -> None:
    image = Image(tmp_path)
    point = mounts(image.tree, image.readers())
    attempts: list[Callable[[], object]] = [
        lambda: os.open(point / "etc/hostname", os.O_WRONLY),
        lambda: os.open(point / "etc/hostname", os.O_RDWR),
        lambda: os.open(point / "new-file", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(point / "new-dir"),
        lambda: os.unlink(point / "etc/hostname"),
        lambda: os.rename(point / "etc/hostname", point / "etc/other"),
        lambda: os.chmod(point / "etc/hostname", 0o777),
        lambda: os.truncate(point / "etc/hostname", 0),
        lambda: os.symlink("x", point / "link"),
        lambda: os.setxattr(point / "etc/hostname", "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), refused.value
    assert (point / "etc/hostname").read_bytes() == b"replaced\n"


def test_a_second_mount_in_the_process_is_refused_and_unmount_is_idempotent(
    tmp_path: Path,
) -> None:
    image = Image(tmp_path)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    handle = mount(image.tree, image.readers(), first)
    try:
        with pytest.raises(Exception, match="already mounted"):
            mount(image.tree, image.readers(), second)
        busy = os.open(first / "etc/hostname", os.O_RDONLY)  # an open file does not pin it
        handle.unmount()
        assert not mounted_at(first)
        with pytest.raises(OSError) as gone:  # its connection is gone: FLUSH is not answered
            os.close(busy)
        assert gone.value.errno == errno.ENOTCONN
    finally:
        handle.unmount()
    assert not mounted_at(first) and not mounted_at(second)
    with mount(image.tree, image.readers(), second):
        assert (second / "etc/hostname").read_bytes() == b"replaced\n"
    assert not mounted_at(second)
