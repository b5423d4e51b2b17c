"""index_image over real layers: whiteouts, replaced databases, symlinks, digests, limits."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from skyreg.scan.index import IndexLimits, Layer, ScanError, index_image
from skyreg.scan.model import ImageIndex
from tests.support import scanimages
from tests.support.layers import dir_, file, hard, opaque, sym, whiteout
from tests.support.scanimages import PY_SITE, Blob, write_blob

STATUS = "var/lib/dpkg/status"


def _installed_count(status: bytes) -> int:
    return status.count(b"\nStatus: install ok installed\n")


DEFAULT = IndexLimits()


def _index(*blobs: Blob, limits: IndexLimits = DEFAULT) -> ImageIndex:
    return index_image([b.layer() for b in blobs], limits)


def _raw_layer(data: bytes, digest: str = "sha256:" + "0" * 64) -> Layer:
    return Layer(digest, "application/vnd.oci.image.layer.v1.tar", lambda: io.BytesIO(data))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "tar"])
def test_debian_layer_packages_os_and_layer(tmp_path: Path, compression: str) -> None:
    blob = write_blob(tmp_path, scanimages.debian_entries(), compression)
    index = _index(blob)
    assert index.os is not None
    assert (index.os.id, index.os.version_id, index.os.codename) == ("debian", "12", "bookworm")
    debs = [p for p in index.packages if p.type == "deb"]
    assert len(debs) == _installed_count(Path("/var/lib/dpkg/status").read_bytes())
    assert {(p.layer, p.path) for p in debs} == {(blob.digest, STATUS)}
    libc = next(p for p in debs if p.name == "libc6")
    assert libc.source == "glibc" and libc.arch
    assert libc.purl.startswith("pkg:deb/debian/libc6@") and "distro=debian-12" in libc.purl


def test_os_release_symlink_resolved_inside_the_image(tmp_path: Path) -> None:
    os_release = b'ID=debian\nVERSION_ID="12"\n'
    lower = write_blob(
        tmp_path,
        [
            dir_("etc"),
            dir_("usr"),
            dir_("usr/lib"),
            file("usr/lib/os-release", os_release),
            # absolute and relative hops, resolved in the image, never on the host
            sym("etc/os-release", "/etc/alt/os-release"),
            dir_("etc/alt"),
            sym("etc/alt/os-release", "../../usr/lib/../lib/os-release"),
        ],
    )
    index = _index(lower)
    assert index.os is not None and index.os.version_id == "12"
    # a symlink loop is not followed forever: no OS found
    loop = write_blob(tmp_path, [dir_("etc"), sym("etc/os-release", "os-release")])
    assert _index(loop).os is None


def test_file_list_records_types_links_and_layers(tmp_path: Path) -> None:
    lower = write_blob(
        tmp_path,
        [dir_("bin", mode=0o755), file("bin/sh", b"x" * 10, mode=0o4755), sym("bin/ash", "sh")],
    )
    upper = write_blob(
        tmp_path, [file("bin/sh", b"yy", mode=0o755), hard("bin/sh2", "bin/sh")], "zstd"
    )
    index = _index(lower, upper)
    files = {f.path: f for f in index.files}
    assert [f.path for f in index.files] == ["bin", "bin/ash", "bin/sh", "bin/sh2"]
    assert (files["bin"].type, files["bin"].layer) == ("dir", lower.digest)
    assert (files["bin/ash"].type, files["bin/ash"].link) == ("symlink", "sh")
    assert (files["bin/sh"].size, files["bin/sh"].mode, files["bin/sh"].layer) == (
        2,
        0o755,
        upper.digest,
    )
    assert (files["bin/sh2"].type, files["bin/sh2"].link) == ("hardlink", "bin/sh")
    assert not index.files_truncated


def test_whiteout_of_a_status_file_removes_its_packages(tmp_path: Path) -> None:
    lower = write_blob(tmp_path, scanimages.debian_entries())
    upper = write_blob(tmp_path, [whiteout(STATUS)])
    index = _index(lower, upper)
    assert not [p for p in index.packages if p.type == "deb"]
    assert STATUS not in {f.path for f in index.files}
    assert index.os is not None  # untouched


def test_replaced_status_file_counts_from_the_upper_layer(tmp_path: Path) -> None:
    lower = write_blob(tmp_path, scanimages.debian_entries())
    status = (
        b"Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\n"
        b"Source: zlib\nVersion: 1:1.2.13.dfsg-1\n\n"
        b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n"
    )
    upper = write_blob(tmp_path, [file(STATUS, status)], "tar")
    index = _index(lower, upper)
    debs = [p for p in index.packages if p.type == "deb"]
    assert [(p.name, p.version, p.source, p.layer) for p in debs] == [
        ("zlib1g", "1:1.2.13.dfsg-1", "zlib", upper.digest)
    ]


def test_directory_whiteouts_and_opaque_markers(tmp_path: Path) -> None:
    python = write_blob(tmp_path, scanimages.python_entries())
    names = {p.name for p in _index(python).packages}
    assert {"attrs", "idna", "click"} <= names

    # whiteout of one dist-info directory: its package goes, the others stay
    no_idna = write_blob(tmp_path, [whiteout(f"{PY_SITE}/idna-3.20.dist-info")])
    names = {p.name for p in _index(python, no_idna).packages}
    assert "idna" not in names and "attrs" in names

    # whiteout of an ancestor removes everything below
    no_python = write_blob(tmp_path, [whiteout("usr/local/lib/python3.11")])
    assert not _index(python, no_python).packages

    # opaque directory: lower contents go, this layer's stay, whatever the entry order
    mine = f"{PY_SITE}/mine-1.0.dist-info/METADATA"
    for entries in (
        [opaque(PY_SITE), file(mine, b"Name: mine\nVersion: 1.0\n")],
        [file(mine, b"Name: mine\nVersion: 1.0\n"), opaque(PY_SITE)],
    ):
        upper = write_blob(tmp_path, entries)
        index = _index(python, upper)
        assert [(p.name, p.layer, p.path) for p in index.packages] == [("mine", upper.digest, mine)]


def test_whiteout_of_a_path_written_by_the_same_layer_keeps_it(tmp_path: Path) -> None:
    lower = write_blob(tmp_path, [dir_("d"), file("d/old", b"1")])
    upper = write_blob(tmp_path, [file("d/new", b"2"), whiteout("d")])
    paths = [f.path for f in _index(lower, upper).files]
    assert paths == ["d", "d/new"]


def test_go_binary_and_other_ecosystems(tmp_path: Path) -> None:
    go = write_blob(tmp_path, scanimages.go_entries(), "zstd")
    npm = write_blob(tmp_path, scanimages.npm_entries())
    index = _index(go, npm)
    golang = {p.name: p for p in index.packages if p.type == "golang"}
    assert golang["github.com/anchore/syft"].version == "v1.18.1"  # from -ldflags
    assert golang["stdlib"].version.startswith("go1.")
    assert golang["stdlib"].purl == "pkg:golang/stdlib@" + golang["stdlib"].version[2:]
    assert {p.path for p in golang.values()} == {"usr/local/bin/syft"}
    assert {p.layer for p in golang.values()} == {go.digest}
    npms = [p for p in index.packages if p.type == "npm"]
    assert any(p.name == "semver" and "node_modules" in p.path for p in npms)
    # the lock's semver is the installed one: listed once; left-pad only in the lock
    assert [p.path for p in npms if p.name == "left-pad"] == ["srv/app/package-lock.json"]
    semver = [p for p in npms if p.name == "semver" and p.path == "srv/app/package-lock.json"]
    assert semver == []


def test_not_a_tar_and_corrupt_layers_raise_scan_error(tmp_path: Path) -> None:
    good = write_blob(tmp_path, [file("a", b"1")])
    with pytest.raises(ScanError, match=r"layer 2 \(sha256:0+\)"):
        index_image([good.layer(), _raw_layer(b"this is not a tar archive" * 40)])
    with pytest.raises(ScanError, match="layer 1"):
        index_image([_raw_layer(b"\x1f\x8b" + b"\x00" * 100)])  # gzip magic, corrupt stream
    big = write_blob(tmp_path, [file("a", bytes(range(256)) * 4000)])
    with pytest.raises(ScanError, match="not a readable tar layer"):
        index_image([_raw_layer(big.path.read_bytes()[:-2000])])  # cut gzip stream


def test_limits(tmp_path: Path) -> None:
    many = write_blob(tmp_path, [file(f"f{i}", b"") for i in range(50)])
    with pytest.raises(ScanError, match="max_entries"):
        _index(many, limits=IndexLimits(max_entries=49))
    index = _index(many, limits=IndexLimits(max_files=10))
    assert len(index.files) == 10 and index.files_truncated
    with pytest.raises(ScanError, match="max_bytes"):
        _index(many, limits=IndexLimits(max_bytes=10_000))
    big = write_blob(tmp_path, [file(STATUS, b"Package: x\n" * 1000)])
    with pytest.raises(ScanError, match="max_record_bytes"):
        _index(big, limits=IndexLimits(max_record_bytes=1000))
    deep = write_blob(tmp_path, [file("/".join(["d"] * 20), b"")])
    with pytest.raises(ScanError, match="max_depth"):
        _index(deep, limits=IndexLimits(max_depth=10))
    with pytest.raises(ScanError, match="max_packages"):
        _index(
            write_blob(tmp_path, scanimages.debian_entries()), limits=IndexLimits(max_packages=5)
        )


def test_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * 300_000}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ScanError, match="max_header_bytes"):
        index_image([_raw_layer(buf.getvalue())], IndexLimits(max_header_bytes=100_000))


def test_hostile_names_stay_inside_the_tree(tmp_path: Path) -> None:
    blob = write_blob(
        tmp_path, [file("../../etc/os-release", b"ID=evil\nVERSION_ID=1\n"), file("./x/./y", b"")]
    )
    index = _index(blob)
    assert index.os is not None and index.os.id == "evil"  # clamped to the image's /etc
    assert [f.path for f in index.files] == ["etc", "etc/os-release", "x", "x/y"]
