"""What a region cannot do, as domain errors: each carries the data of the failure, and the
edge (`registry/app.py`) decides how it is answered."""

from __future__ import annotations


class GeoRefused(Exception):
    """A blob this region lacks cannot be served from here."""

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


class BlobNotInRegion(GeoRefused):
    """Another region asked for a blob this region does not hold: pull-throughs never chain."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest} is not in this region", digest)


class RegionsUnavailable(GeoRefused):
    """No region holding the blob supplied it (the regions tried go to the log, not here)."""

    def __init__(self, digest: str) -> None:
        super().__init__(
            f"blob {digest} cannot be fetched from the regions holding it right now", digest
        )
