"""Metadata-layer helpers: the databases every test of meta/ runs on, and manifests to store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from skyreg.meta.db import sqlite_url
from skyreg.meta.registry import RegistryMeta
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import digest_of
from skyreg.oci.manifest import Manifest, parse_manifest

DATABASES: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "postgresql": lambda request, _tmp: str(request.getfixturevalue("pg_url")),
    "sqlite": lambda _request, tmp: sqlite_url(tmp / "skyreg.db"),
}


def descriptor_of(data: bytes, media_type: str = "application/octet-stream") -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data)}


def manifest_of(config: bytes, layers: list[bytes], **extra: object) -> Manifest:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": descriptor_of(config),
            "layers": [descriptor_of(x) for x in layers],
            **extra,
        }
    ).encode()
    return parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))


def link_blobs(meta: RegistryMeta, repo: str, *blobs: bytes) -> None:
    for b in blobs:
        meta.link_blob(repo, str(digest_of(b)), len(b))
