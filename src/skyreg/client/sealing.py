"""Build secrets sealed to a builder: libsodium sealed boxes (PyNaCl).

A builder makes a new X25519 key pair at every start and registers the public half; a client
seals each build secret to it, so the server stores and forwards only ciphertext that the one
builder holding the private key (in its memory only) can open.
"""

from __future__ import annotations

import base64
import binascii

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox


class SealError(ValueError):
    """A key or sealed secret that cannot be used (the message says why)."""


def new_private_key() -> PrivateKey:
    return PrivateKey.generate()


def public_key_b64(key: PrivateKey) -> str:
    """The public half, as `POST /builders` takes it."""
    return base64.b64encode(bytes(key.public_key)).decode()


def seal(public_key: str, secret: bytes) -> str:
    """`secret` sealed to the base64 public key, base64."""
    try:
        key = PublicKey(base64.b64decode(public_key, validate=True))
    except (binascii.Error, ValueError, CryptoError) as e:
        raise SealError(f"the builder's public key is not usable: {e}") from None
    return base64.b64encode(SealedBox(key).encrypt(secret)).decode()


def unseal(key: PrivateKey, sealed: str) -> bytes:
    """A sealed secret opened with the builder's private key."""
    try:
        return SealedBox(key).decrypt(base64.b64decode(sealed, validate=True))
    except (binascii.Error, ValueError, CryptoError) as e:
        raise SealError(f"a build secret cannot be opened with this builder's key: {e}") from None
