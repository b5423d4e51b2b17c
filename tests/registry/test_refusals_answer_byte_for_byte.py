"""The metadata's refusals (`skyreg.meta.errors`) are domain errors; `registry/app.py` gives them
their wire shape. These pin that shape byte for byte (status, OCI code, message, detail) against
a real skyreg (served in-process: the answers are the point, not the process), as it was when
`meta/` raised `RegistryError`s itself."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    image_manifest,
    push_blob,
    put_manifest,
    sha256,
)

REPO = "app/refusals"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[InProcessRegistry]:
    """A fresh registry per test, without authentication."""
    reg = InProcessRegistry(data_dir=tmp_path / "data", options={"auth": False})
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def _error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def test_a_manifest_with_a_missing_blob_answers_manifest_blob_unknown_naming_it(
    registry: InProcessRegistry,
) -> None:
    config = os.urandom(64)
    push_blob(registry.url, REPO, config)
    missing = sorted([sha256(b"layer one"), sha256(b"layer two")])
    r = put_manifest(registry.url, REPO, "t", image_manifest(config, [b"layer one", b"layer two"]))
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.content == _error_body(
        "MANIFEST_BLOB_UNKNOWN",
        f"blob {missing[0]} is not in repository {REPO}",
        {"digests": missing},
    )


def test_an_index_with_a_missing_child_answers_manifest_blob_unknown_naming_it(
    registry: InProcessRegistry,
) -> None:
    child = image_manifest(os.urandom(64), [])
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(OCI_MANIFEST, child)]}
    ).encode()
    r = put_manifest(registry.url, REPO, "multi", index, OCI_INDEX)
    assert r.status_code == 400, r.text
    assert r.content == _error_body(
        "MANIFEST_BLOB_UNKNOWN",
        f"manifest {sha256(child)} is not in repository {REPO}",
        {"digests": [sha256(child)]},
    )


def test_a_descriptor_size_other_than_the_blobs_answers_manifest_invalid(
    registry: InProcessRegistry,
) -> None:
    config = os.urandom(64)
    push_blob(registry.url, REPO, config)
    doc = json.loads(image_manifest(config, []))
    doc["config"]["size"] = 65
    r = put_manifest(registry.url, REPO, "t", json.dumps(doc).encode())
    assert r.status_code == 400, r.text
    assert r.content == _error_body(
        "MANIFEST_INVALID", f"descriptor of {sha256(config)} says 65 bytes; the blob has 64"
    )


def test_deleting_a_manifest_an_index_references_answers_409_denied_naming_the_index(
    registry: InProcessRegistry,
) -> None:
    config = os.urandom(64)
    push_blob(registry.url, REPO, config)
    child = image_manifest(config, [])
    assert put_manifest(registry.url, REPO, sha256(child), child).status_code == 201
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(OCI_MANIFEST, child)]}
    ).encode()
    assert put_manifest(registry.url, REPO, "multi", index, OCI_INDEX).status_code == 201
    url = f"{registry.url}/v2/{REPO}/manifests/{sha256(child)}"
    r = requests.delete(url, timeout=30)
    assert r.status_code == 409, r.text
    assert r.content == _error_body(
        "DENIED",
        f"manifest {sha256(child)} is referenced by manifest {sha256(index)}; delete that first",
        {"digest": sha256(child), "referenced_by": sha256(index)},
    )
    head = requests.head(url, timeout=30)  # refused; still there
    assert head.status_code == 200
