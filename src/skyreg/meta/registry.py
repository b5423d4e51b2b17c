"""Registry metadata: repositories, blob links, manifests, tags, referrers and uploads.

Methods are synchronous and short (indexed lookups); each write runs in one transaction.

Concurrent writers (several worker processes, several servers on one PostgreSQL) keep these
invariants: a manifest is stored only while every blob and child manifest it references is in its
repository (a child manifest cannot be deleted while another manifest references it), and a tag
points only at a stored manifest. On PostgreSQL the rows such a check depends on are locked
until the transaction ends (`FOR KEY SHARE` against deletes, `FOR UPDATE` on a blob whose last
link goes), and a transaction that lost a race runs again (`SqlStore._transaction`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from skyreg.meta import schema as s
from skyreg.meta.db import (
    Database,
    Retry,
    SqlStore,
    create_db_engine,
    sqlite_url,
    upgrade_schema,
)
from skyreg.meta.errors import BlobSizeMismatch, ManifestInUse, ReferenceMissing
from skyreg.meta.gc import GcSettings, cancel_deletion, enqueue_blobs, enqueue_manifests
from skyreg.meta.retention import PUSH_GRACE, forget_pulls, untagged_delay
from skyreg.meta.scans import enqueue_scan, scannable
from skyreg.meta.threads import DEFAULT_THREADS
from skyreg.meta.webhooks import IMAGE_PUSHED, MANIFEST_DELETED, TAG_DELETED, emit_for_repository
from skyreg.oci.manifest import Manifest


def _now() -> datetime:
    return datetime.now(UTC)


# Hot read statements, built once: constructing a SELECT costs more than running it.
_m, _t, _r = s.manifests, s.tags, s.repositories
_MANIFEST_COLUMNS = (_m.c.digest, _m.c.media_type, _m.c.content)
_MANIFEST_BY_DIGEST = (
    select(*_MANIFEST_COLUMNS)
    .select_from(_r.join(_m, _m.c.repository_id == _r.c.id))
    .where(_r.c.name == bindparam("repo"), _m.c.digest == bindparam("ref"))
)
_MANIFEST_BY_TAG = (
    select(*_MANIFEST_COLUMNS)
    .select_from(
        _r.join(_t, _t.c.repository_id == _r.c.id).join(
            _m, and_(_m.c.repository_id == _t.c.repository_id, _m.c.digest == _t.c.manifest_digest)
        )
    )
    .where(_r.c.name == bindparam("repo"), _t.c.name == bindparam("ref"))
)
_BLOB_SIZE_IN_REPO = (
    select(s.blobs.c.size)
    .select_from(
        _r.join(s.repository_blobs, s.repository_blobs.c.repository_id == _r.c.id).join(
            s.blobs, s.blobs.c.digest == s.repository_blobs.c.digest
        )
    )
    .where(_r.c.name == bindparam("repo"), s.repository_blobs.c.digest == bindparam("digest"))
)
_UPLOAD_REPOSITORY = select(s.uploads.c.repository).where(s.uploads.c.id == bindparam("id"))
_REPOSITORY_ID = select(_r.c.id).where(_r.c.name == bindparam("name"))


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest as stored: its exact bytes and media type."""

    digest: str
    media_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Referrer:
    """A manifest whose subject is another manifest."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: dict[str, str] | None


class RegistryMeta(SqlStore):
    """Queries and updates of the registry's metadata over one SQLAlchemy engine.

    Every write that can leave a blob or manifest unreferenced queues its GC review in the same
    transaction (`meta/gc.py`), `gc.review_delay` seconds ahead; `region` is the region whose
    store this process installs blobs into ("" without regions)."""

    gc: GcSettings = GcSettings()
    region: str = ""

    # -- repositories --------------------------------------------------------------------------

    def _ensure_repository(self, conn: Connection, name: str) -> int:
        # Look first: an INSERT that hits the conflict still uses up a PostgreSQL sequence value.
        repo_id = self._repository_id(conn, name)
        if repo_id is None:
            # A concurrent creator makes this wait for its commit, then insert nothing.
            conn.execute(self._insert_ignore(s.repositories).values(name=name, created_at=_now()))
            repo_id = self._repository_id(conn, name)
            if repo_id is None:  # pragma: no cover - repositories are never deleted
                raise Retry
        return repo_id

    @staticmethod
    def _repository_id(conn: Connection, name: str) -> int | None:
        value = conn.execute(_REPOSITORY_ID, {"name": name}).scalar_one_or_none()
        return None if value is None else int(value)

    def _keep_manifest(self, conn: Connection, repo_id: int, digest: str) -> None:
        """Hold a manifest just written (or found already there) until commit: a concurrent
        delete waits for us. If one committed first, the manifest is gone: run again."""
        if not self._locks:
            return
        m = s.manifests
        kept = conn.execute(
            select(m.c.digest)
            .where(m.c.repository_id == repo_id, m.c.digest == digest)
            .with_for_update(read=True, key_share=True)
        ).first()
        if kept is None:
            raise Retry

    def repository_known(self, name: str) -> bool:
        """Whether the repository holds any manifest or blob."""
        with self._read() as conn:
            repo_id = self._repository_id(conn, name)
            if repo_id is None:
                return False
            for table in (s.manifests, s.repository_blobs):
                found = conn.execute(
                    select(table.c.repository_id).where(table.c.repository_id == repo_id).limit(1)
                ).first()
                if found is not None:
                    return True
            return False

    def catalog(self, n: int | None, last: str | None) -> list[str]:
        """Repository names that hold at least one manifest, in lexical order."""
        has_manifest = (
            select(s.manifests.c.repository_id)
            .where(s.manifests.c.repository_id == s.repositories.c.id)
            .exists()
        )
        query = select(s.repositories.c.name).where(has_manifest).order_by(s.repositories.c.name)
        if last:
            query = query.where(s.repositories.c.name > last)
        if n is not None:
            query = query.limit(n)
        with self._read() as conn:
            return [row[0] for row in conn.execute(query)]

    # -- blobs ---------------------------------------------------------------------------------

    def link_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        *,
        finished_upload: str | None = None,
        require_existing: bool = False,
    ) -> bool:
        """Record a verified blob and make it visible in `repository`; `finished_upload`: the
        upload session it came from, forgotten in the same transaction (one commit, not two).

        For an upload this runs before its bytes are installed in the store: it waits for a GC
        review of the blob under way, queues a new one (an upload nothing references yet is
        collected after the review delay) and cancels a pending deletion of the blob's bytes in
        this region, so installing them next is safe. `require_existing` (a mount: no bytes
        arrive) links only a blob whose row exists; False when it does not (GC took it)."""

        def work(conn: Connection) -> bool:
            now = _now()
            # First: a review of this blob under way holds its row; we wait for it to end.
            enqueue_blobs(
                conn, [digest], "mount" if require_existing else "upload", self.gc.review_delay, now
            )
            if finished_upload is not None:
                conn.execute(delete(s.uploads).where(s.uploads.c.id == finished_upload))
            repo_id = self._ensure_repository(conn, repository)
            if require_existing:
                query = select(s.blobs.c.digest).where(s.blobs.c.digest == digest)
                if self._locks:
                    query = query.with_for_update(key_share=True, read=True)
                if conn.execute(query).first() is None:
                    return False
            else:
                cancel_deletion(conn, digest, self.region)
                conn.execute(
                    self._insert_ignore(s.blobs).values(digest=digest, size=size, created_at=now)
                )
            # The foreign key holds the blob row against a concurrent last unlink; if that one
            # deleted it first, this insert fails and the next run inserts the blob again.
            conn.execute(
                self._insert_ignore(s.repository_blobs).values(
                    repository_id=repo_id, digest=digest, created_at=now
                )
            )
            return True

        return self._transaction(work, conflicts=True)

    def blob_size(self, repository: str, digest: str) -> int | None:
        """Size of a blob linked into `repository`, or None."""
        with self._read() as conn:
            value = conn.execute(
                _BLOB_SIZE_IN_REPO, {"repo": repository, "digest": digest}
            ).scalar_one_or_none()
        return None if value is None else int(value)

    def repositories_with_blob(self, digest: str) -> list[str]:
        """Names of the repositories a blob is linked into."""
        query = (
            select(_r.c.name)
            .select_from(_r.join(s.repository_blobs, s.repository_blobs.c.repository_id == _r.c.id))
            .where(s.repository_blobs.c.digest == digest)
            .order_by(_r.c.name)
        )
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    def unlink_blob(self, repository: str, digest: str) -> bool:
        """Remove a blob from `repository` (whether it was linked there). Its bytes stay: a GC
        review of the blob is queued, which deletes them once nothing links or references it."""

        def work(conn: Connection) -> bool:
            repo_id = self._repository_id(conn, repository)
            if repo_id is None:
                return False
            link = and_(
                s.repository_blobs.c.repository_id == repo_id,
                s.repository_blobs.c.digest == digest,
            )
            if conn.execute(select(s.repository_blobs.c.digest).where(link)).first() is None:
                return False  # nothing queued for what was never here
            # The review row before the link, the order link_blob and a review take them in
            # (a review holds the row while it deletes links): never a deadlock.
            enqueue_blobs(conn, [digest], "blob_deleted", self.gc.review_delay)
            return bool(conn.execute(delete(s.repository_blobs).where(link)).rowcount)

        return self._transaction(work)

    # -- manifests -----------------------------------------------------------------------------

    def put_manifest(self, repository: str, manifest: Manifest, tags: list[str]) -> None:
        """Store `manifest` in `repository` and point `tags` at it, all or nothing.

        Raises ReferenceMissing when a referenced blob or child manifest is not in the
        repository, BlobSizeMismatch when a referenced blob's size differs from its descriptor.
        """
        digest = str(manifest.digest)
        # One order for every writer: two pushes moving the same tags never deadlock.
        tag_names = sorted(set(tags))

        def work(conn: Connection) -> None:
            now = _now()
            repo_id = self._ensure_repository(conn, repository)
            self._check_references(conn, repo_id, repository, manifest)
            conn.execute(
                self._insert_ignore(s.manifests).values(
                    repository_id=repo_id,
                    digest=digest,
                    media_type=manifest.media_type,
                    content=manifest.raw,
                    size=len(manifest.raw),
                    artifact_type=manifest.referrer_artifact_type(),
                    subject_digest=str(manifest.subject.digest) if manifest.subject else None,
                    annotations=json.dumps(manifest.annotations) if manifest.annotations else None,
                    created_at=now,
                )
            )
            self._keep_manifest(conn, repo_id, digest)
            if scannable(manifest):  # indexed off the request path (meta/scans.py)
                enqueue_scan(conn, self._insert_ignore, digest, repository, self.region)
            refs = [(str(d.digest), "blob") for d in manifest.required_blobs()]
            refs += [
                (child, "manifest") for child in sorted({str(d.digest) for d in manifest.manifests})
            ]
            if refs:
                conn.execute(
                    self._insert_ignore(s.manifest_references),
                    [
                        {
                            "repository_id": repo_id,
                            "parent_digest": digest,
                            "child_digest": child,
                            "kind": kind,
                        }
                        for child, kind in refs
                    ],
                )
            moved = [self._set_tag(conn, repo_id, tag, digest, now) for tag in tag_names]
            if manifest.subject is None:  # a push (a referrer, such as a signature, is not)
                emit_for_repository(
                    conn,
                    IMAGE_PUSHED,
                    repository,
                    f"{repository}@{digest}",
                    {
                        "repository": repository,
                        "digest": digest,
                        "tags": tag_names,
                        "mediaType": manifest.media_type,
                    },
                )
            left = {p for p in moved if p is not None and p != digest}
            if left or not tag_names:
                # The app's untagged delay (its retention policy), else the review delay.
                delay = untagged_delay(conn, repository, self.gc.review_delay)
                if not tag_names:  # pushed by digest: collected unless something holds it
                    # at least a grace period: an index may follow its children (PUSH_GRACE)
                    grace = max(delay, min(self.gc.review_delay, PUSH_GRACE))
                    enqueue_manifests(conn, [(repo_id, digest)], "pushed", grace, now)
                # the manifests the tags moved away from
                enqueue_manifests(conn, [(repo_id, d) for d in left], "tag_moved", delay, now)

        self._transaction(work)

    def _check_references(
        self, conn: Connection, repo_id: int, repository: str, manifest: Manifest
    ) -> None:
        """ReferenceMissing unless every blob and child manifest is in the repository;
        BlobSizeMismatch when a blob's size differs from its descriptor. On PostgreSQL the blob
        links and child manifests stay locked (FOR KEY SHARE) so that none is deleted (by a
        DELETE or by GC) before we commit."""
        blob_refs = manifest.required_blobs()
        if blob_refs:
            wanted = {str(d.digest) for d in blob_refs}
            query = (
                select(s.blobs.c.digest, s.blobs.c.size)
                .select_from(
                    s.repository_blobs.join(
                        s.blobs, s.blobs.c.digest == s.repository_blobs.c.digest
                    )
                )
                .where(
                    s.repository_blobs.c.repository_id == repo_id,
                    s.repository_blobs.c.digest.in_(wanted),
                )
            )
            if self._locks:  # GC's review of a link waits for our commit (meta/gc.py)
                query = query.order_by(s.repository_blobs.c.digest).with_for_update(
                    read=True, key_share=True, of=s.repository_blobs
                )
            rows = conn.execute(query)
            sizes = {row[0]: int(row[1]) for row in rows}
            missing = sorted(wanted - sizes.keys())
            if missing:
                raise ReferenceMissing(repository, "blob", missing)
            for d in blob_refs:
                if sizes[str(d.digest)] != d.size:
                    raise BlobSizeMismatch(str(d.digest), d.size, sizes[str(d.digest)])
        children = {str(d.digest) for d in manifest.manifests}
        if children:
            query = select(s.manifests.c.digest).where(
                s.manifests.c.repository_id == repo_id, s.manifests.c.digest.in_(children)
            )
            if self._locks:
                query = query.order_by(s.manifests.c.digest).with_for_update(
                    read=True, key_share=True
                )
            present = set(conn.execute(query).scalars())
            missing = sorted(children - present)
            if missing:
                raise ReferenceMissing(repository, "manifest", missing)

    def _set_tag(
        self, conn: Connection, repo_id: int, tag: str, digest: str, now: datetime
    ) -> str | None:
        """Point `tag` at `digest`; the manifest it pointed at before (None: a new tag)."""
        previous = conn.execute(
            select(s.tags.c.manifest_digest).where(
                s.tags.c.repository_id == repo_id, s.tags.c.name == tag
            )
        ).scalar_one_or_none()
        values = {
            "repository_id": repo_id,
            "name": tag,
            "manifest_digest": digest,
            "updated_at": now,
        }
        stmt: Any
        if self._dialect == "postgresql":
            stmt = postgresql.insert(s.tags).values(**values)
        else:
            stmt = sqlite.insert(s.tags).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[s.tags.c.repository_id, s.tags.c.name],
            set_={"manifest_digest": digest, "updated_at": now},
        )
        conn.execute(stmt)
        return None if previous is None else str(previous)

    def get_manifest(
        self, repository: str, reference: str, by_digest: bool
    ) -> StoredManifest | None:
        """The manifest a tag or digest names in `repository`, or None."""
        query = _MANIFEST_BY_DIGEST if by_digest else _MANIFEST_BY_TAG
        with self._read() as conn:
            row = conn.execute(query, {"repo": repository, "ref": reference}).first()
        if row is None:
            return None
        return StoredManifest(row[0], row[1], bytes(row[2]))

    def copy_manifest(self, source: str, digest: str, target: str, tag: str) -> bool:
        """Make a manifest of `source` (with its child manifests and blobs) part of `target`
        and tag it there, in one transaction. False when `source` has no such manifest."""
        m, refs = s.manifests, s.manifest_references

        def work(conn: Connection) -> bool:
            now = _now()
            source_id = self._repository_id(conn, source)
            if source_id is None:
                return False
            target_id = self._ensure_repository(conn, target)
            pending, seen = [digest], set()
            while pending:
                current = pending.pop()
                if current in seen:
                    continue
                seen.add(current)
                query = select(m).where(m.c.repository_id == source_id, m.c.digest == current)
                if self._locks:  # the source manifest stays while we copy what it references
                    query = query.with_for_update(read=True, key_share=True)
                row = conn.execute(query).first()
                if row is None:
                    if current == digest:
                        return False
                    continue
                values = {**row._mapping, "repository_id": target_id}
                conn.execute(self._insert_ignore(m).values(**values))
                self._keep_manifest(conn, target_id, current)
                for child, kind in conn.execute(
                    select(refs.c.child_digest, refs.c.kind).where(
                        refs.c.repository_id == source_id, refs.c.parent_digest == current
                    )
                ).all():
                    conn.execute(
                        self._insert_ignore(refs).values(
                            repository_id=target_id,
                            parent_digest=current,
                            child_digest=child,
                            kind=kind,
                        )
                    )
                    if kind == "blob":
                        conn.execute(
                            self._insert_ignore(s.repository_blobs).values(
                                repository_id=target_id, digest=child, created_at=now
                            )
                        )
                    else:
                        pending.append(child)
            previous = self._set_tag(conn, target_id, tag, digest, now)
            if previous is not None and previous != digest:  # the tag moved away from it
                delay = untagged_delay(conn, target, self.gc.review_delay)
                enqueue_manifests(conn, [(target_id, previous)], "tag_moved", delay, now)
            return True

        return self._transaction(work, conflicts=True)

    def delete_manifest(self, repository: str, digest: str) -> bool:
        """Delete a manifest and every tag that pointed at it.

        Refused (ManifestInUse) while another manifest of the repository (an index) references
        it: delete that one first.
        """
        m, refs = s.manifests, s.manifest_references

        def work(conn: Connection) -> bool:
            repo_id = self._repository_id(conn, repository)
            if repo_id is None:
                return False
            # Deleting first locks the row: a push that references it either committed before
            # (its reference is seen below) or waits and then finds it gone.
            removed = conn.execute(
                delete(m).where(m.c.repository_id == repo_id, m.c.digest == digest)
            ).rowcount
            if not removed:
                return False
            parent = conn.execute(
                select(refs.c.parent_digest)
                .where(
                    refs.c.repository_id == repo_id,
                    refs.c.child_digest == digest,
                    refs.c.kind == "manifest",
                    refs.c.parent_digest != digest,
                )
                .limit(1)
            ).scalar_one_or_none()
            if parent is not None:  # raising rolls the delete back
                raise ManifestInUse(digest, parent)
            conn.execute(
                delete(s.tags).where(
                    s.tags.c.repository_id == repo_id, s.tags.c.manifest_digest == digest
                )
            )
            forget_pulls(conn, repo_id, [digest])
            children = conn.execute(
                select(refs.c.child_digest, refs.c.kind).where(
                    refs.c.repository_id == repo_id, refs.c.parent_digest == digest
                )
            ).all()
            conn.execute(
                delete(refs).where(refs.c.repository_id == repo_id, refs.c.parent_digest == digest)
            )
            # What it held may now be garbage: its blobs, child manifests and referrers.
            delay, now = self.gc.review_delay, _now()
            enqueue_blobs(
                conn, [str(c) for c, k in children if k == "blob"], "manifest_deleted", delay, now
            )
            referrers = conn.execute(
                select(m.c.digest).where(m.c.repository_id == repo_id, m.c.subject_digest == digest)
            ).scalars()
            held = [(repo_id, str(c)) for c, k in children if k == "manifest" and c != digest]
            enqueue_manifests(
                conn, held + [(repo_id, str(r)) for r in referrers], "parent_deleted", delay, now
            )
            emit_for_repository(
                conn,
                MANIFEST_DELETED,
                repository,
                f"{repository}@{digest}",
                {"repository": repository, "digest": digest},
            )
            return True

        return self._transaction(work)

    def delete_tag(self, repository: str, tag: str) -> bool:
        """Remove one tag; the manifest stays, and is queued for a GC review."""
        t = s.tags

        def work(conn: Connection) -> bool:
            repo_id = self._repository_id(conn, repository)
            if repo_id is None:
                return False
            where = and_(t.c.repository_id == repo_id, t.c.name == tag)
            digest = conn.execute(select(t.c.manifest_digest).where(where)).scalar_one_or_none()
            if digest is None or not conn.execute(delete(t).where(where)).rowcount:
                return False
            delay = untagged_delay(conn, repository, self.gc.review_delay)
            enqueue_manifests(conn, [(repo_id, str(digest))], "tag_deleted", delay)
            emit_for_repository(
                conn,
                TAG_DELETED,
                repository,
                f"{repository}:{tag}",
                {"repository": repository, "tag": tag, "digest": str(digest)},
            )
            return True

        return self._transaction(work)

    def list_tags(self, repository: str, n: int | None, last: str | None) -> list[str]:
        """Tags of `repository` in lexical order, after `last`, at most `n`."""
        t = s.tags
        query = (
            select(t.c.name)
            .select_from(s.repositories.join(t, t.c.repository_id == s.repositories.c.id))
            .where(s.repositories.c.name == repository)
            .order_by(t.c.name)
        )
        if last:
            query = query.where(t.c.name > last)
        if n is not None:
            query = query.limit(n)
        with self._read() as conn:
            return [row[0] for row in conn.execute(query)]

    def referrers(self, repository: str, subject: str, artifact_type: str | None) -> list[Referrer]:
        """Manifests in `repository` whose subject is `subject`, optionally of one artifactType."""
        m = s.manifests
        query = (
            select(m.c.digest, m.c.media_type, m.c.size, m.c.artifact_type, m.c.annotations)
            .select_from(s.repositories.join(m, m.c.repository_id == s.repositories.c.id))
            .where(s.repositories.c.name == repository, m.c.subject_digest == subject)
            .order_by(m.c.created_at, m.c.digest)
        )
        if artifact_type is not None:
            query = query.where(m.c.artifact_type == artifact_type)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            Referrer(
                digest=row[0],
                media_type=row[1],
                size=int(row[2]),
                artifact_type=row[3],
                annotations=json.loads(row[4]) if row[4] else None,
            )
            for row in rows
        ]

    # -- uploads -------------------------------------------------------------------------------

    def create_upload(self, upload_id: str, repository: str) -> None:
        """Record a new upload session for `repository`."""
        now = _now()
        with self._write() as conn:
            self._ensure_repository(conn, repository)
            conn.execute(
                insert(s.uploads).values(
                    id=upload_id, repository=repository, created_at=now, updated_at=now
                )
            )

    def upload_repository(self, upload_id: str) -> str | None:
        """The repository an upload belongs to, or None if there is no such upload."""
        with self._read() as conn:
            value = conn.execute(_UPLOAD_REPOSITORY, {"id": upload_id}).scalar_one_or_none()
        return None if value is None else str(value)

    def touch_upload(self, upload_id: str) -> None:
        """Mark an upload as active now (it will not expire soon)."""
        with self._write() as conn:
            conn.execute(
                update(s.uploads).where(s.uploads.c.id == upload_id).values(updated_at=_now())
            )

    def delete_upload(self, upload_id: str) -> bool:
        """Forget an upload session."""
        with self._write() as conn:
            return bool(conn.execute(delete(s.uploads).where(s.uploads.c.id == upload_id)).rowcount)

    def stale_uploads(self, idle_since: datetime) -> list[str]:
        """Uploads with no activity since `idle_since`, the longest idle first."""
        with self._read() as conn:
            return list(
                conn.execute(
                    select(s.uploads.c.id)
                    .where(s.uploads.c.updated_at < idle_since)
                    .order_by(s.uploads.c.updated_at)
                ).scalars()
            )


def open_database(
    url: str | None,
    data_dir: Path,
    *,
    sqlite_synchronous: str = "full",
    db_threads: int = DEFAULT_THREADS,
) -> RegistryMeta:
    """Open (creating and migrating as needed) the metadata database, queried from
    `db_threads` database threads (see `Database`)."""
    engine = create_db_engine(
        url or sqlite_url(data_dir / "skyreg.db"),
        sqlite_synchronous=sqlite_synchronous,
        threads=db_threads,
    )
    upgrade_schema(engine)
    meta = RegistryMeta(Database(engine, threads=db_threads))
    meta._owns_db = True  # as when built from the engine: its close() closes the Database
    return meta
