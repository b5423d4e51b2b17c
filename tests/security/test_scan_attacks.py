"""A hostile tenant against image scans (issue 15): other tenants' scans stay out of reach, and
no image (bombs, lying headers, hostile package databases) hurts the server or the queue.

Unit-level attacks call `index_image` with small limits; the end-to-end ones push through a
real in-process server and its scan worker."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import socket
import threading
import time
import tracemalloc
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests

from skyreg.meta.scans import pack
from skyreg.oci.digest import Digest
from skyreg.scan import rpmdb
from skyreg.scan.index import IndexLimits, ScanError, index_image
from skyreg.scan.osv import OsvError, read_source
from skyreg.scan.sbom import SbomError, cyclonedx_json, spdx_json
from skyreg.services.scans import ScanService
from tests.support import hostilelayers as h
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import image_manifest, push_blob, put_manifest
from tests.support.platform import Tenancy, api, refused
from tests.support.waiting import wait_for

SMALL = IndexLimits(
    max_files=1000,
    max_entries=5000,
    max_bytes=32 << 20,
    max_record_bytes=1 << 20,
    max_binary_bytes=4 << 20,
    max_packages=2000,
    max_header_bytes=64 << 10,
)


def _fails(data: bytes | Any, reason: str, limits: IndexLimits = SMALL) -> str:
    """The layer fails its scan naming `reason` (the bound it hit: no timing is asserted; an
    unbounded read would run into the suite's per-test timeout)."""
    with pytest.raises(ScanError) as caught:
        index_image([h.layer(data)], limits)
    assert reason in str(caught.value), caught.value
    return str(caught.value)


# -- bombs and lying tar headers -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [h.gzip_stream, h.zstd_stream])
def test_compression_bomb_stops_at_the_byte_limit(stream: Any) -> None:
    blob = stream([h.header("big", 256 << 20), (256 << 20,), h.end()])
    assert len(blob) < 2 << 20  # tiny blob, 256 MiB of output
    _fails(blob, "limit max_bytes")


def test_plain_tar_of_zeros_ends_at_its_first_zero_block() -> None:
    reader = h.ZeroTail(h.member("a", b"x"), 1 << 40)
    index = index_image([h.layer(lambda: io.BufferedReader(reader))], SMALL)
    assert [f.path for f in index.files] == ["a"]
    assert reader.served < 1 << 20


def test_many_tiny_entries_stop_at_the_entry_limit() -> None:
    blob = h.gzip_stream([b"".join(h.member(f"d/{i}") for i in range(6000)), h.end()])
    _fails(blob, "limit max_entries")


def test_many_entries_under_the_limits_keep_a_bounded_file_list() -> None:
    blob = b"".join(h.member(f"d/{i}") for i in range(3000)) + h.end()
    index = index_image([h.layer(blob)], SMALL)
    assert index.files_truncated and len(index.files) == SMALL.max_files


def test_huge_pax_header_is_refused_before_it_is_read() -> None:
    blob = h.pax_header({"comment": "x" * (1 << 20)}) + h.end()
    _fails(blob, "limit max_header_bytes")


def test_chained_pax_headers_are_bounded() -> None:
    one = h.pax_header({"comment": "x" * 100}, name="f")[:-BLOCK_OF_MEMBER]
    _fails(one * 20 + h.member("f") + h.end(), "extended headers")


BLOCK_OF_MEMBER = 512  # the ustar block after a pax header (kept out to chain headers)


def test_global_pax_headers_add_up() -> None:
    info = tarfile_global({"comment": "y" * 40_000})
    _fails(info * 3 + h.member("f") + h.end(), "limit max_header_bytes")


def tarfile_global(records: dict[str, str]) -> bytes:
    import tarfile

    g = tarfile.TarInfo()
    return g._create_pax_generic_header(records, tarfile.XGLTYPE, "utf-8")  # type: ignore[attr-defined,no-any-return]


def test_long_names_and_link_targets_are_bounded() -> None:
    _fails(h.member("a/" * 3000 + "b") + h.end(), "limit max_path_bytes")
    _fails(h.member("l", kind=b"2", linkname="x" * 5000) + h.end(), "limit max_path_bytes")


def test_deep_paths_are_bounded() -> None:
    _fails(h.member("d/" * 300 + "f") + h.end(), "limit max_depth")


def test_gnu_sparse_extension_chain_is_refused_not_kept() -> None:
    """tarfile keeps 21 pairs per 512-byte extension block: ~3x the stream in memory, up to
    max_bytes (16 GiB by default)."""
    blob = h.gnu_sparse_bomb(20_000)  # 10 MiB; made before counting
    tracemalloc.start()
    try:
        _fails(blob, "sparse")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_gnu_sparse_1_0_map_is_refused_not_kept() -> None:
    _fails(h.gnu_sparse10_bomb(200_000) + h.end(), "sparse")


def test_not_a_tar_fails_cleanly() -> None:
    """ScanError (the scan fails for good, with its reason), never another exception (those
    are retried as if the store had failed); all zeros is an empty tar."""
    for blob in (
        b"\x01garbage" * 100,
        b"hello world, not a tar at all" * 40,
        b"\x1f\x8b" + b"\xff" * 100,  # gzip magic, corrupt
        h.gzip_stream([h.member("a", b"x" * 5000)])[:60],  # cut short
        b"\x28\xb5\x2f\xfd" + b"\x00" * 100,  # zstd magic, corrupt
        h.member("a", b"x" * 5000)[:1000],  # a plain tar cut short
    ):
        with pytest.raises(ScanError):
            index_image([h.layer(blob)], SMALL)
    with pytest.raises(ScanError, match="empty file"):
        index_image([h.layer(b"")], SMALL)
    assert not index_image([h.layer(bytes(4096))], SMALL).files


def test_corrupt_numbers_in_a_header_fail_cleanly() -> None:
    raw = bytearray(h.header("a", 10))
    raw[124:136] = b"zzzzzzzzzzz\x00"  # size field
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    _fails(bytes(raw) + bytes(1024), "")


# -- os-release --------------------------------------------------------------------------------


def test_symlink_loops_around_os_release_end() -> None:
    blob = b"".join(
        [
            h.member("etc/os-release", kind=b"2", linkname="../usr/lib/os-release"),
            h.member("usr/lib/os-release", kind=b"2", linkname="/etc/os-release"),
            h.member("loop", kind=b"2", linkname="loop/loop"),
            h.member("etc/self", kind=b"2", linkname="."),
            h.member("usr/x", kind=b"2", linkname="/etc/self/self/self/os-release"),
            h.end(),
        ]
    )
    index = index_image([h.layer(blob)], SMALL)
    assert index.os is None
    # a chain of directory symlinks that fans out is still bounded by the hop count
    fan = b"".join(
        h.member(f"l{i}", kind=b"2", linkname=f"l{i + 1}/../l{i + 1}") for i in range(60)
    )
    fan += h.member("etc", kind=b"2", linkname="l0") + h.end()
    assert index_image([h.layer(fan)], SMALL).os is None


# -- package databases ---------------------------------------------------------------------------


def test_huge_dpkg_status_is_refused_at_its_header() -> None:
    reader = h.ZeroTail(h.header("var/lib/dpkg/status", 1 << 30), 1 << 30)
    _fails(lambda: io.BufferedReader(reader), "limit max_record_bytes", IndexLimits())
    assert reader.served < 16 << 20  # refused without reading the GiB


def test_dpkg_status_of_many_tiny_packages_stops_at_the_package_limit() -> None:
    status = b"".join(b"Package: p%d\nVersion: 1\n\n" % i for i in range(30_000))
    _fails(h.member("var/lib/dpkg/status", status[: 1 << 20]) + h.end(), "limit max_packages")


def test_control_characters_in_packages_still_give_valid_sboms() -> None:
    status = (
        b"Package: evil\x00name\x1b[31m\nVersion: 1.0\x00\x07-1\xff\xfe\nStatus: install ok "
        b"installed\nSource: s\x00rc (9\x01)\nArchitecture: amd64\n\n"
        b"Package: \xf0\x9f\x92\xa9\nVersion: \t\x7f\nStatus: install ok installed\n\n"
    )
    meta = b"Metadata-Version: 2.1\nName: a\x00b\xe2\x80\xae\nVersion: 1\x1b\nLicense: \x00\n\n"
    blob = b"".join(
        [
            h.member("etc/os-release", b'ID="deb\x00ian"\nVERSION_ID="1\x02"\n'),
            h.member("var/lib/dpkg/status", status),
            h.member("usr/lib/python3/x.dist-info/METADATA", meta),
            h.member("bad\x01name\x7f\xff"),
            h.end(),
        ]
    )
    index = index_image([h.layer(blob)], SMALL)
    assert len(index.packages) >= 2
    msgspec.json.decode(pack(index.files) and msgspec.json.encode(index))
    for render in (spdx_json, cyclonedx_json):
        try:
            document = render(index, "app", "sha256:" + "b" * 64, datetime.now(UTC))
        except SbomError:
            continue  # a clean refusal is allowed
        json.loads(document)


def test_non_utf8_names_can_be_stored() -> None:
    """A name that is not UTF-8 once came out with surrogate escapes, which JSON cannot hold:
    the worker's `finish` raised and the scan stayed `indexing` for half an hour."""
    pax = h.pax_header({"path": "p\udcff\udcfe"}, name="x")  # hdrcharset not set: raw bytes
    blob = (
        h.member("caf\udce9/\udcff")
        + h.member("usr/lib/python3/\udcff.dist-info/METADATA", b"Name: n\nVersion: 1\n\n")
        + pax
        + h.end()
    )
    index = index_image([h.layer(blob)], SMALL)
    assert pack(index.files) and pack(index.packages)
    assert all("\ufffd" in f.path for f in index.files if f.path.startswith(("caf", "p")))


def test_rpmdb_hostile_header_blobs_are_skipped() -> None:
    huge = 0xFFFFFFFF
    blobs = [
        h.rpm_header([(1000, 6, 0, 1)] * 3, b"\x00"),  # name empty
        b"\xff" * 8 + b"\x00" * 100,  # counts of 4 billion
        h.rpm_header([(1000, 6, 2**31 - 1, 1), (1001, 6, -5, 1)], b"x\x00"),  # offsets off
        h.rpm_header([(1000, 6, 0, huge), (1001, 4, 0, huge)], b"n" * 70_000 + b"\x00"),
        struct_count(0xFFFF),
        b"",
        h.rpm_header([(1000, 6, 0, 1), (1001, 6, 2, 1)], b"a\x00\xff\xfe\x00"),  # a real one
    ]
    found = rpmdb.parse_rpmdb_sqlite(h.rpmdb(blobs), layer="l", path="p", max_packages=10)
    assert [p.name for p in found] == ["a"]


def struct_count(count: int) -> bytes:
    return h.rpm_header([(1000, 6, 0, 1)] * count, b"z\x00")


def _ends_within(seconds: float, fn: Any) -> Any:
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = fn()
        except Exception as e:
            done["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return done


def test_rpmdb_packages_view_that_never_ends_is_stopped() -> None:
    """A 4 KiB valid database whose `Packages` is an endless recursive view."""
    data = h.rpmdb(
        schema="CREATE VIEW Packages AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL "
        "SELECT x + 1 FROM n) SELECT x'00000000' AS blob FROM n;"
    )
    done = _ends_within(
        20, lambda: rpmdb.parse_rpmdb_sqlite(data, layer="l", path="p", max_packages=10)
    )
    assert isinstance(done.get("error"), rpmdb.RpmDbError), done


def test_rpmdb_generated_giant_blobs_are_refused() -> None:
    data = h.rpmdb(
        schema="CREATE TABLE Packages (hnum INTEGER, blob BLOB AS (zeroblob(900000000)) "
        "VIRTUAL); INSERT INTO Packages (hnum) VALUES (1), (2), (3);"
    )
    with pytest.raises(rpmdb.RpmDbError):
        rpmdb.parse_rpmdb_sqlite(data, layer="l", path="p", max_packages=10)


def test_rpmdb_in_a_layer_fails_the_scan_cleanly() -> None:
    data = h.rpmdb(
        schema="CREATE VIEW Packages AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL "
        "SELECT x + 1 FROM n) SELECT x'00' AS blob FROM n;"
    )
    blob = h.member("var/lib/rpm/rpmdb.sqlite", data) + h.end()
    done = _ends_within(20, lambda: index_image([h.layer(blob)], SMALL))
    assert isinstance(done.get("error"), ScanError), done


# -- Go build info ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version_len", "info_len", "body"),
    [
        (2**63, 2**63, b""),  # lengths far past the file
        (6, 2**40, b"go1.22" + b"mod\tx\tv1\n"),  # module info longer than everything
        (300, 10, b"go" * 150 + b"0123456789"),  # version over its bound
        (6, 20, b"go1.22"),  # cut short
        (0, 0, b""),
    ],
)
def test_fake_go_build_info_with_lying_lengths(
    version_len: int, info_len: int, body: bytes
) -> None:
    elf = h.fake_go_elf(version_len, info_len, body) + bytes(2 << 20)
    blob = h.member("usr/bin/evil", elf) + h.end()
    index = index_image([h.layer(blob)], SMALL)
    assert all(p.type == "golang" for p in index.packages)
    assert len(index.packages) <= 1


def test_go_magic_repeated_through_a_binary_is_bounded() -> None:
    magic = b"\xff Go buildinf:" + b"\x08\x00"  # pointer format, unaligned copies too
    elf = b"\x7fELF" + (magic + b"\x00" * 7) * 200_000
    index = index_image([h.layer(h.member("bin/x", elf) + h.end())], SMALL)
    assert [p for p in index.packages if p.type == "golang"] == []


# -- OSV exports (admin uploads, read with bounds) -------------------------------------------------


def test_osv_zip_bomb_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.json", b"{" + b" " * (7 << 20) + b"}")
        zf.writestr("b.json", b" " * (64 << 20))
    items = list(read_source(path))
    assert all(isinstance(i, OsvError) for i in items) and len(items) == 2


def test_osv_zip_with_2m_members_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    path.write_bytes(h.zip_many_members(2_000_000))
    with pytest.raises(OsvError, match="more than 1000000 members"):
        list(read_source(path))  # before: ZipFile made 2M ZipInfos first (~850 MB traced)


def test_osv_directory_symlinks_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "osv"
    (root / "sub").mkdir(parents=True)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"id": "X", "modified": "2026-01-01T00:00:00Z"}))
    (root / "sub" / "link.json").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)
    (root / "fifo.json").unlink(missing_ok=True)
    import os

    os.mkfifo(root / "fifo.json")
    items = list(read_source(root))
    assert all(isinstance(i, OsvError) for i in items), items
    with pytest.raises(OsvError):  # a file path is read as a zip
        list(read_source(root / "sub" / "link.json"))
    with pytest.raises(OsvError):
        list(read_source(root / "dirlink"))


# -- end to end: a real server, its worker, two orgs ----------------------------------------------

E2E_LIMITS = IndexLimits(max_bytes=64 << 20, max_entries=20_000, max_record_bytes=4 << 20)


def scan_service(reg: InProcessRegistry) -> ScanService:
    """The running server's ScanService (found among live objects by its blob store's root:
    the in-process server does not hand its services out)."""
    found = [
        o
        for o in gc.get_objects()
        if isinstance(o, ScanService)
        and Path(getattr(o.store, "root", "/nonexistent")).is_relative_to(reg.data_dir)
    ]
    assert len(found) == 1, found
    return found[0]


@dataclass
class Orgs:
    victim_org: str
    victim: str  # app
    victim_token: str
    attacker_org: str
    attacker: str  # app
    attacker_token: str
    admin: str


def _orgs(reg: InProcessRegistry) -> Orgs:
    t = Tenancy(reg.data_dir)
    vo, v, ao, a = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("vorg", "vapp", "aorg", "aapp"))
    t.org(vo)
    t.app(v, vo)
    t.org(ao)
    t.app(a, ao)
    return Orgs(
        vo, v, t.token("org", org=vo)[0], ao, a, t.token("org", org=ao)[0], t.admin_secret()
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("scanattacks") / "data", options={"scan_worker": True}
    )
    reg.start()
    scan_service(reg).limits = E2E_LIMITS
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def orgs(server: InProcessRegistry) -> Orgs:
    return _orgs(server)


def _push(reg: InProcessRegistry, token: str, repo: str, tag: str, layers: list[bytes]) -> str:
    session = requests.Session()
    session.auth = ("x", token)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "nonce": uuid.uuid4().hex,
        }
    ).encode()
    for blob in (config, *layers):
        push_blob(reg.url, repo, blob, session)
    manifest = image_manifest(config, layers)
    r = put_manifest(reg.url, repo, tag, manifest, session=session)
    assert r.status_code == 201, r.text
    return str(r.headers["Docker-Content-Digest"])


def _scan(reg: InProcessRegistry, token: str, app: str, image: str) -> dict[str, Any]:
    r = api(reg, "GET", f"/apps/{app}/vulns", token, params={"image": image})
    assert r.status_code == 200, r.text
    return dict(r.json()["scan"])


def _ended(reg: InProcessRegistry, token: str, app: str, image: str, seconds: float) -> Any:
    def check() -> dict[str, Any] | None:
        scan = _scan(reg, token, app, image)
        return scan if scan["state"] in ("done", "failed") else None

    return wait_for(check, f"scan of {image} ended", seconds)


def _ping(reg: InProcessRegistry) -> bool:
    """The server answers another client meanwhile (within the request's 10 s bound)."""
    r = requests.get(f"{reg.url}/v2/", timeout=10)
    return r.status_code in (200, 401)


def _ordinary_layer() -> bytes:
    return h.gzip_stream(
        [
            h.member("etc/os-release", b'ID=debian\nVERSION_ID="12"\n'),
            h.member(
                "var/lib/dpkg/status",
                b"Package: bash\nVersion: 5.2-1\nStatus: install "
                b"ok installed\n\n" + uuid.uuid4().hex.encode() + b": x\n",
            ),
            h.end(),
        ]
    )


@pytest.mark.slow
def test_hostile_images_end_and_the_server_and_queue_keep_going(
    server: InProcessRegistry, orgs: Orgs
) -> None:
    view = h.rpmdb(
        schema="CREATE VIEW Packages AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL "
        "SELECT x + 1 FROM n) SELECT x'00' AS blob FROM n;"
    )
    hostile = {
        "bomb": (h.zstd_stream([h.header("big", 1 << 30), (1 << 30,), h.end()]), "max_bytes"),
        "nottar": (b"this is not a tar" * 100, "not a readable tar"),
        "rpmview": (h.member("var/lib/rpm/rpmdb.sqlite", view) + h.end(), "rpmdb.sqlite"),
        "sparse": (h.gnu_sparse_bomb(2000), "sparse"),
        "latin1": (h.member("caf\udce9") + h.member("\udcff/x") + h.end(), ""),
        "paxbomb": (h.pax_header({"comment": "x" * (2 << 20)}) + h.end(), "max_header_bytes"),
    }
    started = time.monotonic()
    for tag, (blob, _) in hostile.items():
        _push(server, orgs.attacker_token, orgs.attacker, tag, [blob])
    ordinary = _push(server, orgs.victim_token, orgs.victim, "ok", [_ordinary_layer()])
    pings = [_ping(server)]
    ends: dict[str, dict[str, Any]] = {}
    while len(ends) < len(hostile) and time.monotonic() - started < 60:
        pings.append(_ping(server))
        for tag in hostile:
            if tag not in ends:
                scan = _scan(server, orgs.attacker_token, orgs.attacker, tag)
                if scan["state"] in ("done", "failed"):
                    ends[tag] = scan
        time.sleep(0.2)
    assert set(ends) == set(hostile), {
        t: _scan(server, orgs.attacker_token, orgs.attacker, t) for t in hostile
    }
    for tag, (_, reason) in hostile.items():
        if tag == "latin1":
            assert ends[tag]["state"] == "done", ends[tag]
        else:
            assert ends[tag]["state"] == "failed" and reason in ends[tag]["error"], ends[tag]
    assert all(pings), pings
    done = _ended(server, orgs.victim_token, orgs.victim, "ok", 30)
    assert done["state"] == "done" and done["packages"] == 1, done
    assert done["digest"] == ordinary


@pytest.mark.slow
def test_a_layer_missing_from_the_store_is_retried_not_stuck(
    server: InProcessRegistry, orgs: Orgs
) -> None:
    layer = _ordinary_layer()
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    session = requests.Session()
    session.auth = ("x", orgs.attacker_token)
    push_blob(server.url, orgs.attacker, layer, session)
    service = scan_service(server)
    path = service.store.local_path(Digest.parse(digest))
    assert path is not None
    path.unlink()  # linked to the repository, gone from the store
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": uuid.uuid4().hex}).encode()
    push_blob(server.url, orgs.attacker, config, session)
    r = put_manifest(
        server.url, orgs.attacker, "missing", image_manifest(config, [layer]), session=session
    )
    assert r.status_code == 201, r.text

    def errored() -> dict[str, Any] | None:
        scan = _scan(server, orgs.attacker_token, orgs.attacker, "missing")
        return scan if scan["error"] else None

    scan = wait_for(errored, "the missing layer noticed", 20)
    assert "FileNotFoundError" in scan["error"] or "no longer" in scan["error"], scan
    assert scan["state"] in ("queued", "failed"), scan  # queued: tried again after 1 min
    _push(server, orgs.victim_token, orgs.victim, "after-missing", [_ordinary_layer()])
    assert _ended(server, orgs.victim_token, orgs.victim, "after-missing", 30)["state"] == "done"


def _not_found(r: requests.Response) -> str:
    return refused(r, 404, "not_found")


@pytest.mark.slow
def test_another_org_learns_nothing_of_an_app_s_scans(
    server: InProcessRegistry, orgs: Orgs
) -> None:
    digest = _push(server, orgs.victim_token, orgs.victim, "secret", [_ordinary_layer()])
    assert _ended(server, orgs.victim_token, orgs.victim, "secret", 30)["state"] == "done"
    r = api(
        server,
        "POST",
        f"/apps/{orgs.victim}/releases",
        orgs.victim_token,
        json={"image": f"{orgs.victim}@{digest}"},
    )
    assert r.status_code == 201, r.text
    _push(server, orgs.attacker_token, orgs.attacker, "mine", [_ordinary_layer()])
    v, a, tok = orgs.victim, orgs.attacker, orgs.attacker_token
    missing_app = "nope" + uuid.uuid4().hex[:8]
    for kind in ("vulns", "sbom", "files"):
        want = _not_found(api(server, "GET", f"/apps/{missing_app}/{kind}", tok))
        for params in ({}, {"image": "secret"}, {"image": digest}, {"platform": "linux/amd64"}):
            got = _not_found(api(server, "GET", f"/apps/{v}/{kind}", tok, params=params))
            assert got.replace(v, missing_app) == want, (kind, params, got)
        # through the attacker's own app: the victim's repository named every way
        nowhere = _not_found(
            api(server, "GET", f"/apps/{a}/{kind}", tok, params={"image": "sha256:" + "0" * 64})
        )
        for image in (
            f"{v}:secret",
            f"{v}@{digest}",
            digest,
            f"../{v}:secret",
            f"{a}/../{v}:secret",
            f"{a}/../{v}@{digest}",
            f"%2e%2e%2f{v}:secret",
            f"{a}%2f..%2f{v}:secret",
            f"/{v}:secret",
            f"{v}/:secret",
            f"{a}/{v}:secret",
            f" {v}:secret",
            f"{v.upper()}:secret",
            f"{a}:../{v}:secret",
            f"{a}@{v}@{digest}",
            "secret",
        ):
            r = api(server, "GET", f"/apps/{a}/{kind}", tok, params={"image": image})
            assert r.status_code in (400, 404), (kind, image, r.status_code, r.text[:300])
            assert v not in r.text.replace(image[:200], ""), (kind, image, r.text[:300])
            if image == digest:  # no oracle: held elsewhere answers as held nowhere
                assert _not_found(r).replace(digest, "sha256:" + "0" * 64) == nowhere
        for platform in ("../../x", "linux/amd64/../../x", "a/b/c/d", "linux/amd64%00", "x" * 70):
            r = api(server, "GET", f"/apps/{v}/{kind}", tok, params={"platform": platform})
            assert r.status_code in (400, 404), (platform, r.status_code)
            assert "secret" not in r.text and digest not in r.text
    want = _not_found(api(server, "GET", f"/orgs/{missing_app}/vulnsummary", tok))
    got = _not_found(api(server, "GET", f"/orgs/{orgs.victim_org}/vulnsummary", tok))
    assert got.replace(orgs.victim_org, missing_app) == want
    # ... and the victim itself still sees its own
    own = api(server, "GET", f"/apps/{v}/files", orgs.victim_token)
    assert own.status_code == 200 and own.json()["digest"] == digest


@pytest.mark.slow
def test_sboms_go_only_to_the_image_s_repository(server: InProcessRegistry, orgs: Orgs) -> None:
    digest = _push(server, orgs.victim_token, orgs.victim, "sbom", [_ordinary_layer()])
    assert _ended(server, orgs.victim_token, orgs.victim, "sbom", 30)["state"] == "done"

    def referrers(repo: str, token: str) -> list[dict[str, Any]] | None:
        r = requests.get(
            f"{server.url}/v2/{repo}/referrers/{digest}", auth=("x", token), timeout=10
        )
        if r.status_code == 404:
            return []
        assert r.status_code == 200, r.text
        return list(r.json()["manifests"])

    wait_for(lambda: len(referrers(orgs.victim, orgs.victim_token) or ()) >= 2, "SBOMs", 30)
    assert referrers(orgs.attacker, orgs.attacker_token) == []
    other = Tenancy(server.data_dir)
    sibling = "vsib" + uuid.uuid4().hex[:8]
    other.app(sibling, orgs.victim_org)
    _push(server, orgs.victim_token, sibling, "unrelated", [_ordinary_layer()])
    assert referrers(sibling, orgs.victim_token) == []


# -- the OSV import: refused before its body is read ----------------------------------------------


def _raw_post(server: InProcessRegistry, token: str | None, length: int, body: bytes) -> bytes:
    """POST /api/v1/vulndb announcing `length` bytes and sending only `body`: the first bytes
    of the answer, which must come without the rest of the body."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /api/v1/vulndb HTTP/1.1\r\nHost: {server.host}\r\n{auth}"
        f"Content-Type: application/zip\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        sock.sendall(head + body)
        return sock.recv(4096)  # at once: waiting for the body would hit the socket's bound


@pytest.mark.slow
def test_vulndb_upload_is_refused_before_its_body(server: InProcessRegistry, orgs: Orgs) -> None:
    ten_gib = 10 << 30
    assert b" 401 " in _raw_post(server, None, ten_gib, b"PK" * 100).split(b"\r\n")[0]
    assert b" 403 " in _raw_post(server, orgs.attacker_token, ten_gib, b"PK").split(b"\r\n")[0]
    assert b" 403 " in _raw_post(server, orgs.attacker_token, 1 << 20, b"P").split(b"\r\n")[0]
    assert b" 413 " in _raw_post(server, orgs.admin, ten_gib, b"PK").split(b"\r\n")[0]
    assert _ping(server)


# -- one digest, two tenants ----------------------------------------------------------------------


def _run(reg: InProcessRegistry, coro: Any) -> Any:
    import asyncio

    assert reg._loop is not None
    return asyncio.run_coroutine_threadsafe(coro, reg._loop).result(60)


@pytest.mark.slow
def test_a_digest_another_tenant_pushed_and_deleted_does_not_fail_mine(
    tmp_path: Path,
) -> None:
    """The queue holds one row per digest, with the repository that pushed it first: an
    attacker who pushes a victim's (say, public) image and deletes it before the worker comes
    made the victim's scan fail for good: the scan moves to a repository still holding it."""
    reg = InProcessRegistry(data_dir=tmp_path / "data", options={"scan_worker": False})
    reg.start()
    try:
        o = _orgs(reg)
        layer = _ordinary_layer()
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
        manifest = image_manifest(config, [layer])
        for token, repo in ((o.attacker_token, o.attacker), (o.victim_token, o.victim)):
            session = requests.Session()
            session.auth = ("x", token)
            for blob in (config, layer):
                push_blob(reg.url, repo, blob, session)
            r = put_manifest(reg.url, repo, "base", manifest, session=session)
            assert r.status_code == 201, r.text
            digest = r.headers["Docker-Content-Digest"]
            if repo == o.attacker:
                r = session.delete(f"{reg.url}/v2/{repo}/manifests/{digest}")
                assert r.status_code == 202, r.text
        _run(reg, scan_service(reg).step())
        scan = _scan(reg, o.victim_token, o.victim, "base")
        assert scan["state"] == "done", scan
    finally:
        reg.stop()
