"""Pushing a local image to a registry, no skopeo needed: `push_image` reads a docker-archive
or an OCI layout (`imagesource.py`), asks the registry for every blob (HEAD) and uploads only the
missing ones (POST, streamed PATCH, PUT ?digest=) through `RegistryClient`, then puts the
manifest (a docker-archive's is built by `skyreg.oci.imagebuild`). Progress goes to a
`PushProgress` the caller gives (`skyreg push` draws Rich bars with it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from skyreg.client.imagesource import (
    ArchiveLayer,
    Compression,
    GzipDigestCache,
    LayerHashes,
    OciLayout,
    SourceError,
    detect_source,
    gzip_stream,
    hash_layers,
    member_streams,
    open_oci_layout,
    read_chunks,
    read_docker_archive,
    sha256_digest,
)
from skyreg.client.protocol import RegistryClientError, registry_url, short_digest
from skyreg.client.registry import DEFAULT_PIECE_SIZE, RegistryClient
from skyreg.oci.imagebuild import PushedLayer, archive_manifest, manifest_media_type
from skyreg.oci.mediatypes import FOREIGN_LAYERS, INDEXES
from skyreg.oci.reference import ImageReference
from skyreg.oci.reference import parse_reference as parse_image_reference

PATCH_SIZE = DEFAULT_PIECE_SIZE  # bytes per PATCH request of a blob upload (tests lower it)

# The push failed; the message is one line for the user. The client's errors are push errors.
PushError = RegistryClientError

__all__ = [
    "PushError",
    "PushProgress",
    "PushResult",
    "parse_reference",
    "push_image",
    "registry_url",
]

Task = int  # a progress task, as `PushProgress.add` numbers it


class PushProgress(Protocol):
    """What a push reports as it goes: one task per blob (and per pass over an archive)."""

    def add(self, description: str, total: int | None, status: str) -> Task:
        """A new task of `total` bytes (None: unknown) with a status word."""
        ...

    def advance(self, task: Task, n: int) -> None:
        """`n` more bytes of `task` were read or sent."""
        ...

    def status(self, task: Task, status: str) -> None:
        """`task`'s status word changed ("pushing")."""
        ...

    def done(self, task: Task, status: str, total: int | None = None) -> None:
        """`task` is complete (its size now known to be `total`, when given)."""
        ...


class NoProgress:
    """A `PushProgress` that reports nothing."""

    def add(self, description: str, total: int | None, status: str) -> Task:
        """No task: -1."""
        return -1

    def advance(self, task: Task, n: int) -> None:
        """Nothing."""

    def status(self, task: Task, status: str) -> None:
        """Nothing."""

    def done(self, task: Task, status: str, total: int | None = None) -> None:
        """Nothing."""


def parse_reference(text: str) -> ImageReference:
    """Parse `HOST[:PORT]/REPO[:TAG][@DIGEST]` (no tag and no digest: `latest`)."""
    try:
        target = parse_image_reference(text.strip().removeprefix("docker://"))
    except ValueError as e:
        raise PushError(f"invalid image reference {text[:300]!r}: {e}") from None
    if target.host is None:
        raise PushError(f"invalid image reference {text[:300]!r}: use HOST[:PORT]/APP[/NAME][:TAG]")
    return target.with_default_tag()


@dataclass(frozen=True)
class PushResult:
    """What was pushed: `reference` is `HOST/REPO@DIGEST`."""

    reference: str
    digest: str
    media_type: str
    size: int
    layers_uploaded: int
    layers_skipped: int
    bytes_uploaded: int


class _Pusher:
    def __init__(self, client: RegistryClient, progress: PushProgress) -> None:
        self.client = client
        self.progress = progress
        self.uploaded: set[str] = set()
        self.skipped: set[str] = set()
        self.bytes_uploaded = 0

    def layer_task(self, digest: str, size: int, exists: bool) -> Task:
        """A progress task for a layer; one the registry has is counted as skipped."""
        if not exists:
            return self.progress.add(short_digest(digest), size, "waiting")
        self.skipped.add(digest)
        task = self.progress.add(short_digest(digest), size, "exists")
        self.progress.done(task, "exists")
        return task

    def send(self, chunks: Iterable[bytes], task: Task) -> tuple[str, int]:
        """Upload a stream; (digest, size) of what was sent."""
        hasher = hashlib.sha256()
        sent = 0

        def counted() -> Iterator[bytes]:
            nonlocal sent
            for chunk in chunks:
                hasher.update(chunk)
                sent += len(chunk)
                self.progress.advance(task, len(chunk))
                yield chunk

        self.progress.status(task, "pushing")
        digest = self.client.upload(counted(), lambda: "sha256:" + hasher.hexdigest(), PATCH_SIZE)
        self.bytes_uploaded += sent
        self.progress.done(task, "pushed", total=sent)
        return digest, sent

    def push_bytes(self, data: bytes, description: str) -> None:
        """A small blob (a config) from memory, unless the registry has it."""
        digest = sha256_digest(data)
        if self.client.blob_exists(digest):
            return
        task = self.progress.add(description, len(data), "waiting")
        self.send([data], task)


def push_image(
    source: Path | str,
    reference: str,
    token: str | None,
    *,
    progress: PushProgress | None = None,
    ref: str | None = None,
    insecure: bool = False,
    cache: GzipDigestCache | None = None,
) -> PushResult:
    """Push a docker-archive tarball or an OCI image layout (`docker-archive:`/`oci:` prefixes
    work too; `ref` picks an image in a source holding several) to `reference`
    (`HOST[:PORT]/REPO[:TAG|@DIGEST]`). Blobs the registry has are not uploaded again.

    Raises PushError with a one-line message.
    """
    target = parse_reference(reference)
    try:
        src = detect_source(source, ref)
    except SourceError as e:
        raise PushError(str(e)) from None
    client = RegistryClient(
        registry_url(target.registry_host(), insecure), target.repository, token
    )
    try:
        pusher = _Pusher(client, progress or NoProgress())
        client.login()
        if src.kind == "oci":
            manifest, media_type = _push_oci(pusher, src.path, src.ref)
        else:
            manifest, media_type = _push_docker_archive(
                pusher, src.path, src.ref, cache or GzipDigestCache.default()
            )
        digest = sha256_digest(manifest)
        if target.digest is not None and target.digest != digest:
            raise PushError(
                f"the image's manifest is {digest}, not {target.digest} as the reference says"
            )
        answered = client.put_manifest(target.tag or digest, media_type, manifest)
        if answered and answered != digest:
            raise PushError(f"the registry stored the manifest as {answered}, not {digest}")
    except SourceError as e:
        raise PushError(str(e)) from None
    finally:
        client.close()
    return PushResult(
        reference=f"{target.host}/{target.repository}@{digest}",
        digest=digest,
        media_type=media_type,
        size=len(manifest),
        layers_uploaded=len(pusher.uploaded),
        layers_skipped=len(pusher.skipped - pusher.uploaded),
        bytes_uploaded=pusher.bytes_uploaded,
    )


def _push_docker_archive(
    pusher: _Pusher, path: Path, ref: str | None, cache: GzipDigestCache
) -> tuple[bytes, str]:
    """Three passes at most: find the image, hash what the cache does not know, upload what the
    registry lacks. Returns the Docker schema 2 (or, with zstd layers, OCI) manifest."""
    bars = pusher.progress
    try:
        archive_size = path.stat().st_size
    except OSError as e:
        raise PushError(f"cannot read {path}: {e.strerror}") from None

    def reading(label: str) -> tuple[Task, Callable[[int], None]]:
        task = bars.add(label, archive_size, "")
        return task, lambda n: bars.advance(task, n)

    task, on_read = reading(f"reading {path.name}")
    archive = read_docker_archive(path, ref, on_read)
    bars.done(task, "")
    layers = archive.layers

    # Digest and size of each layer as pushed.
    known: dict[str, tuple[str, int]] = {}
    to_hash: dict[str, Compression] = {}
    for layer in layers:
        cached = cache.get(layer.diff_id) if layer.compression == "none" else None
        if cached is not None:
            known[layer.member] = cached
        else:
            to_hash[layer.member] = layer.compression
    if to_hash:
        task, on_read = reading(f"hashing {len(to_hash)} layer(s)")
        hashes: dict[str, LayerHashes] = hash_layers(path, to_hash, on_read)
        bars.done(task, "")
        for layer in layers:
            if layer.member in known:
                continue
            found = hashes.get(layer.member)
            if found is None:
                raise PushError(f"{path}: could not read the layer {layer.member}")
            if layer.compression == "none":
                if found.sha256 != layer.diff_id:
                    raise PushError(
                        f"{path}: the layer {layer.member} is {found.sha256}, but the config "
                        f"says {layer.diff_id}"
                    )
                assert found.gzip_digest is not None and found.gzip_size is not None
                known[layer.member] = (found.gzip_digest, found.gzip_size)
                cache.put(layer.diff_id, found.gzip_digest, found.gzip_size)
            else:
                known[layer.member] = (found.sha256, _layer_size(layers, layer.member))
    cache.save()

    tasks: dict[str, Task] = {}
    missing: set[str] = set()
    by_digest: dict[str, str] = {}
    for layer in layers:
        if layer.member in tasks:
            continue
        digest, size = known[layer.member]
        if digest in by_digest:  # the same bytes under another name: pushed once
            tasks[layer.member] = tasks[by_digest[digest]]
            continue
        by_digest[digest] = layer.member
        exists = pusher.client.blob_exists(digest)
        tasks[layer.member] = pusher.layer_task(digest, size, exists)
        if not exists:
            missing.add(layer.member)
    pusher.push_bytes(archive.config, "config")
    if missing:
        compression = {layer.member: layer.compression for layer in layers}
        for member, chunks in member_streams(path, missing):
            stream = gzip_stream(chunks) if compression[member] == "none" else chunks
            digest, size = pusher.send(stream, tasks[member])
            expected = known[member][0]
            if digest != expected:
                if compression[member] != "none":
                    raise PushError(f"{path}: the layer {member} changed while it was pushed")
                for layer in layers:  # a stale cache entry: trust what was sent
                    if known[layer.member][0] == expected:
                        cache.put(layer.diff_id, digest, size)
                        known[layer.member] = (digest, size)
            known[member] = (digest, size)
            pusher.uploaded.add(digest)
            missing.discard(member)
        cache.save()
        if missing:
            raise PushError(f"{path}: the layer {sorted(missing)[0]} vanished while reading")

    pushed = [PushedLayer(layer.compression, *known[layer.member]) for layer in layers]
    return archive_manifest(archive.config, pushed)


def _layer_size(layers: Iterable[ArchiveLayer], member: str) -> int:
    return next(layer.size for layer in layers if layer.member == member)


def _push_oci(pusher: _Pusher, path: Path, ref: str | None) -> tuple[bytes, str]:
    """Push the blobs (and, for an index, the child manifests) of the chosen layout entry;
    returns its manifest exactly as stored in the layout."""
    layout, descriptor = open_oci_layout(path, ref)
    raw = layout.read_blob(descriptor["digest"])
    media_type = manifest_media_type(descriptor, raw)
    _push_oci_blobs(pusher, layout, raw, media_type, depth=0)
    return raw, media_type


def _push_oci_blobs(
    pusher: _Pusher, layout: OciLayout, raw: bytes, media_type: str, depth: int
) -> None:
    if depth > 4:
        raise PushError(f"{layout.path}: indexes nested too deeply")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise PushError(f"{layout.path}: a manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise PushError(f"{layout.path}: a manifest is not a JSON object")
    if media_type in INDEXES or "manifests" in doc:
        for child in doc.get("manifests") or []:
            digest = child.get("digest") if isinstance(child, dict) else None
            if not isinstance(digest, str):
                raise PushError(f"{layout.path}: an index entry has no digest")
            if pusher.client.manifest_exists(digest):
                continue
            child_raw = layout.read_blob(digest)
            child_type = manifest_media_type(child, child_raw)
            _push_oci_blobs(pusher, layout, child_raw, child_type, depth + 1)
            pusher.client.put_manifest(digest, child_type, child_raw)
        return
    blobs: list[tuple[dict[str, Any], bool]] = []
    if isinstance(doc.get("config"), dict):
        blobs.append((doc["config"], False))
    blobs += [(layer, True) for layer in doc.get("layers") or [] if isinstance(layer, dict)]
    for desc, is_layer in blobs:
        digest = desc.get("digest")
        if not isinstance(digest, str):
            raise PushError(f"{layout.path}: a manifest names a blob without a digest")
        if desc.get("mediaType") in FOREIGN_LAYERS and desc.get("urls"):
            continue
        if digest in pusher.uploaded or digest in pusher.skipped:
            continue
        size = int(desc.get("size") or 0)
        exists = pusher.client.blob_exists(digest)
        if not is_layer:
            if not exists:
                _send_file(pusher, layout, digest, pusher.progress.add("config", size, "waiting"))
            continue
        task = pusher.layer_task(digest, size, exists)
        if not exists:
            _send_file(pusher, layout, digest, task)
            pusher.uploaded.add(digest)


def _send_file(pusher: _Pusher, layout: OciLayout, digest: str, task: Task) -> None:
    blob = layout.blob_path(digest)
    try:
        f = open(blob, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise PushError(f"{layout.path}: blob {digest} is missing") from None
    except OSError as e:
        raise PushError(f"cannot read {blob}: {e.strerror}") from None
    with f:
        sent, _ = pusher.send(read_chunks(f, blob), task)
    if sent != digest:
        raise PushError(f"{layout.path}: blob {digest} does not match its digest")
