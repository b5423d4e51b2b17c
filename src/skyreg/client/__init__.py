"""One OCI distribution client (`RegistryClient`): the Docker token flow, blob HEAD, monolithic
and chunked (resumable) pushes, manifest PUT, blob pulls with Range."""

from skyreg.client.registry import (
    ALL_MANIFESTS,
    DEFAULT_PIECE_SIZE,
    RegistryClient,
    RegistryClientError,
    Response,
    registry_url,
    short_digest,
)

__all__ = [
    "ALL_MANIFESTS",
    "DEFAULT_PIECE_SIZE",
    "RegistryClient",
    "RegistryClientError",
    "Response",
    "registry_url",
    "short_digest",
]
