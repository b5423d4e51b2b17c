"""Console sessions: a browser signed in with an access token.

The browser holds a random secret in its session cookie; only its sha256 is stored. A session
lasts until sign-out, its own end (`expires_at`) or its token's (revoked, expired): `token`
answers None for each, so the console treats them alike.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, delete, select

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.platform import PlatformMeta, TokenRecord

_c = s.console_sessions
SECRET_BYTES = 32


def session_sha256(secret: str) -> str:
    """What is stored of a session cookie's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in browser: its token and when the session ends."""

    token: TokenRecord
    expires_at: datetime


class ConsoleSessionMeta(SqlStore):
    """Creating, finding and ending console sessions."""

    def __init__(self, platform: PlatformMeta) -> None:
        super().__init__(platform.db)
        self.platform = platform

    def create(self, token_id: str, ttl: timedelta, client: str) -> str:
        """A new session of `token_id` lasting `ttl`: the cookie's secret (stored hashed)."""
        secret = secrets.token_urlsafe(SECRET_BYTES)
        now = _now()

        def work(conn: Connection) -> None:
            conn.execute(
                _c.insert().values(
                    id_sha256=session_sha256(secret),
                    token_id=token_id,
                    created_at=now,
                    expires_at=now + ttl,
                    client=client[:64],
                )
            )

        self._transaction(work)
        return secret

    def find(self, secret: str) -> ConsoleSession | None:
        """The live session a cookie's secret names, with its active token; None otherwise."""
        with self._read() as conn:
            row = conn.execute(
                select(_c.c.token_id, _c.c.expires_at).where(
                    _c.c.id_sha256 == session_sha256(secret)
                )
            ).first()
        if row is None or _aware(row.expires_at) <= _now():
            return None
        token = self.platform.token_by_id(row.token_id)
        if token is None or not token.active():
            return None
        return ConsoleSession(token=token, expires_at=_aware(row.expires_at))

    def end(self, secret: str) -> None:
        """Sign out: the session is gone."""
        self._transaction(
            lambda conn: conn.execute(delete(_c).where(_c.c.id_sha256 == session_sha256(secret)))
        )

    def expire(self, batch: int = 10_000) -> int:
        """Delete up to `batch` ended sessions; how many went."""

        def work(conn: Connection) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    select(_c.c.id_sha256).where(_c.c.expires_at <= _now()).limit(batch)
                )
            ]
            if ids:
                conn.execute(delete(_c).where(_c.c.id_sha256.in_(ids)))
            return len(ids)

        return self._transaction(work)
