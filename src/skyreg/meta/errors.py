"""What the metadata refuses, as domain errors: each carries the data of the refusal, and the
edge (`registry/app.py`) decides how it is answered."""

from __future__ import annotations


class MetaRefused(Exception):
    """A write the metadata's invariants refuse (nothing was changed)."""


class ReferenceMissing(MetaRefused):
    """A manifest references blobs (`kind` "blob") or child manifests ("manifest") that are
    not in the repository; `missing` is sorted and non-empty."""

    def __init__(self, repository: str, kind: str, missing: list[str]) -> None:
        super().__init__(f"{kind} {missing[0]} is not in repository {repository}")
        self.repository = repository
        self.kind = kind
        self.missing = missing


class BlobSizeMismatch(MetaRefused):
    """A manifest's descriptor gives a blob a size other than the stored blob's."""

    def __init__(self, digest: str, declared: int, actual: int) -> None:
        super().__init__(f"descriptor of {digest} says {declared} bytes; the blob has {actual}")
        self.digest = digest
        self.declared = declared
        self.actual = actual


class ManifestInUse(MetaRefused):
    """A manifest cannot be deleted while another one (an index) references it."""

    def __init__(self, digest: str, referenced_by: str) -> None:
        super().__init__(
            f"manifest {digest} is referenced by manifest {referenced_by}; delete that first"
        )
        self.digest = digest
        self.referenced_by = referenced_by
