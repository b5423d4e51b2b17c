"""Platform metadata: organizations, apps, access tokens, and the image listing of an app."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.gc import GcSettings, release_images_retired
from skyreg.meta.webhooks import RELEASE_CREATED, emit_for_app


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without a zone; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class AlreadyExists(Exception):
    """A name that must be unique is taken."""


@dataclass(frozen=True, slots=True)
class Org:
    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class App:
    id: int
    name: str
    org_id: int
    org_name: str
    public: bool
    created_at: datetime
    service: dict[str, Any] | None = None  # its machines' port and checks (`releases.service`)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token (never its secret)."""

    id: str
    name: str
    kind: str
    org_id: int | None
    app_id: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    org_name: str | None = None
    app_name: str | None = None

    def active(self, now: datetime | None = None) -> bool:
        """Neither revoked nor expired."""
        now = now or _now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True, slots=True)
class ImageTag:
    """One tag of an app's repository, as `skyreg images list` shows it."""

    repository: str
    tag: str
    digest: str
    media_type: str
    size: int
    pushed_at: datetime
    pulled_at: datetime | None = None  # last pulled (written in batches: up to a minute late)


_CHUNK = 500  # parent digests one IN (...) names

_APP_COLUMNS = (
    s.apps.c.id,
    s.apps.c.name,
    s.apps.c.org_id,
    s.orgs.c.name,
    s.apps.c.public,
    s.apps.c.created_at,
    s.apps.c.service,
)
_APP_BY_NAME = (
    select(*_APP_COLUMNS)
    .select_from(s.apps.join(s.orgs, s.orgs.c.id == s.apps.c.org_id))
    .where(s.apps.c.name == bindparam("name"))
)
_TOKEN_COLUMNS = (
    s.tokens.c.id,
    s.tokens.c.name,
    s.tokens.c.kind,
    s.tokens.c.org_id,
    s.tokens.c.app_id,
    s.tokens.c.created_at,
    s.tokens.c.expires_at,
    s.tokens.c.revoked_at,
    s.orgs.c.name,
    s.apps.c.name,
)
_TOKEN_FROM = s.tokens.outerjoin(s.orgs, s.orgs.c.id == s.tokens.c.org_id).outerjoin(
    s.apps, s.apps.c.id == s.tokens.c.app_id
)
_TOKEN_BY_SECRET = (
    select(*_TOKEN_COLUMNS)
    .select_from(_TOKEN_FROM)
    .where(s.tokens.c.secret_sha256 == bindparam("secret"))
)
_TOKEN_BY_ID = (
    select(*_TOKEN_COLUMNS).select_from(_TOKEN_FROM).where(s.tokens.c.id == bindparam("id"))
)


def _token(row: tuple[object, ...]) -> TokenRecord:
    return TokenRecord(
        id=str(row[0]),
        name=str(row[1]),
        kind=str(row[2]),
        org_id=None if row[3] is None else int(row[3]),  # type: ignore[call-overload]
        app_id=None if row[4] is None else int(row[4]),  # type: ignore[call-overload]
        created_at=_aware(row[5]),  # type: ignore[arg-type]
        expires_at=_aware(row[6]),  # type: ignore[arg-type]
        revoked_at=_aware(row[7]),  # type: ignore[arg-type]
        org_name=None if row[8] is None else str(row[8]),
        app_name=None if row[9] is None else str(row[9]),
    )


def _app(row: tuple[object, ...]) -> App:
    return App(
        id=int(row[0]),  # type: ignore[call-overload]
        name=str(row[1]),
        org_id=int(row[2]),  # type: ignore[call-overload]
        org_name=str(row[3]),
        public=bool(row[4]),
        created_at=_aware(row[5]),  # type: ignore[arg-type]
        service=stored_service(row[6]),
    )


def stored_service(stored: object) -> dict[str, Any] | None:
    """A stored `service` column (JSON text) as a dict; None: no service."""
    if not isinstance(stored, str) or not stored:
        return None
    loaded = json.loads(stored)
    return loaded if isinstance(loaded, dict) else None


def service_text(service: dict[str, Any] | None) -> str | None:
    """What a `service` column stores for `service`."""
    return None if service is None else json.dumps(service, sort_keys=True)


class PlatformMeta(SqlStore):
    """Queries and updates of orgs, apps and tokens."""

    # -- orgs ----------------------------------------------------------------------------------

    def create_org(self, name: str) -> Org:
        now = _now()
        try:
            with self._write() as conn:
                org_id = conn.execute(
                    insert(s.orgs).values(name=name, created_at=now).returning(s.orgs.c.id)
                ).scalar_one()
        except IntegrityError:
            raise AlreadyExists(f"organization {name} already exists") from None
        return Org(int(org_id), name, now)

    def get_org(self, name: str) -> Org | None:
        with self._read() as conn:
            row = conn.execute(
                select(s.orgs.c.id, s.orgs.c.name, s.orgs.c.created_at).where(s.orgs.c.name == name)
            ).first()
        return None if row is None else Org(int(row[0]), row[1], _aware(row[2]))  # type: ignore[arg-type]

    def list_orgs(self, org_id: int | None = None) -> list[Org]:
        query = select(s.orgs.c.id, s.orgs.c.name, s.orgs.c.created_at).order_by(s.orgs.c.name)
        if org_id is not None:
            query = query.where(s.orgs.c.id == org_id)
        with self._read() as conn:
            return [Org(int(r[0]), r[1], _aware(r[2])) for r in conn.execute(query)]  # type: ignore[arg-type]

    # -- apps ----------------------------------------------------------------------------------

    def create_app(self, name: str, org_id: int, public: bool = False) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    insert(s.apps).values(
                        name=name, org_id=org_id, public=public, created_at=_now()
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"app {name} already exists") from None

    def get_app(self, name: str) -> App | None:
        with self._read() as conn:
            row = conn.execute(_APP_BY_NAME, {"name": name}).first()
        return None if row is None else _app(tuple(row))

    def get_app_by_id(self, app_id: int) -> App | None:
        query = (
            select(*_APP_COLUMNS)
            .select_from(s.apps.join(s.orgs, s.orgs.c.id == s.apps.c.org_id))
            .where(s.apps.c.id == app_id)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _app(tuple(row))

    def list_apps(self, org_id: int | None = None) -> list[App]:
        query = (
            select(*_APP_COLUMNS)
            .select_from(s.apps.join(s.orgs, s.orgs.c.id == s.apps.c.org_id))
            .order_by(s.apps.c.name)
        )
        if org_id is not None:
            query = query.where(s.apps.c.org_id == org_id)
        with self._read() as conn:
            return [_app(tuple(r)) for r in conn.execute(query)]

    def set_app_service(self, name: str, service: dict[str, Any] | None) -> bool:
        """Set (None: remove) the app's service; its next release takes a copy."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(s.apps)
                    .where(s.apps.c.name == name)
                    .values(service=service_text(service))
                ).rowcount
            )

    def set_app_public(self, name: str, public: bool) -> bool:
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(s.apps).where(s.apps.c.name == name).values(public=public)
                ).rowcount
            )

    # -- tokens --------------------------------------------------------------------------------

    def create_token(
        self,
        *,
        token_id: str,
        name: str,
        kind: str,
        secret_sha256: str,
        org_id: int | None,
        app_id: int | None,
        expires_at: datetime | None,
    ) -> TokenRecord:
        now = _now()
        with self._write() as conn:
            conn.execute(
                insert(s.tokens).values(
                    id=token_id,
                    name=name,
                    kind=kind,
                    org_id=org_id,
                    app_id=app_id,
                    secret_sha256=secret_sha256,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            row = conn.execute(_TOKEN_BY_ID, {"id": token_id}).first()
        assert row is not None
        return _token(tuple(row))

    def token_by_secret(self, secret_sha256: str) -> TokenRecord | None:
        with self._read() as conn:
            row = conn.execute(_TOKEN_BY_SECRET, {"secret": secret_sha256}).first()
        return None if row is None else _token(tuple(row))

    def token_by_id(self, token_id: str) -> TokenRecord | None:
        with self._read() as conn:
            row = conn.execute(_TOKEN_BY_ID, {"id": token_id}).first()
        return None if row is None else _token(tuple(row))

    def list_tokens(self, org_id: int | None = None) -> list[TokenRecord]:
        query = select(*_TOKEN_COLUMNS).select_from(_TOKEN_FROM).order_by(s.tokens.c.created_at)
        if org_id is not None:
            query = query.where(s.tokens.c.org_id == org_id)
        with self._read() as conn:
            return [_token(tuple(r)) for r in conn.execute(query)]

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token: False if it is unknown, already revoked, or the last active admin
        token (which stays, however many revocations race: they queue on the admin rows)."""
        t = s.tokens

        def work(conn: Connection) -> bool:
            now = _now()
            kind = conn.execute(
                select(t.c.kind).where(t.c.id == token_id, t.c.revoked_at.is_(None))
            ).scalar_one_or_none()
            if kind is None:
                return False
            if kind == "admin":
                active = (
                    select(t.c.id)
                    .where(
                        t.c.kind == "admin",
                        t.c.revoked_at.is_(None),
                        or_(t.c.expires_at.is_(None), t.c.expires_at > now),
                    )
                    .order_by(t.c.id)
                )
                if self._locks:
                    active = active.with_for_update()
                if list(conn.execute(active).scalars()) == [token_id]:
                    return False
            return bool(
                conn.execute(
                    update(t)
                    .where(t.c.id == token_id, t.c.revoked_at.is_(None))
                    .values(revoked_at=now)
                ).rowcount
            )

        return self._transaction(work)

    def count_tokens(self, kind: str) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(s.tokens).where(s.tokens.c.kind == kind)
                ).scalar_one()
            )

    # -- images --------------------------------------------------------------------------------

    def image_tags(
        self, app: str, limit: int | None = None, after: tuple[str, str] | None = None
    ) -> list[ImageTag]:
        """The tags of the app's repositories with digest, media type, size and push time, by
        (repository, tag): at most `limit`, those after `after` (repository, tag) when given.

        Size is the manifest plus the blobs it references (for an index, its manifests' blobs),
        computed once per manifest however many tags name it.
        """
        r, t, m, p = s.repositories, s.tags, s.manifests, s.manifest_pulls
        query = (
            select(
                r.c.id,
                r.c.name,
                t.c.name,
                t.c.manifest_digest,
                m.c.media_type,
                m.c.size,
                t.c.updated_at,
                p.c.pulled_at,
            )
            .select_from(
                r.join(t, t.c.repository_id == r.c.id)
                .join(
                    m,
                    (m.c.repository_id == t.c.repository_id) & (m.c.digest == t.c.manifest_digest),
                )
                .outerjoin(
                    p,
                    (p.c.repository_id == t.c.repository_id) & (p.c.digest == t.c.manifest_digest),
                )
            )
            .where(or_(r.c.name == app, r.c.name.startswith(app + "/", autoescape=True)))
            .order_by(r.c.name, t.c.name)
        )
        if after is not None:
            query = query.where(
                or_(r.c.name > after[0], and_(r.c.name == after[0], t.c.name > after[1]))
            )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).all()
            sizes: dict[tuple[int, str], int] = {}
            for row in rows:
                key = (int(row[0]), str(row[3]))
                if key not in sizes:
                    sizes[key] = int(row[5]) + self._referenced_size(conn, *key)
            return [
                ImageTag(
                    repository=row[1],
                    tag=row[2],
                    digest=row[3],
                    media_type=row[4],
                    size=sizes[int(row[0]), str(row[3])],
                    pushed_at=_aware(row[6]),  # type: ignore[arg-type]
                    pulled_at=None if row[7] is None else _aware(row[7]),
                )
                for row in rows
            ]

    def pulled_at(self, repository: str, digest: str) -> datetime | None:
        """When the manifest `digest` of `repository` was last pulled (None: not yet)."""
        r, p = s.repositories, s.manifest_pulls
        with self._read() as conn:
            found = conn.execute(
                select(p.c.pulled_at)
                .select_from(p.join(r, r.c.id == p.c.repository_id))
                .where(r.c.name == repository, p.c.digest == digest)
            ).scalar_one_or_none()
        return None if found is None else _aware(found)

    @staticmethod
    def _referenced_size(conn: Connection, repo_id: int, digest: str) -> int:
        """The bytes of the distinct blobs and child manifests `digest` references, two levels
        down (an index's manifests and their blobs): a layer two platforms share counts once,
        as it is stored once. A query for the blobs and one for the child manifests per level
        (in chunks), not one per reference: a manifest may reference tens of thousands."""
        refs, blobs, manifests = s.manifest_references, s.blobs, s.manifests
        blob_sizes: dict[str, int] = {}
        manifest_sizes: dict[str, int] = {digest: 0}
        level = [digest]
        for _depth in range(3):
            below: list[str] = []
            for start in range(0, len(level), _CHUNK):
                parents = level[start : start + _CHUNK]
                mine = (refs.c.repository_id == repo_id) & refs.c.parent_digest.in_(parents)
                for child, size in conn.execute(
                    select(refs.c.child_digest, blobs.c.size)
                    .select_from(refs.join(blobs, blobs.c.digest == refs.c.child_digest))
                    .where(mine, refs.c.kind == "blob")
                ):
                    blob_sizes[str(child)] = int(size)
                if _depth == 2:
                    continue
                children = refs.outerjoin(
                    manifests,
                    (manifests.c.repository_id == repo_id)
                    & (manifests.c.digest == refs.c.child_digest),
                )
                for child, size in conn.execute(
                    select(refs.c.child_digest, manifests.c.size)
                    .select_from(children)
                    .where(mine, refs.c.kind != "blob")
                ):
                    if str(child) not in manifest_sizes:
                        manifest_sizes[str(child)] = int(size or 0)
                        below.append(str(child))
            if not below:
                break
            level = below
        return sum(blob_sizes.values()) + sum(manifest_sizes.values())


@dataclass(frozen=True, slots=True)
class Release:
    """One release of an app: the image it runs (pinned by digest), who, why and when."""

    id: int
    app_name: str
    version: int
    status: str
    description: str
    reason: str
    image_ref: str
    image_repository: str
    image_digest: str
    strategy: str
    regions: tuple[str, ...]
    machine_count: int
    stable: bool
    user_id: str
    user_name: str
    created_at: datetime
    updated_at: datetime
    env: dict[str, str] = field(default_factory=dict)  # plain variables of its machines
    service: dict[str, Any] | None = None  # its machines' port and health checks


_RELEASE_COLUMNS = (
    s.releases.c.id,
    s.apps.c.name,
    s.releases.c.version,
    s.releases.c.status,
    s.releases.c.description,
    s.releases.c.reason,
    s.releases.c.image_ref,
    s.releases.c.image_repository,
    s.releases.c.image_digest,
    s.releases.c.strategy,
    s.releases.c.regions,
    s.releases.c.machine_count,
    s.releases.c.stable,
    s.releases.c.user_id,
    s.releases.c.user_name,
    s.releases.c.created_at,
    s.releases.c.updated_at,
    s.releases.c.env,
    s.releases.c.service,
)
_RELEASES_FROM = s.releases.join(s.apps, s.apps.c.id == s.releases.c.app_id)


def _release(row: tuple[Any, ...]) -> Release:
    return Release(
        id=int(row[0]),
        app_name=str(row[1]),
        version=int(row[2]),
        status=str(row[3]),
        description=str(row[4]),
        reason=str(row[5]),
        image_ref=str(row[6]),
        image_repository=str(row[7]),
        image_digest=str(row[8]),
        strategy=str(row[9]),
        regions=tuple(json.loads(row[10])),
        machine_count=int(row[11]),
        stable=bool(row[12]),
        user_id=str(row[13]),
        user_name=str(row[14]),
        created_at=_aware(row[15]),  # type: ignore[arg-type]
        updated_at=_aware(row[16]),  # type: ignore[arg-type]
        env=release_env(row[17]),
        service=stored_service(row[18]),
    )


def release_env(stored: object) -> dict[str, str]:
    """A release's stored `env` column as a dict (None: none)."""
    if not isinstance(stored, str) or not stored:
        return {}
    loaded = json.loads(stored)
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


class ReleaseMeta(SqlStore):
    gc: GcSettings = GcSettings()  # how many releases keep their images (meta/gc.py)

    """Queries and updates of releases."""

    def app_named(self, name: str) -> App | None:
        """The app called `name` (for readers that cannot share `PlatformMeta`'s connection)."""
        with self._read() as conn:
            row = conn.execute(_APP_BY_NAME, {"name": name}).first()
        return None if row is None else _app(tuple(row))

    def linked_blobs(self, repository: str, digests: list[str]) -> set[str]:
        """Which of `digests` are linked into `repository` (whose bytes it may serve)."""
        rb, repos = s.repository_blobs, s.repositories
        found: set[str] = set()
        with self._read() as conn:
            for i in range(0, len(digests), 500):
                found.update(
                    conn.execute(
                        select(rb.c.digest)
                        .select_from(rb.join(repos, repos.c.id == rb.c.repository_id))
                        .where(repos.c.name == repository, rb.c.digest.in_(digests[i : i + 500]))
                    ).scalars()
                )
        return found

    def create_release(
        self,
        *,
        app_id: int,
        status: str,
        description: str,
        reason: str,
        image_ref: str,
        image_repository: str,
        image_digest: str,
        strategy: str,
        regions: list[str],
        machine_count: int,
        user_id: str,
        user_name: str,
        env: dict[str, str] | None = None,
        service: dict[str, Any] | None = None,
    ) -> Release:
        """Record the app's next release: versions count up from 1 without gaps, also when
        deploys race (they queue on the app's row; the unique (app, version) backs it up).

        `service` given becomes the app's too; else the release copies the app's.

        On PostgreSQL the image's manifest (in `image_repository`) is held until commit, so a GC
        review of it waits and then sees this release. The release that leaves the app's newest
        `gc.keep_releases` gets its image queued for a GC review."""

        def work(conn: Connection) -> Release:
            now = _now()
            if self._locks:
                conn.execute(
                    select(s.apps.c.id).where(s.apps.c.id == app_id).with_for_update(key_share=True)
                )
            image = (
                select(s.manifests.c.digest)
                .select_from(
                    s.manifests.join(
                        s.repositories, s.repositories.c.id == s.manifests.c.repository_id
                    )
                )
                .where(
                    s.repositories.c.name == image_repository,
                    s.manifests.c.digest == image_digest,
                )
            )
            if self._locks:  # held until commit: a GC review of it waits, then sees us
                conn.execute(image.with_for_update(read=True, key_share=True, of=s.manifests))
            latest = conn.execute(
                select(func.max(s.releases.c.version)).where(s.releases.c.app_id == app_id)
            ).scalar_one()
            if service is not None:  # before the copy below: the release takes this one
                conn.execute(
                    update(s.apps)
                    .where(s.apps.c.id == app_id)
                    .values(service=service_text(service))
                )
            release_id = conn.execute(
                insert(s.releases)
                .values(
                    app_id=app_id,
                    version=int(latest or 0) + 1,
                    status=status,
                    description=description,
                    reason=reason,
                    image_ref=image_ref,
                    image_repository=image_repository,
                    image_digest=image_digest,
                    strategy=strategy,
                    regions=json.dumps(regions),
                    machine_count=machine_count,
                    stable=False,
                    user_id=user_id,
                    user_name=user_name,
                    created_at=now,
                    updated_at=now,
                    env=json.dumps(env, sort_keys=True) if env else None,
                    # The app's secrets as they are now: its machines get this version's set.
                    secrets_version=select(s.apps.c.secrets_version)
                    .where(s.apps.c.id == app_id)
                    .scalar_subquery(),
                    # The app's service as it is now (set just above when given).
                    service=select(s.apps.c.service).where(s.apps.c.id == app_id).scalar_subquery(),
                )
                .returning(s.releases.c.id)
            ).scalar_one()
            release_images_retired(conn, app_id, int(latest or 0) + 1, self.gc)
            row = conn.execute(
                select(*_RELEASE_COLUMNS)
                .select_from(_RELEASES_FROM)
                .where(s.releases.c.id == release_id)
            ).one()
            created = _release(tuple(row))
            emit_for_app(
                conn,
                RELEASE_CREATED,
                app_id,
                f"releases/{created.id}",
                {
                    "release_id": created.id,
                    "version": created.version,
                    "status": created.status,
                    "image": created.image_ref,
                    "digest": created.image_digest,
                    "user": created.user_name,
                },
            )
            return created

        return self._transaction(work, conflicts=True)

    def list_releases(self, app_id: int, limit: int) -> list[Release]:
        """The app's newest releases first."""
        with self._read() as conn:
            rows = conn.execute(
                select(*_RELEASE_COLUMNS)
                .select_from(_RELEASES_FROM)
                .where(s.releases.c.app_id == app_id)
                .order_by(s.releases.c.version.desc())
                .limit(limit)
            ).all()
        return [_release(tuple(r)) for r in rows]

    def get_release(self, release_id: int) -> Release | None:
        with self._read() as conn:
            row = conn.execute(
                select(*_RELEASE_COLUMNS)
                .select_from(_RELEASES_FROM)
                .where(s.releases.c.id == release_id)
            ).first()
        return None if row is None else _release(tuple(row))
