"""The merged tree of an image's layer indexes (skyreg/lazy/tree.py) is the tree the unpacker
(machines/unpack.py) writes from the same layers: each image here is unpacked for real, as root,
and merged from its indexes, and both are compared node by node (names, types, modes, owners,
sizes, mtimes, link targets, hard link groups and counts, every file's bytes read through the
layer readers) along with what each rejected and skipped."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from skyreg.lazy import tree as lazytree
from skyreg.lazy.index import LayerIndex, build, decode_index
from skyreg.lazy.reader import FileSource, LayerReader
from skyreg.lazy.tree import MergeLimitError, MergeLimits, Tree, merge
from skyreg.machines.unpack import UnpackLimitError, UnpackLimits, UnpackReport, unpack_layers
from tests.support.hostilelayers import end, member
from tests.support.layers import Entry, dir_, file, hard, opaque, special, sym, whiteout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compares with a root unpack")

CHUNK = 64 * 1024
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
NON_UTF8 = b"caf\xe9-latin1".decode("utf-8", "surrogateescape")


def zstd_frames(data: bytes, frame: int = 4096) -> bytes:
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(data[i : i + frame]) for i in range(0, len(data), frame))


COMPRESS = {
    "none": lambda tar: tar,
    "gzip": lambda tar: gzip.compress(tar, 6, mtime=0),
    "zstd": zstd_frames,
}


@dataclass
class Image:
    """Layer blobs on disk, unpacked into `rootfs` and merged into `tree`."""

    blobs: list[Path]
    rootfs: Path
    report: UnpackReport
    tree: Tree
    readers: list[LayerReader]


def make_image(tmp: Path, layers: list[bytes], compressions: list[str] | None = None) -> Image:
    """Unpack the tar `layers` (compressed in turn as `compressions` says) and merge their
    indexes."""
    kinds = compressions or ["gzip", "zstd", "none"]
    blobs, indexes, readers = [], [], []
    for i, raw in enumerate(layers):
        path = tmp / f"layer{i}"
        path.write_bytes(COMPRESS[kinds[i % len(kinds)]](raw))
        blobs.append(path)
        index, points = index_of(path, f"sha256:{i}")
        indexes.append(index)
        readers.append(LayerReader(index, FileSource(str(path)), points))
    rootfs = tmp / "rootfs"
    report = unpack_layers([(p, OCI_TAR) for p in blobs], rootfs)
    return Image(blobs, rootfs, report, merge(indexes), readers)


def index_of(path: Path, digest: str) -> tuple[LayerIndex, bytes | None]:
    """The index of the blob at `path`, through its JSON as a reader gets it."""
    with path.open("rb") as blob:
        index, points = build(blob, digest, chunk_size=CHUNK)
    return decode_index(index.encode()), points


Seen = dict[str, tuple[object, ...]]


def on_disk(rootfs: Path) -> tuple[Seen, set[frozenset[str]]]:
    """Every path below `rootfs` ("" for the root) and its hard link groups."""
    seen: Seen = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        rel_dir = os.path.relpath(dirpath, rootfs)
        names = [""] if rel_dir == "." else []
        for name in names + dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = Path(rootfs, rel)
            st = os.lstat(full)
            kind = (
                "dir"
                if stat.S_ISDIR(st.st_mode)
                else "symlink"
                if stat.S_ISLNK(st.st_mode)
                else "file"
            )
            if kind == "file":
                assert stat.S_ISREG(st.st_mode), rel
                body: object = hashlib.sha256(full.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, set()).add(rel)
            elif kind == "symlink":
                body = os.readlink(full)
                inodes.setdefault(st.st_ino, set()).add(rel)
            else:
                body = None
            size = 0 if kind == "dir" else st.st_size
            seen[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                st.st_nlink,
                body,
            )
            seen[rel + "@mtime"] = (st.st_mtime_ns,)
    return seen, {frozenset(group) for group in inodes.values()}


def in_tree(image: Image) -> tuple[Seen, set[frozenset[str]]]:
    """The same view of the merged tree, every file read through its layer's reader."""
    seen: Seen = {}
    groups: dict[int, set[str]] = {}
    for rel, node in [("", image.tree.root), *image.tree.walk()]:
        if node.kind == "file":
            data = lazytree.read(node, image.readers[node.layer], 0, node.size)
            body: object = hashlib.sha256(data).hexdigest()
            groups.setdefault(node.ino, set()).add(rel)
        elif node.kind == "symlink":
            body = node.target
            groups.setdefault(node.ino, set()).add(rel)
        else:
            body = None
        seen[rel] = (node.kind, node.mode, node.uid, node.gid, node.size, node.nlink, body)
        seen[rel + "@mtime"] = (node.mtime_ns,)
    return seen, {frozenset(group) for group in groups.values()}


def assert_same(image: Image) -> None:
    disk, disk_links = on_disk(image.rootfs)
    mine, my_links = in_tree(image)
    # A directory made as a missing parent has the time of unpacking: no time to compare.
    for key, value in list(mine.items()):
        if key.endswith("@mtime") and value == (None,):
            del mine[key], disk[key]
    assert mine == disk
    assert my_links == disk_links
    for rel, _ in image.tree.walk():
        assert rel and not rel.startswith("/") and ".." not in rel.split("/"), rel
    mine_report, theirs = image.tree.report, image.report
    assert [(r.layer, r.name, r.reason) for r in mine_report.rejected] == [
        (r.layer, r.name, r.reason) for r in theirs.rejected
    ]
    for counter in (
        "layers",
        "files",
        "dirs",
        "symlinks",
        "hardlinks",
        "whiteouts",
        "opaque_dirs",
        "skipped_special",
        "rejected_count",
    ):
        assert getattr(mine_report, counter) == getattr(theirs, counter), counter


def pax(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    target: str = "",
    data: bytes = b"",
    mode: int = 0o644,
    **records: str,
) -> Entry:
    """An entry whose PAX records override its fields, as a hostile writer's would."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, target, mode, 1_650_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.pax_headers = dict(records)
    return Entry(info, data)


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


# -- images ------------------------------------------------------------------------------------

IMAGES: dict[str, list[list[Entry]]] = {
    "whiteouts": [
        [
            dir_("a"),
            file("a/f", b"f"),
            file("a/g", b"g"),
            dir_("d/sub"),
            file("d/sub/x"),
            sym("s", "/"),
            file("keep", b"k"),
        ],
        [
            whiteout("a/f"),
            whiteout("d"),
            whiteout("s"),
            whiteout("never-existed"),
            file("x", b"new"),
            whiteout("x"),
            file(".wh..wh.aufs-meta"),
            file("a/.wh..wh.plnk"),
        ],
    ],
    **{
        f"opaque-{where}": [
            [
                dir_("o"),
                file("o/old"),
                file("o/both", b"old"),
                dir_("o/sub"),
                file("o/sub/x"),
                file("other", b"kept"),
                dir_("gone"),
                file("gone/x"),
            ],
            [
                *([opaque("o")] if where == "first" else []),
                dir_("o", mode=0o750),
                file("o/new", b"n"),
                file("o/both", b"new"),
                *([opaque("o")] if where == "middle" else []),
                dir_("o/sub"),
                file("o/sub/y"),
                opaque("missing"),
                opaque("other"),
                *([opaque("o")] if where == "last" else []),
            ],
            [opaque(""), file("top", b"t")],
        ]
        for where in ("first", "middle", "last")
    },
    "hard-links": [
        [
            file("lower", b"1", mode=0o640, uid=7, gid=8),
            dir_("d"),
            file("d/f", b"df"),
            sym("s", "d"),
            sym("link-target", "/nowhere"),
        ],
        [
            file("a/same", b"2", mode=0o600),
            hard("a/to-same", "a/same"),
            hard("to-lower", "lower"),
            hard("to-symlink", "link-target"),
            hard("through-symlink", "s/f"),
            hard("to-dir", "d"),
            hard("missing", "nope"),
            hard("d", "d/f"),
            hard("self", "lower"),
            hard("lower", "lower"),
            hard("../up", "lower"),
            file("replaced", b"r"),
            hard("replaced-link", "replaced"),
        ],
        [file("replaced", b"new r"), hard("a/third", "a/same"), whiteout("a/to-same")],
    ],
    "symlinks": [
        [
            dir_("real", mode=0o711),
            sym("link", "real"),
            sym("abs", "/real"),
            sym("up", "../../.."),
            sym("loop1", "loop2"),
            sym("loop2", "loop1"),
            sym("dangling", "no/such/file"),
            file("f", b"f"),
        ],
        [
            file("link/x", b"x"),
            file("abs/y", b"y"),
            file("up/z", b"z"),
            file("up/new/deep", b"d"),
            file("loop1/x"),
            file("f/child"),
            sym("f", "real"),
            file("f/through", b"t"),
            dir_("abs"),
            file("abs/own", b"own"),
            sym("real/back", ".."),
            file("real/back/real/again", b"again"),
        ],
    ],
    "names": [
        [
            file("caf\u00e9/\u65e5\u672c\u8a9e.txt", b"nihongo"),
            file(NON_UTF8, b"latin1"),
            dir_(NON_UTF8 + "-dir"),
            file(NON_UTF8 + "-dir/inner", b"inner"),
            file("/abs/file", b"abs"),
            file("./b/../c", b"c"),
            file("../escape", b"no"),
            file("a/../../escape2", b"no"),
            file("x" * 300, b"too long"),
            file("ok/" + "y" * 255),
            file("./", b"root?"),
            sym("emoji-\U0001f600", "caf\u00e9"),
        ],
        [whiteout(NON_UTF8), file(".wh.", b""), file("z/.wh..", b"")],
    ],
    "replacement-and-metadata": [
        [
            dir_("p"),
            file("p/child"),
            file("q"),
            file("r"),
            sym("s", "/"),
            dir_("t/u"),
            dir_("ro", mode=0o555, mtime=1_500_000_000),
            file("ro/x", b"1", mode=0o640),
            dir_("own", uid=11, gid=12, mode=0o700),
            file("suid", b"x", mode=0o4755, uid=1234, gid=4321),
            dir_("sgid", mode=0o2775),
        ],
        [
            file("p", b"file"),
            dir_("q"),
            file("q/c"),
            sym("r", "q"),
            dir_("s"),
            file("s/x"),
            dir_("t"),
            sym("t/u", ".."),
            file("ro/late", b"2", mode=0o700, mtime=1_400_000_000),
            dir_("sticky", mode=0o1777),
            dir_("own", uid=21, gid=22, mode=0o751),
        ],
    ],
    "devices": [
        [
            special("dev/null", tarfile.CHRTYPE),
            special("dev/sda", tarfile.BLKTYPE),
            special("fifo", tarfile.FIFOTYPE),
            file("f"),
            hard("h", "fifo"),
        ],
        [special("f", tarfile.FIFOTYPE)],
    ],
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_merged_tree_is_the_unpacked_tree(tmp_path: Path, name: str) -> None:
    image = make_image(tmp_path, [pax_tar(entries) for entries in IMAGES[name]])
    assert_same(image)


@pytest.mark.parametrize("first", ["gzip", "zstd", "none"])
def test_owners_and_times_out_of_range_are_merged_as_chown_and_utime_treat_them(
    tmp_path: Path, first: str
) -> None:
    layers = [
        [
            pax("neg-uid", uid="-5", gid="7"),
            pax("big-uid", uid=str(2**40), gid="7"),
            pax("keep-uid", uid="4294967295", gid="9"),
            pax("keep-gid", uid="9", gid="-1"),
            pax("d", tarfile.DIRTYPE, mode=0o755, uid="3", gid="4"),
            pax("s", tarfile.SYMTYPE, "neg-uid", uid="5", gid="6"),
            pax("far", mtime="99999999999"),
        ],
        [
            pax("d", tarfile.DIRTYPE, mode=0o700, uid="-1", gid="40"),
            pax("d/f", data=b"f", uid="4294967294", gid="4294967294"),
        ],
    ]
    image = make_image(tmp_path, [pax_tar(e) for e in layers], [first, "none"])
    assert image.tree.lookup("d") is not None and image.tree.lookup("d").uid == 3  # type: ignore[union-attr]
    assert_same(image)


def test_big_and_sparse_files_read_back_as_unpacked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with (src / "sparse.img").open("wb") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"middle data")
        f.seek(9 * 1024 * 1024)
        f.write(b"end")
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    os.chmod(src, 0o751)
    gnu = subprocess.run(
        [
            "tar",
            "--format=gnu",
            "--sparse",
            "--owner=0",
            "--group=0",
            "-cf",
            "-",
            "-C",
            str(src),
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout
    upper = pax_tar([file("sparse.img", b"replaced"), hard("big-link", "big.bin")])
    image = make_image(tmp_path, [gnu, upper, gnu], ["gzip", "none", "zstd"])
    sparse = image.tree.lookup("sparse.img")
    assert sparse is not None and sparse.entry is not None and sparse.entry.sparse
    reader = image.readers[sparse.layer]
    assert (
        lazytree.read(sparse, reader, 5 * 1024 * 1024 - 3, 20)
        == b"\0" * 3 + b"middle data" + b"\0" * 6
    )
    assert lazytree.read(sparse, reader, sparse.size - 2, 100) == b"nd"
    assert image.tree.root.mode == 0o751  # the layer's "./" entry
    assert_same(image)


def test_the_merge_refuses_what_the_unpacker_refuses(tmp_path: Path) -> None:
    assert MergeLimits() == MergeLimits(
        **{f: getattr(UnpackLimits(), f) for f in UnpackLimits.__slots__}  # type: ignore[attr-defined]
    )
    deep = "/".join(["d"] * 300)
    (tmp_path / "deep").write_bytes(pax_tar([file(deep, b"x")]))
    index, _ = index_of(tmp_path / "deep", "sha256:deep")
    with pytest.raises(UnpackLimitError, match="300 components"):
        unpack_layers([(tmp_path / "deep", OCI_TAR)], tmp_path / "rootfs")
    with pytest.raises(MergeLimitError, match="300 components"):
        merge([index])
    many = pax_tar([file(f"f{i}") for i in range(20)])
    (tmp_path / "many").write_bytes(many)
    index, _ = index_of(tmp_path / "many", "sha256:many")
    with pytest.raises(MergeLimitError, match="more than 10 entries"):
        merge([index], MergeLimits(entries=10))
    with pytest.raises(MergeLimitError, match="larger than"):
        merge([index], MergeLimits(layer_bytes=len(many) - 1))


# -- hostile layers (the security suite's cases, on this path) ---------------------------------


def hostile_cases(outside: str) -> dict[str, list[bytes]]:
    """Layers of raw GNU headers (tests/support/hostilelayers.py) naming an `outside`."""
    rel_out = "/".join([".."] * 12) + outside
    names = [
        "",
        ".",
        "..",
        "./",
        "../",
        "/..",
        "//",
        "a/..",
        "a/../..",
        "..//x",
        "./../x",
        "a/./../../x",
        "x/.",
        "x/..",
        ".wh.",
        ".wh..",
        ".wh...",
        "a/.wh..",
        "a/.wh../x",
        ".wh..wh..opq/..",
        "/../.wh..wh..opq",
    ]
    dots = [member("a", kind=tarfile.DIRTYPE)]
    for name in names:
        dots += [
            member(name, b"f"),
            member(name, kind=tarfile.DIRTYPE, mode=0o777),
            member(name, kind=tarfile.SYMTYPE, linkname="/" + outside),
            member(name, kind=tarfile.LNKTYPE, linkname="a"),
            member("hl", kind=tarfile.LNKTYPE, linkname=name),
            member(f"{name}/w", kind=tarfile.SYMTYPE, linkname="../" * 8),
        ]
    deep = "/".join(["d"] * 200)
    chain = [
        member(f"s{i}", kind=tarfile.SYMTYPE, linkname=f"s{i + 1}" if i < 40 else outside)
        for i in range(41)
    ]
    pad = "d/../" * 800
    costly = [
        member(f"c{i}", kind=tarfile.SYMTYPE, linkname=pad + (f"c{i + 1}" if i < 39 else "d"))
        for i in range(40)
    ]
    sym_, lnk, dir_t = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE

    def tar(*members: bytes) -> bytes:
        return b"".join(members) + end()

    return {
        "swapped-dir": [
            tar(
                member("d", kind=dir_t),
                member("d/f", b"f"),
                member("d", kind=sym_, linkname=outside),
                member("d/secret", b"mine"),
                member("d/.wh.dir"),
                member("d/h", kind=lnk, linkname="d/secret"),
            ),
            tar(
                member("d", kind=sym_, linkname="../../../../" + outside),
                member("d/dir/new", b"new"),
                member("d/.wh..wh..opq"),
                member("e", kind=sym_, linkname="d"),
                member("e/secret", b"again"),
            ),
        ],
        "symlink-chain": [
            tar(member("a", kind=sym_, linkname="b")),
            tar(member("b", kind=sym_, linkname="c/./")),
            tar(member("c", kind=sym_, linkname=rel_out)),
            tar(member("a/secret", b"in"), member("a/dir/x", b"x")),
        ],
        "hard-links-out": [
            tar(
                member("lnk", kind=sym_, linkname=outside),
                member("up", kind=sym_, linkname="../../.."),
                member("x", kind=sym_, linkname=outside + "/secret"),
            ),
            tar(
                member("h1", kind=lnk, linkname="../outside/secret"),
                member("h2", kind=lnk, linkname="../../../../" + outside + "/secret"),
                member("h3", kind=lnk, linkname=outside.lstrip("/") + "/secret"),
                member("h4", kind=lnk, linkname="lnk/secret"),
                member("h5", kind=lnk, linkname="up/" + outside.lstrip("/") + "/secret"),
                member("h6", kind=lnk, linkname="x"),
                member("h7", kind=lnk, linkname="x/../x"),
            ),
        ],
        "whiteouts-through-symlinks": [
            tar(
                member(outside.lstrip("/") + "/secret", b"decoy"),
                member(outside.lstrip("/") + "/dir/f", b"decoy"),
                member("abs", kind=sym_, linkname=outside),
                member("rel", kind=sym_, linkname="../../../../.." + outside),
                member("updir", kind=sym_, linkname="../.."),
                member("deep", kind=dir_t),
                member("deep/link", kind=sym_, linkname="/proc/self/root" + outside),
            ),
            tar(
                member("abs/.wh.secret"),
                member("rel/.wh.dir"),
                member("abs/.wh..wh..opq"),
                member("rel/.wh..wh..opq"),
                member("updir/.wh..wh..opq"),
                member("deep/link/.wh.secret"),
                member("deep/link/.wh..wh..opq"),
                member(".wh.abs"),
                member("kept", b"kept"),
            ),
        ],
        "dots-and-empty-names": [tar(*dots)],
        "long-and-deep-chains": [
            tar(
                member(deep, kind=dir_t),
                *chain,
                member("far", kind=sym_, linkname=deep),
                member("longest", kind=sym_, linkname="/".join(["x", ".."] * 800) + "/x"),
            ),
            tar(
                member("s1/ok", b"40 hops"),
                member("s0/loop", b"41 hops"),
                member("far/" + "/".join(["e"] * 57), b"too deep"),
                member("far/" + "/".join(["e"] * 55), b"just fits"),
                member("longest/f", b"made"),
            ),
        ],
        "costly-chain": [
            tar(member("d", kind=dir_t), *costly),
            tar(*(member(f"c0/f{i}", b"x") for i in range(3))),
        ],
        "devices-and-fifos": [
            tar(
                member("esc", kind=sym_, linkname=outside),
                member("etc/passwd", kind=tarfile.FIFOTYPE),
                member("esc/secret", kind=tarfile.CHRTYPE),
                member("dev/sda", kind=tarfile.BLKTYPE),
            ),
            tar(member("h", kind=lnk, linkname="etc/passwd")),
        ],
        "modes-through-symlinks": [
            tar(
                member("a/b", kind=dir_t, mode=0o7777, uid=4242, gid=4242),
                member("c", kind=dir_t, mode=0o777),
                member("esc", kind=sym_, linkname=outside),
            ),
            tar(
                member("a", kind=sym_, linkname=outside),
                member("c", kind=sym_, linkname=outside + "/dir"),
                member("esc", kind=dir_t, mode=0o777, uid=4242),
                member("esc2", kind=sym_, linkname="../../../.." + outside),
                member("esc2/dir", kind=dir_t, mode=0o777),
                member("esc2/secret", b"x", mode=0o6777, uid=4242),
            ),
        ],
        "unusable-names": [
            tar(
                member("x" * 300 + "/f", b"long"),
                member("s", kind=sym_, linkname="t" * 4096),
                member("e", kind=sym_, linkname=""),
                member("f", b"file"),
                member("lf", kind=sym_, linkname="f"),
                member("lf/under", b"under"),
                member("loop", kind=sym_, linkname="loop/loop"),
                member("loop/x", b"loop"),
                member("ok", b"ok"),
            ),
        ],
    }


HOSTILE = sorted(hostile_cases("/x"))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_layers_merge_inside_the_root_as_they_unpack(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    before = sorted(p.name for p in outside.rglob("*"))
    image = make_image(tmp_path, hostile_cases(str(outside))[case], ["none", "gzip"])
    assert sorted(p.name for p in outside.rglob("*")) == before
    assert (outside / "secret").read_bytes() == b"secret"
    assert_same(image)
