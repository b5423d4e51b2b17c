"""Manifest parsing and validation: what a pushed manifest says and references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skyreg.oci import mediatypes as mt
from skyreg.oci.bounded import JSONInputError, load_json
from skyreg.oci.digest import Digest
from skyreg.oci.errors import ErrorCode, RegistryError

MAX_MANIFEST_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a manifest points at."""

    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest: its exact bytes, media type and references."""

    raw: bytes
    digest: Digest
    media_type: str
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    manifests: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = field(default=None)

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES

    def required_blobs(self) -> list[Descriptor]:
        """Blobs that must be in the repository before this manifest is accepted."""
        blobs = [self.config] if self.config is not None else []
        blobs += [d for d in self.layers if d.media_type not in mt.FOREIGN_LAYERS and not d.urls]
        return blobs

    def referrer_artifact_type(self) -> str | None:
        """The artifactType a referrers listing shows for this manifest."""
        if self.artifact_type:
            return self.artifact_type
        if self.config is not None:
            return self.config.media_type
        return None


def _invalid(message: str) -> RegistryError:
    return RegistryError(ErrorCode.MANIFEST_INVALID, message)


def _string_map(value: Any, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _invalid(f"{what} must be an object of strings")
    return value


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where}: descriptor must be an object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}: descriptor mediaType missing")
    digest_text = value.get("digest")
    if not isinstance(digest_text, str):
        raise _invalid(f"{where}: descriptor digest missing")
    try:
        digest = Digest.parse(digest_text)
    except RegistryError as e:
        raise _invalid(f"{where}: {e.message}") from None
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}: descriptor size must be a non-negative integer")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}: artifactType must be a string")
    platform = value.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise _invalid(f"{where}: platform must be an object")
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise _invalid(f"{where}: urls must be a list of strings")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        artifact_type=artifact_type,
        annotations=_string_map(value.get("annotations"), f"{where}: annotations"),
        platform=platform,
        urls=tuple(urls),
    )


def _descriptor_list(value: Any, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{where} must be a list")
    return tuple(_descriptor(v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_manifest(raw: bytes, content_type: str | None, digest: Digest) -> Manifest:
    """Validate `raw` as a manifest of `content_type` (or of its own mediaType field).

    The bytes are kept exactly as given; `digest` must already be their digest.
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise RegistryError(
            ErrorCode.MANIFEST_TOO_LARGE,
            f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_SIZE} bytes",
        )
    try:
        doc = load_json(raw, max_bytes=MAX_MANIFEST_SIZE)
    except JSONInputError as e:
        raise _invalid(f"manifest: {e}") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest must be a JSON object")
    field_type = doc.get("mediaType")
    if field_type is not None and not isinstance(field_type, str):
        raise _invalid("mediaType must be a string")
    header_type = (content_type or "").split(";", 1)[0].strip().lower() or None
    if header_type in (None, "application/json", "application/octet-stream"):
        header_type = None
    media_type = header_type or field_type
    if media_type is None:
        if "manifests" in doc:
            media_type = mt.OCI_INDEX
        elif "config" in doc:
            media_type = mt.OCI_MANIFEST
        else:
            raise _invalid("manifest has no media type (Content-Type or mediaType)")
    if media_type in (mt.DOCKER_SCHEMA1, mt.DOCKER_SCHEMA1_SIGNED):
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID, "Docker schema 1 manifests are not supported"
        )
    if media_type not in mt.MANIFEST_TYPES:
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID, f"unsupported manifest media type {media_type[:200]!r}"
        )
    if field_type is not None and field_type != media_type:
        raise _invalid(f"mediaType {field_type!r} does not match Content-Type {media_type!r}")
    if doc.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    annotations = _string_map(doc.get("annotations"), "annotations")
    if media_type in mt.INDEXES:
        return Manifest(
            raw=raw,
            digest=digest,
            media_type=media_type,
            manifests=_descriptor_list(doc.get("manifests"), "manifests"),
            subject=subject,
            artifact_type=artifact_type,
            annotations=annotations,
        )
    if "config" not in doc:
        raise _invalid("image manifest has no config")
    config = _descriptor(doc["config"], "config")
    layers = _descriptor_list(doc.get("layers", []), "layers")
    if media_type == mt.DOCKER_MANIFEST and not layers:
        raise _invalid("Docker image manifest has no layers")
    return Manifest(
        raw=raw,
        digest=digest,
        media_type=media_type,
        config=config,
        layers=layers,
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations,
    )
