"""Signing keys for registry tokens: Ed25519 keys in the data dir, the newest signs, all verify."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    created: float


def _kid(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KeyRing:
    """The token signing keys kept under `<data dir>/keys` (files readable by the owner only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[str, SigningKey] = {}
        self._loaded_at = 0.0

    def _load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys: dict[str, SigningKey] = {}
        for path in sorted(self.directory.glob("*.pem")):
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, Ed25519PrivateKey):
                continue
            public = private.public_key()
            keys[_kid(public)] = SigningKey(_kid(public), private, public, path.stat().st_mtime)
        self._keys = keys
        self._loaded_at = time.monotonic()

    def _fresh(self) -> dict[str, SigningKey]:
        # Another process may have rotated; look again at most every few seconds.
        if not self._keys or time.monotonic() - self._loaded_at > 5:
            self._load()
        return self._keys

    def ensure(self) -> None:
        """Create the first key if there is none."""
        if not self._fresh():
            self.rotate()

    def rotate(self) -> str:
        """Add a new signing key (older keys keep verifying); returns its key id."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        kid = _kid(key.public_key())
        _write_private(self.directory / f"{int(time.time() * 1000)}-{kid}.pem", key)
        self._load()
        return kid

    def retire(self, keep: int = 2) -> list[str]:
        """Delete all but the `keep` newest keys; returns the removed key ids."""
        self._load()
        ordered = sorted(self.directory.glob("*.pem"))
        removed = []
        for path in ordered[:-keep] if keep else ordered:
            removed.append(path.stem.split("-", 1)[-1])
            path.unlink()
        self._load()
        return removed

    def sign(self, claims: dict[str, Any]) -> str:
        keys = self._fresh()
        if not keys:
            self.rotate()
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
