"""App secrets at rest: each org's data key, wrapped by a master key the database never holds,
and each app's values, sealed under that data key (`auth/envelope.py` does the cryptography;
this module stores bytes it cannot read).

Versions: every change of an app's secrets (a batch of sets and unsets) bumps
`apps.secrets_version` to V and, per name it touches, ends the current row (`unset_in = V`) and,
for a set, adds one (`set_in = V`). The set of version V is the rows with `set_in <= V` and
`unset_in` unset or above V. A release records the version it was made with; its machines get
that set, so a staged change (no release) reaches machines only with the next deploy. Rows that
no live release (one with a machine desired started) and not the current set need are deleted
at each change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.platform import release_env

_k, _v = s.org_data_keys, s.app_secrets


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class WrappedOrgKey:
    """An org's data key as stored: wrapped by the master key `key_id`."""

    org_id: int
    key_id: str
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """One value of one secret (sealed; `digest` is keyed, for display)."""

    name: str
    sealed: bytes
    digest: str
    set_in: int
    set_by_id: str
    set_by_name: str
    set_at: datetime


@dataclass(frozen=True, slots=True)
class SealedChange:
    """A batch of changes, sealed by the caller: name -> (sealed value, digest), and names to
    unset."""

    sets: Mapping[str, tuple[bytes, str]]
    unsets: Sequence[str]


@dataclass(frozen=True, slots=True)
class MachineSecrets:
    """What a machine starting now gets: its release's set of secrets and plain variables."""

    org_id: int
    app_id: int
    version: int
    secrets: list[StoredSecret]
    env: dict[str, str]  # its release's plain variables


_COLUMNS = (
    _v.c.name,
    _v.c.sealed,
    _v.c.digest,
    _v.c.set_in,
    _v.c.set_by_id,
    _v.c.set_by_name,
    _v.c.set_at,
)


def _stored(row: tuple[Any, ...]) -> StoredSecret:
    set_at = row[6]
    assert isinstance(set_at, datetime)
    return StoredSecret(
        name=str(row[0]),
        sealed=bytes(row[1]),
        digest=str(row[2]),
        set_in=int(row[3]),
        set_by_id=str(row[4]),
        set_by_name=str(row[5]),
        set_at=set_at if set_at.tzinfo is not None else set_at.replace(tzinfo=UTC),
    )


def _at_version(app_id: int, version: int) -> ColumnElement[bool]:
    return and_(
        _v.c.app_id == app_id,
        _v.c.set_in <= version,
        or_(_v.c.unset_in.is_(None), _v.c.unset_in > version),
    )


class SecretMeta(SqlStore):
    """The secrets tables. Every method runs on a database thread (`run`/`read`)."""

    # -- org data keys ----------------------------------------------------------------------------

    def org_key(self, org_id: int) -> WrappedOrgKey | None:
        with self._read() as conn:
            row = conn.execute(
                select(_k.c.key_id, _k.c.wrapped).where(_k.c.org_id == org_id)
            ).first()
        return None if row is None else WrappedOrgKey(org_id, str(row[0]), bytes(row[1]))

    def add_org_key(self, key: WrappedOrgKey) -> WrappedOrgKey:
        """Store the org's first data key; when another writer stored one first, that one (the
        caller then uses it and forgets its own)."""

        def work(conn: Connection) -> WrappedOrgKey:
            row = conn.execute(
                select(_k.c.key_id, _k.c.wrapped).where(_k.c.org_id == key.org_id)
            ).first()
            if row is not None:
                return WrappedOrgKey(key.org_id, str(row[0]), bytes(row[1]))
            now = _now()
            conn.execute(
                insert(_k).values(
                    org_id=key.org_id,
                    key_id=key.key_id,
                    wrapped=key.wrapped,
                    created_at=now,
                    wrapped_at=now,
                )
            )
            return key

        return self._transaction(work, conflicts=True)

    def org_keys_after(self, org_id: int, limit: int) -> list[WrappedOrgKey]:
        """Data keys of orgs with ids above `org_id`, in id order (a rotation's pages)."""
        with self._read() as conn:
            rows = conn.execute(
                select(_k.c.org_id, _k.c.key_id, _k.c.wrapped)
                .where(_k.c.org_id > org_id)
                .order_by(_k.c.org_id)
                .limit(limit)
            ).all()
        return [WrappedOrgKey(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def replace_org_key(self, old: WrappedOrgKey, key_id: str, wrapped: bytes) -> bool:
        """Store the same data key wrapped anew, unless the row changed since `old` was read
        (False: read it again)."""

        def work(conn: Connection) -> bool:
            done = conn.execute(
                update(_k)
                .where(
                    _k.c.org_id == old.org_id,
                    _k.c.key_id == old.key_id,
                    _k.c.wrapped == old.wrapped,
                )
                .values(key_id=key_id, wrapped=wrapped, wrapped_at=_now())
            )
            return done.rowcount == 1

        return self._transaction(work)

    def current(self, app_id: int) -> list[StoredSecret]:
        """The app's secrets as they are now (staged changes included), by name."""
        with self._read() as conn:
            rows = conn.execute(
                select(*_COLUMNS)
                .where(_v.c.app_id == app_id, _v.c.unset_in.is_(None))
                .order_by(_v.c.name)
            ).all()
        return [_stored(tuple(r)) for r in rows]

    def version(self, app_id: int) -> int:
        with self._read() as conn:
            value = conn.execute(
                select(s.apps.c.secrets_version).where(s.apps.c.id == app_id)
            ).scalar()
        return int(value or 0)

    def change(
        self,
        app_id: int,
        change: SealedChange,
        by_id: str,
        by_name: str,
        max_names: int,
        max_bytes: int,
        overhead: int = 0,
    ) -> tuple[int, list[str]] | None:
        """Apply a batch as one new version: (that version, the names it changed), or None
        when it changes nothing (every unset name absent). Raises ValueError when the app would
        hold more than `max_names` secrets or more than `max_bytes` of names and values (a sealed
        value's size less the `overhead` sealing adds):
        checked here, in the transaction that holds the app's row, so concurrent changes cannot
        each pass alone and together exceed them."""

        def work(conn: Connection) -> tuple[int, list[str]] | None:
            current = conn.execute(
                select(s.apps.c.secrets_version)
                .where(s.apps.c.id == app_id)
                .with_for_update(of=s.apps)
                if self._locks
                else select(s.apps.c.secrets_version).where(s.apps.c.id == app_id)
            ).scalar()
            version = int(current or 0) + 1
            sizes = {
                str(row[0]): int(row[1] or 0)
                for row in conn.execute(
                    select(_v.c.name, func.length(_v.c.sealed)).where(
                        _v.c.app_id == app_id, _v.c.unset_in.is_(None)
                    )
                )
            }
            names = set(sizes)
            unsets = [
                n for n in dict.fromkeys(change.unsets) if n in names and n not in change.sets
            ]
            if not change.sets and not unsets:
                return None
            if len(names | set(change.sets)) - len(unsets) > max_names:
                raise ValueError(f"an app holds at most {max_names} secrets")
            ended = set(change.sets) | set(unsets)
            total = sum(len(n) + size - overhead for n, size in sizes.items() if n not in ended)
            total += sum(len(n) + len(sealed) - overhead for n, (sealed, _) in change.sets.items())
            if total > max_bytes:
                raise ValueError(f"its secrets would exceed {max_bytes >> 10} KiB in all")
            touched = [*change.sets, *unsets]
            conn.execute(
                update(_v)
                .where(_v.c.app_id == app_id, _v.c.unset_in.is_(None), _v.c.name.in_(touched))
                .values(unset_in=version)
            )
            now = _now()
            if change.sets:
                conn.execute(
                    insert(_v),
                    [
                        {
                            "app_id": app_id,
                            "name": name,
                            "sealed": sealed,
                            "digest": digest,
                            "set_in": version,
                            "unset_in": None,
                            "set_by_id": by_id,
                            "set_by_name": by_name,
                            "set_at": now,
                        }
                        for name, (sealed, digest) in sorted(change.sets.items())
                    ],
                )
            conn.execute(
                update(s.apps).where(s.apps.c.id == app_id).values(secrets_version=version)
            )
            self._purge(conn, app_id, version)
            return version, sorted(touched)

        return self._transaction(work)

    def _purge(self, conn: Connection, app_id: int, version: int) -> None:
        """Delete the rows that neither the current set nor a live release's set holds."""
        live = (
            select(func.min(func.coalesce(s.releases.c.secrets_version, 0)))
            .select_from(s.releases.join(s.machines, s.machines.c.release_id == s.releases.c.id))
            .where(s.releases.c.app_id == app_id, s.machines.c.desired == "started")
        )
        oldest = conn.execute(live).scalar()
        floor = version if oldest is None else min(int(oldest), version)
        conn.execute(
            delete(_v).where(
                _v.c.app_id == app_id, _v.c.unset_in.is_not(None), _v.c.unset_in <= floor
            )
        )

    def release_version(self, release_id: int) -> int:
        """The secrets version a release was made with (0: before secrets existed)."""
        with self._read() as conn:
            value = conn.execute(
                select(s.releases.c.secrets_version).where(s.releases.c.id == release_id)
            ).scalar()
        return int(value or 0)

    def for_machine(self, machine_id: str) -> MachineSecrets | None:
        """The secrets of a machine's release (None: no such machine)."""
        with self._read() as conn:
            row = conn.execute(
                select(s.apps.c.org_id, s.apps.c.id, s.releases.c.secrets_version, s.releases.c.env)
                .select_from(
                    s.machines.join(s.releases, s.releases.c.id == s.machines.c.release_id).join(
                        s.apps, s.apps.c.id == s.machines.c.app_id
                    )
                )
                .where(s.machines.c.id == machine_id)
            ).first()
            if row is None:
                return None
            org_id, app_id, version = int(row[0]), int(row[1]), int(row[2] or 0)
            env = release_env(row[3])
            rows = conn.execute(
                select(*_COLUMNS).where(_at_version(app_id, version)).order_by(_v.c.name)
            ).all()
        return MachineSecrets(org_id, app_id, version, [_stored(tuple(r)) for r in rows], env)
