"""One OCI distribution client, in two forms sharing the protocol knowledge (`protocol.py`):
`RegistryClient` (synchronous, `skyreg push`: the Docker token flow, blob HEAD, monolithic and
chunked (resumable) pushes, manifest PUT, blob pulls with Range) and `AsyncRegistryClient`
(asyncio on aiohttp, the agent's image preparation and geo transfers: manifest GET, blob HEAD,
bounded blob streams from an offset, the same token flow; `skyreg.client.aio`, imported
only where asyncio runs)."""

from skyreg.client.protocol import ALL_MANIFESTS, RegistryClientError, registry_url, short_digest
from skyreg.client.registry import DEFAULT_PIECE_SIZE, RegistryClient, Response

__all__ = [
    "ALL_MANIFESTS",
    "DEFAULT_PIECE_SIZE",
    "RegistryClient",
    "RegistryClientError",
    "Response",
    "registry_url",
    "short_digest",
]
