"""Signing keys for registry tokens: Ed25519 keys in the metadata database, the newest signs,
all verify.

Keeping them in the database (table `signing_keys`) is what lets any node of a registry verify a
token any other node issued, and `skyreg keys rotate` reach every node at once. Keys from the
older `<data-dir>/keys/*.pem` files are imported on first use, so tokens signed before keep
verifying. The private keys are as sensitive as the database itself, which already decides who
holds which token.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine, delete, select

from skyreg.meta import schema as s
from skyreg.meta.db import Database, SqlStore

ALGORITHM = "EdDSA"
_REFRESH = 5.0  # seconds between looks for keys another process added or retired


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    created: float


def _kid(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class KeyRing(SqlStore):
    """The token signing keys in the metadata database."""

    def __init__(self, database: Database | Engine, legacy_dir: Path | None = None) -> None:
        super().__init__(database)
        self.legacy_dir = legacy_dir
        self._keys: dict[str, SigningKey] = {}
        self._loaded_at = 0.0

    def _load(self) -> None:
        keys: dict[str, SigningKey] = {}
        k = s.signing_keys
        with self._read() as conn:
            rows = conn.execute(select(k.c.private_pem, k.c.created_at)).all()
        for pem, created in rows:
            private = serialization.load_pem_private_key(bytes(pem), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                continue
            public = private.public_key()
            when = created.replace(tzinfo=UTC) if created.tzinfo is None else created
            keys[_kid(public)] = SigningKey(_kid(public), private, public, when.timestamp())
        self._keys = keys
        self._loaded_at = time.monotonic()

    def _fresh(self) -> dict[str, SigningKey]:
        if not self._keys or time.monotonic() - self._loaded_at > _REFRESH:
            self._load()
        return self._keys

    def _add(self, key: Ed25519PrivateKey, created: datetime) -> str:
        kid = _kid(key.public_key())
        with self._write() as conn:
            conn.execute(
                self._insert_ignore(s.signing_keys).values(
                    kid=kid, private_pem=_pem(key), created_at=created
                )
            )
        return kid

    def ensure(self) -> None:
        """Import the data dir's old key files, or create the first key, if there is none."""
        if self._fresh():
            return
        imported = 0
        if self.legacy_dir is not None and self.legacy_dir.is_dir():
            for path in sorted(self.legacy_dir.glob("*.pem")):
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if isinstance(private, Ed25519PrivateKey):
                    created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    self._add(private, created)
                    imported += 1
        if not imported:
            self._add(Ed25519PrivateKey.generate(), datetime.now(UTC))
        self._load()

    def rotate(self) -> str:
        """Add a new signing key (older keys keep verifying); returns its key id."""
        kid = self._add(Ed25519PrivateKey.generate(), datetime.now(UTC))
        self._load()
        return kid

    def retire(self, keep: int = 2) -> list[str]:
        """Delete all but the `keep` newest keys; returns the removed key ids."""
        self._load()
        ordered = sorted(self._keys.values(), key=lambda key: key.created)
        removed = [key.kid for key in (ordered[:-keep] if keep else ordered)]
        if removed:
            with self._write() as conn:
                conn.execute(delete(s.signing_keys).where(s.signing_keys.c.kid.in_(removed)))
        self._load()
        return removed

    def sign(self, claims: dict[str, Any]) -> str:
        keys = self._fresh()
        if not keys:
            self.ensure()
            keys = self._keys
        newest = max(keys.values(), key=lambda k: k.created)
        return jwt.encode(claims, newest.private, algorithm=ALGORITHM, headers={"kid": newest.kid})

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """Decoded claims; raises jwt.InvalidTokenError for anything wrong (signature, expiry,
        audience, unknown key)."""
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        key = self._fresh().get(kid) if isinstance(kid, str) else None
        if key is None:
            self._load()
            key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise jwt.InvalidTokenError("unknown signing key")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer="skyreg",
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
        return claims
