"""The registry gives each pushed image seekable indexes of its layers (the scan worker, off the
request path), as an OCI referrer a client finds with the referrers API; a client reads one file
of a layer through them with HTTP Range requests, every chunk verified."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import zstandard

from skyreg.lazy.index import (
    ARTIFACT_TYPE,
    GZIP_POINTS_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    decode_index,
)
from skyreg.lazy.reader import LayerReader
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, descriptor, push_blob, put_manifest, sha256
from tests.support.platform import Tenancy, authed
from tests.support.waiting import wait_for

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


@dataclass
class Site:
    server: InProcessRegistry
    session: requests.Session

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.server.url + path, timeout=60, **kw)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("lazy") / "data",
        options={"scan_worker": True, "lazy_index": True},
    )
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        tenancy.app("shop", "acme")
        secret, _ = tenancy.token("org", org="acme")
        yield Site(server, authed(secret))
    finally:
        server.stop()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _push(site: Site, tag: str, layers: list[tuple[str, bytes]]) -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    for blob in [config, *(data for _, data in layers)]:
        push_blob(site.server.url, "shop", blob, site.session)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(media_type, data) for media_type, data in layers],
        }
    ).encode()
    response = put_manifest(site.server.url, "shop", tag, manifest, session=site.session)
    assert response.status_code == 201, response.text
    return sha256(manifest)


def _index_referrer(site: Site, digest: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        listed = site.get(f"/v2/shop/referrers/{digest}", params={"artifactType": ARTIFACT_TYPE})
        assert listed.status_code == 200, listed.text
        manifests = listed.json()["manifests"]
        if not manifests:
            return None
        [only] = manifests
        got = site.get(f"/v2/shop/manifests/{only['digest']}", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200
        return dict(got.json())

    return wait_for(found, "the image's layer-index referrer", timeout=120)


class HttpRanges:
    """A layer blob read by HTTP Range requests to the registry, counting bytes."""

    def __init__(self, site: Site, digest: str) -> None:
        self.site, self.digest, self.fetched = site, digest, 0

    def read_range(self, offset: int, length: int) -> bytes:
        got = self.site.get(
            f"/v2/shop/blobs/{self.digest}",
            headers={"Range": f"bytes={offset}-{offset + length - 1}"},
        )
        assert got.status_code == 206, got.status_code
        self.fetched += len(got.content)
        return got.content


def test_an_images_layers_get_indexes_a_client_reads_a_file_through(site: Site) -> None:
    filler = os.urandom(12 * 1024 * 1024)
    gz = gzip.compress(_tar({"filler": filler, "app/main": b"#!/bin/sh\necho hi\n"}), 6, mtime=0)
    plain = _tar({"etc/motd": b"hello\n"})
    one_frame = zstandard.ZstdCompressor().compress(_tar({"opt/x": b"x"}))
    image = _push(site, "v1", [(LAYER_GZIP, gz), (LAYER_TAR, plain), (LAYER_ZSTD, one_frame)])
    referrer = _index_referrer(site, image)
    assert referrer["artifactType"] == ARTIFACT_TYPE
    assert referrer["subject"]["digest"] == image
    by_layer: dict[str, dict[str, str]] = {}
    for layer in referrer["layers"]:
        by_layer.setdefault(layer["annotations"]["dev.skyreg.lazy.layer"], {})[
            layer["mediaType"]
        ] = layer["digest"]
    # The one-frame zstd layer has no index (its image's machines pull it whole).
    assert set(by_layer) == {sha256(gz), sha256(plain)}
    assert set(by_layer[sha256(gz)]) == {INDEX_MEDIA_TYPE, GZIP_POINTS_MEDIA_TYPE}
    assert set(by_layer[sha256(plain)]) == {INDEX_MEDIA_TYPE}

    blobs = by_layer[sha256(gz)]
    index = decode_index(site.get(f"/v2/shop/blobs/{blobs[INDEX_MEDIA_TYPE]}").content)
    points = site.get(f"/v2/shop/blobs/{blobs[GZIP_POINTS_MEDIA_TYPE]}").content
    assert index.digest == sha256(gz) and index.compression == "gzip"
    ranges = HttpRanges(site, sha256(gz))
    reader = LayerReader(index, ranges, points)
    [main] = [e for e in index.entries if e.name == "app/main"]
    assert reader.read_file(main) == b"#!/bin/sh\necho hi\n"
    # One seek span of the blob, not the 12 MiB before the file.
    assert ranges.fetched < len(gz) / 2


def test_a_layer_two_images_share_is_indexed_once(site: Site) -> None:
    shared = gzip.compress(_tar({"lib/shared.so": os.urandom(100_000)}), 6, mtime=0)
    first = _push(site, "a", [(LAYER_GZIP, shared)])
    second = _push(site, "b", [(LAYER_GZIP, shared), (LAYER_TAR, _tar({"b": b"b"}))])
    one, two = _index_referrer(site, first), _index_referrer(site, second)

    def index_of(referrer: dict[str, Any]) -> str:
        [digest] = [
            layer["digest"]
            for layer in referrer["layers"]
            if layer["annotations"]["dev.skyreg.lazy.layer"] == sha256(shared)
            and layer["mediaType"] == INDEX_MEDIA_TYPE
        ]
        return str(digest)

    assert index_of(one) == index_of(two)


@pytest.mark.parametrize("field", ["artifactType", "config"])
def test_a_client_cannot_push_a_layer_index_referrer(site: Site, field: str) -> None:
    """Agents mount images through these referrers: only the registry's own may exist, or a
    tenant could make machines of its image (and of the same image elsewhere) see a tree other
    than its layers'."""
    image = _push(site, f"forged-{field}", [(LAYER_TAR, _tar({"etc/motd": b"real\n"}))])
    empty = b"{}"
    push_blob(site.server.url, "shop", empty, site.session)
    fake = json.dumps({"entries": []}).encode()
    push_blob(site.server.url, "shop", fake, site.session)
    config = (
        {"mediaType": ARTIFACT_TYPE, "digest": sha256(empty), "size": 2}
        if field == "config"
        else {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(empty), "size": 2}
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": [descriptor(INDEX_MEDIA_TYPE, fake)],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image, "size": 1},
    }
    if field == "artifactType":
        manifest["artifactType"] = ARTIFACT_TYPE
    body = json.dumps(manifest).encode()
    response = put_manifest(site.server.url, "shop", sha256(body), body, session=site.session)
    assert response.status_code == 403, response.text
    assert response.json()["errors"][0]["code"] == "DENIED"
    assert "reserved" in response.json()["errors"][0]["message"]
