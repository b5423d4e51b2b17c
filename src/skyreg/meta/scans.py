"""Scans' metadata: the queue of image manifests to index, what each holds, its findings, and
the OSV advisories they are matched against.

A manifest that is an image (an image config and at least one layer, no subject) is queued in
the transaction that stores it (`enqueue_scan`, called by `RegistryMeta.put_manifest`): a crash
between the push and the scan loses nothing, and a digest pushed to several repositories is
indexed once. Workers take rows with `claim` (on PostgreSQL `FOR UPDATE SKIP LOCKED`; a claim
older than the stale bound is taken again: its worker died), store the index (`finish`) or the
failure (`fail`: queued again after a backoff, up to `MAX_ATTEMPTS`).

Advisories change under the scans: every import that changes one bumps `vulndb_state.generation`,
and a scan matched at an older generation is matched again (`to_match`, `store_findings`) from
its stored package list, without reading its layers.

Lists are stored zstd-compressed (msgspec JSON): a Debian image's file list is tens of
thousands of entries, a few hundred KiB compressed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import zstandard
from sqlalchemy import Connection, and_, delete, exists, func, or_, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.webhooks import SCAN_FINISHED, emit_for_repository
from skyreg.oci import mediatypes as mt
from skyreg.oci.manifest import Manifest
from skyreg.scan.model import SEVERITIES, FileEntry, Finding, ImageIndex, OsRelease, Package

QUEUED, INDEXING, DONE, FAILED = "queued", "indexing", "done", "failed"
MAX_ATTEMPTS = 3
IMAGE_CONFIGS = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
MAX_ERROR = 1000
MAX_LOOKUP_KEYS = 500  # (ecosystem, name) pairs per query
MAX_UNPACKED_LIST = 512 * 1024 * 1024  # bytes a stored list may inflate to

_sc, _adv, _vp, _vs = s.image_scans, s.vuln_advisories, s.vuln_packages, s.vulndb_state
_T = TypeVar("_T")


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def pack(value: object) -> bytes:
    """msgspec JSON, zstd-compressed: how lists are stored."""
    return zstandard.ZstdCompressor(level=3).compress(msgspec.json.encode(value))


def unpack(data: bytes, kind: type[_T]) -> _T:
    """The value `pack` stored; bounded, as if the row were hostile."""
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_UNPACKED_LIST)
    return msgspec.json.decode(raw, type=kind)


def scannable(manifest: Manifest) -> bool:
    """An image whose layers the indexer reads: not an index, not an artifact or a referrer."""
    return (
        manifest.media_type in mt.IMAGE_MANIFESTS
        and manifest.config is not None
        and manifest.config.media_type in IMAGE_CONFIGS
        and manifest.subject is None
        and bool(manifest.layers)
    )


def enqueue_scan(
    conn: Connection, insert_ignore: Any, digest: str, repository: str, region: str
) -> None:
    """Queue `digest` for indexing (nothing when it is queued or scanned already), inside the
    caller's transaction; `region` holds its blobs (the region the push landed in)."""
    conn.execute(
        insert_ignore(_sc).values(
            digest=digest,
            repository=repository,
            region=region,
            state=QUEUED,
            queued_at=_now(),
            attempts=0,
        )
    )


@dataclass(frozen=True)
class Claim:
    """A scan a worker took: index `digest`, reading its blobs in `repository`."""

    digest: str
    repository: str
    attempts: int  # this one included


@dataclass(frozen=True)
class ScanRecord:
    """One image's scan, without its lists."""

    digest: str
    repository: str
    state: str
    attempts: int
    error: str | None
    queued_at: datetime
    indexed_at: datetime | None
    os: OsRelease | None
    package_count: int | None
    file_count: int | None
    files_truncated: bool
    matched_generation: int
    matched_at: datetime | None
    severity_counts: dict[str, int] | None


@dataclass(frozen=True)
class VulnDbStatus:
    generation: int
    advisories: int
    imported_at: datetime | None
    source: str | None


@dataclass(frozen=True)
class AdvisoryRow:
    """An advisory to store: its id, OSV `modified`, the record skyreg keeps (msgspec JSON) and
    the (ecosystem, package name) pairs it names."""

    id: str
    modified: str
    record: bytes
    keys: frozenset[tuple[str, str]]


def severity_counts(findings: Iterable[Finding]) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        counts[f.severity if f.severity in counts else "UNKNOWN"] += 1
    return counts


_RECORD_COLUMNS = (
    _sc.c.digest,
    _sc.c.repository,
    _sc.c.state,
    _sc.c.attempts,
    _sc.c.error,
    _sc.c.queued_at,
    _sc.c.indexed_at,
    _sc.c.os,
    _sc.c.package_count,
    _sc.c.file_count,
    _sc.c.files_truncated,
    _sc.c.matched_generation,
    _sc.c.matched_at,
    _sc.c.severity_counts,
)


def _record(row: Any) -> ScanRecord:
    return ScanRecord(
        digest=row.digest,
        repository=row.repository,
        state=row.state,
        attempts=int(row.attempts),
        error=row.error,
        queued_at=_aware(row.queued_at) or _now(),
        indexed_at=_aware(row.indexed_at),
        os=msgspec.json.decode(row.os, type=OsRelease) if row.os else None,
        package_count=row.package_count,
        file_count=row.file_count,
        files_truncated=bool(row.files_truncated),
        matched_generation=int(row.matched_generation),
        matched_at=_aware(row.matched_at),
        severity_counts=json.loads(row.severity_counts) if row.severity_counts else None,
    )


class ScanMeta(SqlStore):
    """Queries of the scan queue, the scans and the vulnerability database."""

    # -- the queue ---------------------------------------------------------------------------

    def claim(self, stale_after: timedelta, region: str = "") -> Claim | None:
        """Take the oldest due scan of `region` (whose store holds its blobs): queued, or taken
        by a worker longer than `stale_after` ago; None when there is none."""

        def work(conn: Connection) -> Claim | None:
            now = _now()
            due = or_(
                and_(_sc.c.state == QUEUED, _sc.c.queued_at <= now),
                and_(_sc.c.state == INDEXING, _sc.c.claimed_at < now - stale_after),
            )
            query = select(_sc.c.digest, _sc.c.repository, _sc.c.attempts).where(
                due, _sc.c.region == region
            )
            query = query.order_by(_sc.c.queued_at).limit(1)
            if self._locks:
                query = query.with_for_update(skip_locked=True)
            row = conn.execute(query).first()
            if row is None:
                return None
            attempts = int(row.attempts) + 1
            conn.execute(
                update(_sc)
                .where(_sc.c.digest == row.digest)
                .values(state=INDEXING, claimed_at=now, attempts=attempts)
            )
            return Claim(row.digest, row.repository, attempts)

        return self._transaction(work)

    def relocate(self, digest: str) -> str | None:
        """The scan's repository no longer holds `digest`: move the scan to a repository that
        does (its name), or forget the scan when none does (None; a later push queues it
        afresh)."""

        def work(conn: Connection) -> str | None:
            holder = conn.execute(
                select(s.repositories.c.name)
                .select_from(
                    s.manifests.join(
                        s.repositories, s.repositories.c.id == s.manifests.c.repository_id
                    )
                )
                .where(s.manifests.c.digest == digest)
                .order_by(s.repositories.c.name)
                .limit(1)
            ).scalar()
            if holder is None:
                conn.execute(delete(_sc).where(_sc.c.digest == digest))
                return None
            conn.execute(update(_sc).where(_sc.c.digest == digest).values(repository=holder))
            return str(holder)

        return self._transaction(work)

    def requeue(self, digest: str) -> bool:
        """Queue a scan again (an operator's `rescan`); False when there is none."""

        def work(conn: Connection) -> bool:
            result = conn.execute(
                update(_sc)
                .where(_sc.c.digest == digest)
                .values(state=QUEUED, queued_at=_now(), attempts=0, error=None)
            )
            return bool(result.rowcount)

        return self._transaction(work)

    def finish(self, digest: str, index: ImageIndex) -> None:
        """Store what the indexer found; matching follows (`to_match`)."""
        values = {
            "state": DONE,
            "error": None,
            "indexed_at": _now(),
            "os": msgspec.json.encode(index.os).decode() if index.os else None,
            "package_count": len(index.packages),
            "file_count": len(index.files),
            "packages": pack(index.packages),
            "files": pack(index.files),
            "files_truncated": index.files_truncated,
            "matched_generation": 0,
            "findings": None,
            "severity_counts": None,
        }
        self._transaction(
            lambda conn: conn.execute(update(_sc).where(_sc.c.digest == digest).values(**values))
        )

    def fail(self, digest: str, error: str, retry_in: float | None) -> None:
        """Record a failed attempt: queued again in `retry_in` seconds, or failed for good."""
        values: dict[str, Any] = {"error": error[:MAX_ERROR]}
        if retry_in is None:
            values["state"] = FAILED
        else:
            values.update(state=QUEUED, queued_at=_now() + timedelta(seconds=retry_in))
        self._transaction(
            lambda conn: conn.execute(update(_sc).where(_sc.c.digest == digest).values(**values))
        )

    # -- reading scans -----------------------------------------------------------------------

    def scan(self, digest: str) -> ScanRecord | None:
        with self._read() as conn:
            row = conn.execute(select(*_RECORD_COLUMNS).where(_sc.c.digest == digest)).first()
        return None if row is None else _record(row)

    def scans(self, digests: Sequence[str]) -> dict[str, ScanRecord]:
        found: dict[str, ScanRecord] = {}
        with self._read() as conn:
            for start in range(0, len(digests), MAX_LOOKUP_KEYS):
                chunk = list(digests[start : start + MAX_LOOKUP_KEYS])
                for row in conn.execute(select(*_RECORD_COLUMNS).where(_sc.c.digest.in_(chunk))):
                    found[row.digest] = _record(row)
        return found

    def _column(self, digest: str, column: Any) -> bytes | None:
        with self._read() as conn:
            value = conn.execute(select(column).where(_sc.c.digest == digest)).scalar()
        return bytes(value) if value is not None else None

    def packages(self, digest: str) -> tuple[Package, ...]:
        data = self._column(digest, _sc.c.packages)
        return unpack(data, tuple[Package, ...]) if data else ()

    def files(self, digest: str) -> tuple[FileEntry, ...]:
        data = self._column(digest, _sc.c.files)
        return unpack(data, tuple[FileEntry, ...]) if data else ()

    def findings(self, digest: str) -> tuple[Finding, ...] | None:
        """The findings of the latest match; None when the scan was never matched."""
        data = self._column(digest, _sc.c.findings)
        return unpack(data, tuple[Finding, ...]) if data else None

    # -- matching ----------------------------------------------------------------------------

    def to_match(self, limit: int) -> tuple[int, list[tuple[str, OsRelease | None, bytes]]]:
        """The current generation and up to `limit` indexed scans matched at an older one:
        (digest, OS release, packed package list)."""
        with self._read() as conn:
            generation = self._generation(conn)
            rows = conn.execute(
                select(_sc.c.digest, _sc.c.os, _sc.c.packages)
                .where(
                    _sc.c.state == DONE,
                    or_(_sc.c.matched_generation < generation, _sc.c.findings.is_(None)),
                )
                .order_by(_sc.c.indexed_at)
                .limit(limit)
            ).all()
        return generation, [
            (
                row.digest,
                msgspec.json.decode(row.os, type=OsRelease) if row.os else None,
                bytes(row.packages or pack(())),
            )
            for row in rows
        ]

    def store_findings(self, digest: str, generation: int, findings: Sequence[Finding]) -> None:
        """Store a match; the first one of a scan is its `scan.finished` webhook event."""
        counts = severity_counts(findings)

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(_sc.c.repository, _sc.c.matched_at).where(_sc.c.digest == digest)
            ).first()
            conn.execute(
                update(_sc)
                .where(_sc.c.digest == digest, _sc.c.state == DONE)
                .values(
                    matched_generation=generation,
                    matched_at=_now(),
                    findings=pack(tuple(findings)),
                    severity_counts=json.dumps(counts),
                )
            )
            if row is not None and row.matched_at is None:
                emit_for_repository(
                    conn,
                    SCAN_FINISHED,
                    row.repository,
                    f"{row.repository}@{digest}",
                    {"repository": row.repository, "digest": digest, "vulnerabilities": counts},
                )

        self._transaction(work)

    def advisories_for(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[bytes]]:
        """The stored records naming each (ecosystem, name) pair."""
        wanted = sorted(set(keys))
        found: dict[tuple[str, str], list[bytes]] = {}
        with self._read() as conn:
            for start in range(0, len(wanted), MAX_LOOKUP_KEYS):
                chunk = wanted[start : start + MAX_LOOKUP_KEYS]
                rows = conn.execute(
                    select(_vp.c.ecosystem, _vp.c.name, _adv.c.record)
                    .select_from(_vp.join(_adv, _adv.c.id == _vp.c.advisory_id))
                    .where(or_(*(and_(_vp.c.ecosystem == e, _vp.c.name == n) for e, n in chunk)))
                )
                for row in rows:
                    found.setdefault((row.ecosystem, row.name), []).append(bytes(row.record))
        return found

    def prune(self, limit: int = 1000) -> int:
        """Forget scans of digests no repository holds any more (garbage collected)."""

        def work(conn: Connection) -> int:
            gone = (
                select(_sc.c.digest)
                .where(~exists().where(s.manifests.c.digest == _sc.c.digest))
                .limit(limit)
            )
            digests = [row[0] for row in conn.execute(gone)]
            if digests:
                conn.execute(delete(_sc).where(_sc.c.digest.in_(digests)))
            return len(digests)

        return self._transaction(work)

    # -- the vulnerability database ------------------------------------------------------------

    @staticmethod
    def _generation(conn: Connection) -> int:
        value = conn.execute(select(_vs.c.generation).where(_vs.c.id == 1)).scalar()
        return int(value or 0)

    def vulndb_status(self) -> VulnDbStatus:
        with self._read() as conn:
            row = conn.execute(select(_vs).where(_vs.c.id == 1)).first()
            count = int(conn.execute(select(func.count()).select_from(_adv)).scalar() or 0)
        if row is None:
            return VulnDbStatus(0, count, None, None)
        return VulnDbStatus(int(row.generation), count, _aware(row.imported_at), row.source)

    def import_advisories(self, rows: Sequence[AdvisoryRow]) -> int:
        """Store a batch, skipping advisories whose `modified` is unchanged; the rows changed.
        The caller bumps the generation (`imported`) once the import ends."""

        def work(conn: Connection) -> int:
            ids = [r.id for r in rows]
            known = dict(
                conn.execute(select(_adv.c.id, _adv.c.modified).where(_adv.c.id.in_(ids))).all()
            )
            changed = [r for r in rows if known.get(r.id) != r.modified]
            if not changed:
                return 0
            changed_ids = [r.id for r in changed]
            conn.execute(delete(_vp).where(_vp.c.advisory_id.in_(changed_ids)))
            conn.execute(delete(_adv).where(_adv.c.id.in_(changed_ids)))
            conn.execute(
                _adv.insert(),
                [{"id": r.id, "modified": r.modified, "record": r.record} for r in changed],
            )
            keys = [
                {"ecosystem": e, "name": n, "advisory_id": r.id}
                for r in changed
                for e, n in sorted(r.keys)
            ]
            if keys:
                conn.execute(_vp.insert(), keys)
            return len(changed)

        return self._transaction(work, conflicts=True)

    def imported(self, source: str, changed: int) -> int:
        """Note an import that ended; a new generation when it changed anything. The current
        generation."""

        def work(conn: Connection) -> int:
            generation = self._generation(conn) + (1 if changed else 0)
            count = int(conn.execute(select(func.count()).select_from(_adv)).scalar() or 0)
            values = {
                "generation": generation,
                "advisories": count,
                "imported_at": _now(),
                "source": source[:1000],
            }
            if conn.execute(select(_vs.c.id).where(_vs.c.id == 1)).first() is None:
                conn.execute(_vs.insert().values(id=1, **values))
            else:
                conn.execute(update(_vs).where(_vs.c.id == 1).values(**values))
            return generation

        return self._transaction(work, conflicts=True)
