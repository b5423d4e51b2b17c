"""OSV advisories (schema 1.x): what skyreg keeps of a record, and reading OSV's exports.

`parse_advisory` turns one JSON record into an `Advisory` or raises `OsvError`; every bound is
checked before anything is kept, because the text ends up in SQL rows and API answers: sizes,
counts, printable ASCII ids, no NUL and no lone surrogates. `read_source` walks an export (OSV's
`<Ecosystem>/all.zip` or a directory of `*.json`) and yields an `OsvError` naming the member for
each bad record instead of stopping, so a caller can count and report them.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import msgspec
from cvss import CVSS2, CVSS3, CVSS4, CVSSError

from .model import SEVERITIES

__all__ = [
    "Advisory",
    "Affected",
    "Event",
    "OsvError",
    "Range",
    "parse_advisory",
    "read_source",
    "severity_of_score",
]

MAX_DOCUMENT = 8 << 20
MAX_AFFECTED = 10_000
MAX_VERSIONS = 100_000  # explicit versions over all of a record's affected entries
MAX_EVENTS = 10_000  # per range
MAX_LIST = 10_000  # aliases, severity entries, ranges per affected
MAX_STRING = 4096
MAX_SUMMARY = 1024
MAX_ID = 256
MAX_MEMBERS = 1_000_000  # records in one export; OSV's biggest ecosystem holds ~100k
MAX_RATIO = 200  # uncompressed/compressed for a zip member over RATIO_FLOOR bytes
RATIO_FLOOR = 1 << 20


class OsvError(ValueError):
    """A record (or an export) that skyreg refuses; `name` says which one ("" if unknown)."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(f"{name}: {message}" if name else message)
        self.name = name
        self.reason = message


class Event(msgspec.Struct, frozen=True):
    """One OSV range event: exactly one of the four is set."""

    introduced: str = ""
    fixed: str = ""
    last_affected: str = ""
    limit: str = ""


class Range(msgspec.Struct, frozen=True):
    """An ECOSYSTEM or SEMVER range (GIT ranges are dropped on parsing: nothing installed has a
    commit to compare)."""

    type: str
    events: tuple[Event, ...]


class Affected(msgspec.Struct, frozen=True):
    """One affected package of an advisory, in its OSV ecosystem ("Debian:12")."""

    ecosystem: str
    name: str
    ranges: tuple[Range, ...] = ()
    versions: tuple[str, ...] = ()


class Advisory(msgspec.Struct, frozen=True):
    """What skyreg keeps of an OSV record."""

    id: str
    modified: str
    aliases: tuple[str, ...]
    summary: str
    severity: str  # one of SEVERITIES
    score: float | None  # highest CVSS base score of the record's vectors
    affected: tuple[Affected, ...]
    withdrawn: str = ""


# --- the wire shape: only the fields skyreg reads, types checked by msgspec --------------------

_Id = Annotated[str, msgspec.Meta(pattern=r"^[\x21-\x7e]+$", max_length=MAX_ID)]
_Str = Annotated[str, msgspec.Meta(max_length=MAX_STRING)]


class _WEvent(msgspec.Struct):
    introduced: _Str | None = None
    fixed: _Str | None = None
    last_affected: _Str | None = None
    limit: _Str | None = None


class _WRange(msgspec.Struct):
    type: _Str
    events: Annotated[list[_WEvent], msgspec.Meta(max_length=MAX_EVENTS)] = []


class _WPackage(msgspec.Struct):
    ecosystem: _Str
    name: _Str


class _WSeverity(msgspec.Struct):
    type: _Str
    score: _Str


class _WAffected(msgspec.Struct):
    package: _WPackage | None = None
    ranges: Annotated[list[_WRange], msgspec.Meta(max_length=MAX_LIST)] = []
    versions: Annotated[list[_Str], msgspec.Meta(max_length=MAX_VERSIONS)] = []
    severity: Annotated[list[_WSeverity], msgspec.Meta(max_length=MAX_LIST)] = []
    # Free-form objects: read lazily, only for a "severity" word.
    ecosystem_specific: msgspec.Raw = msgspec.Raw()
    database_specific: msgspec.Raw = msgspec.Raw()


class _WRecord(msgspec.Struct):
    id: _Id
    modified: _Str
    schema_version: _Str = ""
    withdrawn: _Str | None = None
    aliases: Annotated[list[_Id], msgspec.Meta(max_length=MAX_LIST)] | None = None
    upstream: Annotated[list[_Id], msgspec.Meta(max_length=MAX_LIST)] | None = None
    summary: _Str | None = None
    details: str | None = None  # only its start is kept, when there is no summary
    severity: Annotated[list[_WSeverity], msgspec.Meta(max_length=MAX_LIST)] | None = None
    affected: Annotated[list[_WAffected], msgspec.Meta(max_length=MAX_AFFECTED)] | None = None
    database_specific: msgspec.Raw = msgspec.Raw()


class _WSeverityWord(msgspec.Struct):
    severity: str | None = None


_record_decoder = msgspec.json.Decoder(_WRecord)
_word_decoder = msgspec.json.Decoder(_WSeverityWord)

# Words databases use, to Trivy's.
_WORDS = {
    "CRITICAL": "CRITICAL",
    "HIGH": "HIGH",
    "IMPORTANT": "HIGH",  # Red Hat, AlmaLinux, Rocky
    "MODERATE": "MEDIUM",  # GHSA, Red Hat
    "MEDIUM": "MEDIUM",
    "LOW": "LOW",
    "NEGLIGIBLE": "LOW",  # Ubuntu
    "UNIMPORTANT": "LOW",  # Debian
}


def severity_of_score(score: float) -> str:
    """CVSS base score to a severity word (CVSS v3 bands; 0.0 is "UNKNOWN")."""
    if score >= 9.0:
        return "CRITICAL"
    if score >= 7.0:
        return "HIGH"
    if score >= 4.0:
        return "MEDIUM"
    if score > 0.0:
        return "LOW"
    return "UNKNOWN"


def _cvss_score(kind: str, vector: str) -> float | None:
    try:
        if kind == "CVSS_V4" or vector.startswith("CVSS:4"):
            return float(CVSS4(vector).base_score)
        if kind == "CVSS_V3" or vector.startswith("CVSS:3"):
            base: Decimal = CVSS3(vector).scores()[0]
            return float(base)
        if kind == "CVSS_V2":
            return float(CVSS2(vector).scores()[0])
    except (CVSSError, ValueError, KeyError, IndexError, TypeError, ArithmeticError):
        return None
    return None


def _word(raw: msgspec.Raw) -> str:
    if not raw:
        return ""
    try:
        found = _word_decoder.decode(raw).severity
    except (msgspec.DecodeError, RecursionError):
        return ""
    return _WORDS.get((found or "").strip().upper(), "")


def _worst(words: list[str]) -> str:
    known = [w for w in words if w in SEVERITIES and w != "UNKNOWN"]
    return min(known, key=SEVERITIES.index) if known else "UNKNOWN"


def _severity(rec: _WRecord) -> tuple[str, float | None]:
    entries = list(rec.severity or [])
    for aff in rec.affected or []:
        entries.extend(aff.severity)
    scores = [
        s
        for e in entries
        if e.type.startswith("CVSS_") and (s := _cvss_score(e.type, e.score)) is not None
    ]
    if scores:
        score = max(scores)
        word = severity_of_score(score)
        if word != "UNKNOWN":
            return word, score
    else:
        score = None
    words = [_WORDS.get(e.score.strip().upper(), "") for e in entries if e.type == "Ubuntu"]
    words.append(_word(rec.database_specific))
    for aff in rec.affected or []:
        words.append(_word(aff.ecosystem_specific))
        words.append(_word(aff.database_specific))
    return _worst(words), score


def _check_text(rec: _WRecord) -> None:
    """No NUL anywhere skyreg keeps (PostgreSQL text refuses it); msgspec already refuses lone
    surrogates and invalid UTF-8."""
    texts: list[str] = [rec.id, rec.modified, rec.withdrawn or "", rec.summary or ""]
    texts.extend(rec.aliases or [])
    texts.extend(rec.upstream or [])
    for aff in rec.affected or []:
        if aff.package is not None:
            texts += (aff.package.ecosystem, aff.package.name)
        texts.extend(aff.versions)
        for r in aff.ranges:
            for e in r.events:
                texts += (e.introduced or "", e.fixed or "", e.last_affected or "", e.limit or "")
    if any("\x00" in t for t in texts):
        raise OsvError("NUL character in a kept string")


def _summary(rec: _WRecord) -> str:
    text = (rec.summary or "").strip()
    if not text and rec.details:
        text = rec.details.strip().split("\n\n", 1)[0]
    text = text.replace("\x00", "")
    return re.sub(r"\s+", " ", text)[:MAX_SUMMARY]


def _event(e: _WEvent) -> Event:
    values = [v for v in (e.introduced, e.fixed, e.last_affected, e.limit) if v is not None]
    if len(values) != 1 or not values[0]:
        raise OsvError("a range event must set exactly one non-empty field")
    return Event(
        introduced=e.introduced or "",
        fixed=e.fixed or "",
        last_affected=e.last_affected or "",
        limit=e.limit or "",
    )


def _affected(aff: _WAffected) -> Affected | None:
    if aff.package is None:  # GIT-only entries name a repository, not a package
        return None
    ranges = tuple(
        Range(type=r.type, events=tuple(_event(e) for e in r.events))
        for r in aff.ranges
        if r.type != "GIT"
    )
    return Affected(
        ecosystem=aff.package.ecosystem,
        name=aff.package.name,
        ranges=ranges,
        versions=tuple(aff.versions),
    )


def parse_advisory(raw: bytes) -> Advisory:
    """One OSV JSON record as skyreg keeps it; `OsvError` if out of bounds or ill-typed."""
    if len(raw) > MAX_DOCUMENT:
        raise OsvError(f"record of {len(raw)} bytes is over {MAX_DOCUMENT}")
    try:
        rec = _record_decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise OsvError(f"not an OSV record: {e}") from None
    except msgspec.DecodeError as e:
        raise OsvError(f"not JSON: {e}") from None
    except RecursionError:
        raise OsvError("nested too deeply") from None
    if sum(len(a.versions) for a in rec.affected or []) > MAX_VERSIONS:
        raise OsvError(f"more than {MAX_VERSIONS} explicit versions")
    _check_text(rec)
    severity, score = _severity(rec)
    affected = tuple(a for w in rec.affected or [] if (a := _affected(w)) is not None)
    return Advisory(
        id=rec.id,
        modified=rec.modified,
        # Debian's DEBIAN-CVE records name their CVE in `upstream` (schema 1.6), not `aliases`.
        aliases=tuple(dict.fromkeys([*(rec.aliases or []), *(rec.upstream or [])])),
        summary=_summary(rec),
        severity=severity,
        score=score,
        affected=affected,
        withdrawn=rec.withdrawn or "",
    )


# --- exports ------------------------------------------------------------------------------------


def _parse_named(raw: bytes, name: str) -> Advisory | OsvError:
    try:
        return parse_advisory(raw)
    except OsvError as e:
        return OsvError(e.reason, name)


def _central_entries(path: Path, limit: int) -> int:
    """How many entries a zip's central directory holds (counted up to `limit + 1`), walked
    before `ZipFile` parses it whole into objects: it reads entries up to the directory's
    declared size, whatever count the end record declares. 0 when no end record is found
    (`ZipFile` then refuses the file)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (22 + 0xFFFF + 20)))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0
        cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
        cd_offset = int.from_bytes(tail[at + 16 : at + 20], "little")
        locator = at - 20
        if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                cd_size = int.from_bytes(record[40:48], "little")
                cd_offset = int.from_bytes(record[48:56], "little")
        f.seek(cd_offset)
        count = walked = 0
        while walked + 46 <= cd_size and count <= limit:
            fixed = f.read(46)
            if len(fixed) < 46 or fixed[:4] != b"PK\x01\x02":
                break
            extra = sum(int.from_bytes(fixed[i : i + 2], "little") for i in (28, 30, 32))
            f.seek(extra, os.SEEK_CUR)
            walked += 46 + extra
            count += 1
        return count


def _read_zip(path: Path) -> Iterator[Advisory | OsvError]:
    try:
        entries = _central_entries(path, MAX_MEMBERS)
    except OSError as e:
        raise OsvError(f"not a readable zip: {e}", str(path)) from None
    if entries > MAX_MEMBERS:
        raise OsvError(f"more than {MAX_MEMBERS} members", str(path))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise OsvError(f"not a readable zip: {e}", str(path)) from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_MEMBERS:
            raise OsvError(f"{len(members)} members, over {MAX_MEMBERS}", str(path))
        for m in members:
            if not m.filename.endswith(".json"):
                continue
            if m.file_size > MAX_DOCUMENT:
                yield OsvError(f"member of {m.file_size} bytes is over {MAX_DOCUMENT}", m.filename)
                continue
            if m.file_size > RATIO_FLOOR and m.file_size > MAX_RATIO * max(m.compress_size, 1):
                yield OsvError("compression ratio over bound (zip bomb?)", m.filename)
                continue
            try:
                with zf.open(m) as f:
                    # The header's size may lie: never read past the bound.
                    raw = f.read(MAX_DOCUMENT + 1)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as e:
                yield OsvError(f"unreadable member: {e}", m.filename)
                continue
            if len(raw) > MAX_DOCUMENT:
                yield OsvError(f"member is over {MAX_DOCUMENT} bytes", m.filename)
                continue
            yield _parse_named(raw, m.filename)


def _read_dir(root: Path) -> Iterator[Advisory | OsvError]:
    seen = 0
    # followlinks=False and O_NOFOLLOW: nothing outside `root` is read through a symlink.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            if not fname.endswith(".json"):
                continue
            seen += 1
            if seen > MAX_MEMBERS:
                raise OsvError(f"more than {MAX_MEMBERS} records", str(root))
            full = os.path.join(dirpath, fname)
            name = os.path.relpath(full, root)
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as e:
                yield OsvError(f"unreadable: {e.strerror}", name)
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    yield OsvError("not a regular file", name)
                    continue
                raw = f.read(MAX_DOCUMENT + 1)
            if len(raw) > MAX_DOCUMENT:
                yield OsvError(f"file is over {MAX_DOCUMENT} bytes", name)
                continue
            yield _parse_named(raw, name)


def read_source(path: Path) -> Iterator[Advisory | OsvError]:
    """Every record of an OSV export: a zip as OSV publishes (`<Ecosystem>/all.zip`) or a directory
    of `*.json` (recursive). Bad records come out as `OsvError` (with `.name`) in their place;
    an export that cannot be read at all raises `OsvError`."""
    if path.is_dir() and not path.is_symlink():
        return _read_dir(path)
    if path.is_file():
        return _read_zip(path)
    raise OsvError("neither a zip nor a directory", str(path))
