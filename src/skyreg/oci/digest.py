"""Content digests: parsing, validation and incremental hashing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from skyreg.oci.errors import ErrorCode, RegistryError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)\Z")


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated `algorithm:hex` digest of a supported algorithm."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `text`, raising DIGEST_INVALID for anything but sha256/sha512 in lower hex."""
        m = _DIGEST_RE.match(text)
        if m is None:
            raise RegistryError(ErrorCode.DIGEST_INVALID, f"invalid digest {text[:200]!r}")
        algorithm, hexpart = m.group(1), m.group(2)
        want = _HEX_LENGTH.get(algorithm)
        if want is None:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID, f"unsupported digest algorithm {algorithm[:50]!r}"
            )
        if len(hexpart) != want or not all(c in "0123456789abcdef" for c in hexpart):
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"invalid {algorithm} digest: want {want} lowercase hex characters",
            )
        return cls(algorithm, hexpart)

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is meant as a digest (it has a colon) rather than a tag."""
    return ":" in reference


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of `data` with `algorithm`."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
