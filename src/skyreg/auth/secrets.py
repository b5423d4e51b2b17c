"""Access-token secrets: generated once, shown once, stored only as a SHA-256."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "skyreg_"


def new_token_secret() -> str:
    """A fresh, high-entropy token secret (what a user pastes as a password)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    """The stored form of a secret. Secrets are random 256-bit values, so one SHA-256 suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token_id() -> str:
    """A public identifier for a token (listing, revocation, JWT subject)."""
    return secrets.token_hex(8)
