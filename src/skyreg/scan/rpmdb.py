"""RPM packages from an SQLite rpm database (`rpmdb.sqlite`, RHEL/Rocky/Alma 9, Fedora >= 33).

The database is loaded from bytes with `sqlite3.Connection.deserialize` (never written to disk)
and each row of `Packages` is an RPM header blob, parsed here with bounds on every count and
offset. The Berkeley DB (`Packages`, RHEL <= 8) and NDB (`Packages.db`, SUSE) formats are
skipped: they need their own page-level parsers.
"""

from __future__ import annotations

import sqlite3
import struct

from skyreg.scan.model import RPM, Package

NAME, VERSION, RELEASE, EPOCH, LICENSE, ARCH, SOURCERPM = 1000, 1001, 1002, 1003, 1014, 1022, 1044
_WANTED = frozenset({NAME, VERSION, RELEASE, EPOCH, LICENSE, ARCH, SOURCERPM})
_INT32, _STRING, _STRING_ARRAY, _I18NSTRING = 4, 6, 8, 9
_MAX_TAGS = 0xFFFF  # rpm's own bound on the index entries of one header
_MAX_STRING = 64 * 1024
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MAX_VM_STEPS = 50_000_000  # SQLite VM instructions for reading one database (~1 s)
_STEPS_PER_CALL = 10_000


class RpmDbError(ValueError):
    """The bytes are not a readable SQLite rpm database."""


def parse_rpmdb_sqlite(data: bytes, *, layer: str, path: str, max_packages: int) -> list[Package]:
    """The packages of an `rpmdb.sqlite`; headers that cannot be parsed are skipped."""
    if not data.startswith(_SQLITE_MAGIC) or len(data) < 100:
        raise RpmDbError("not an SQLite database")
    # A WAL-mode database (bytes 18-19 = 2) cannot be opened from memory: read it as a
    # rollback-journal one (the -wal file is not in the image's committed state anyway).
    buf = bytearray(data)
    buf[18:20] = b"\x01\x01"
    found: list[Package] = []
    conn = sqlite3.connect(":memory:")
    # The database is the image's: its `Packages` may be a view or have generated columns that
    # compute without end or make giant values. No value may be longer than the database
    # itself, and the query gets a budget of SQLite VM steps.
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(len(data), 1 << 20))
    steps = [0]

    def budget() -> int:
        steps[0] += 1
        return int(steps[0] > _MAX_VM_STEPS // _STEPS_PER_CALL)

    conn.set_progress_handler(budget, _STEPS_PER_CALL)
    try:
        conn.deserialize(bytes(buf))
        rows = conn.execute("SELECT blob FROM Packages")
        for seen, (blob,) in enumerate(rows):
            if seen > 2 * max_packages + 1000:  # rows that are not packages count too
                raise RpmDbError(f"more than {2 * max_packages + 1000} rows in Packages")
            if not isinstance(blob, bytes):
                continue
            tags = parse_header(blob)
            package = _package(tags, layer=layer, path=path)
            if package is not None:
                found.append(package)
                if len(found) > max_packages:
                    raise RpmDbError(f"more than {max_packages} packages")
    except sqlite3.Error as e:
        raise RpmDbError(f"unreadable rpm database: {e}") from e
    finally:
        conn.close()
    return found


def parse_header(blob: bytes) -> dict[int, str | int]:
    """The wanted tags of one RPM header blob (index count, data length, index, data store);
    {} when the blob is malformed. Strings are decoded as UTF-8 with replacement."""
    if len(blob) < 8:
        return {}
    count, size = struct.unpack_from(">II", blob, 0)
    store = 8 + 16 * count
    if count > _MAX_TAGS or store + size > len(blob):
        return {}
    tags: dict[int, str | int] = {}
    for i in range(count):
        tag, kind, offset, n = struct.unpack_from(">IIiI", blob, 8 + 16 * i)
        if tag not in _WANTED or offset < 0 or offset >= size or n < 1:
            continue
        at = store + offset
        if kind == _INT32:
            if offset + 4 <= size:
                tags[tag] = struct.unpack_from(">i", blob, at)[0]
        elif kind in (_STRING, _STRING_ARRAY, _I18NSTRING):
            end = blob.find(b"\x00", at, min(store + size, at + _MAX_STRING))
            if end >= 0:
                tags[tag] = blob[at:end].decode("utf-8", "replace")
    return tags


def _package(tags: dict[int, str | int], *, layer: str, path: str) -> Package | None:
    name, version, release = tags.get(NAME), tags.get(VERSION), tags.get(RELEASE)
    if not isinstance(name, str) or not isinstance(version, str) or not name:
        return None
    if name == "gpg-pubkey":  # imported signing keys, not packages (syft skips them too)
        return None
    full = f"{version}-{release}" if isinstance(release, str) and release else version
    epoch = tags.get(EPOCH)
    if isinstance(epoch, int):
        full = f"{epoch}:{full}"
    arch = tags.get(ARCH)
    source_rpm = tags.get(SOURCERPM)
    source = source_version = ""
    if isinstance(source_rpm, str) and source_rpm.endswith(".src.rpm"):
        # name-version-release.src.rpm
        parts = source_rpm.removesuffix(".src.rpm").rsplit("-", 2)
        if len(parts) == 3:
            source, source_version = parts[0], f"{parts[1]}-{parts[2]}"
    lic = tags.get(LICENSE)
    return Package(
        name=name,
        version=full,
        type=RPM,
        purl="",
        layer=layer,
        path=path,
        source=source,
        source_version=source_version,
        arch=arch if isinstance(arch, str) else "",
        licenses=(lic,) if isinstance(lic, str) and lic else (),
    )
