"""Preparing an image for machines: pulled from a running registry into the layer cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from skyreg.client.push import push_image as push_local
from skyreg.machines.layercache import LayerCache, clone_rootfs
from skyreg.machines.prepare import PrepareError, RegistrySource, prepare_image
from tests.support.images import build_image, build_platform_pair, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry


@pytest.fixture(scope="module")
def registry_with_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRegistry]:
    root = tmp_path_factory.mktemp("prepare")
    reg = InProcessRegistry(data_dir=root / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        yield reg
    finally:
        reg.stop()


def _push_layout(reg: ServedRegistry, layout: Path, ref: str, tag: str) -> str:
    secret = Tenancy(reg.data_dir).admin_secret()
    result = push_local(f"oci:{layout}:{tag}", f"{reg.host}/{ref}", secret)
    return result.digest


def _prepare(
    reg: ServedRegistry, cache_root: Path, repo: str, digest: str, arch: str | None = None
) -> tuple[object, list[str]]:
    secret = Tenancy(reg.data_dir).admin_secret()

    async def go() -> tuple[object, list[str]]:
        async with aiohttp.ClientSession() as session:
            source = RegistrySource(reg.url, secret, session)
            prepared = await prepare_image(source, LayerCache(cache_root), repo, digest, arch=arch)
            return prepared, source.blobs_fetched

    return asyncio.run(go())


def test_cold_then_warm_preparation(registry_with_images: ServedRegistry, tmp_path: Path) -> None:
    img = build_image("prepare")
    layout = write_oci_layout(tmp_path / "layout", [("v1", img)])
    digest = _push_layout(registry_with_images, layout, "web:v1", "v1")
    assert digest == img.manifest_digest
    cache = tmp_path / "cache"
    prepared, fetched = _prepare(registry_with_images, cache, "web", digest)
    assert sorted(fetched) == sorted([img.config_digest, *img.layer_digests])
    assert prepared.config == img.config  # type: ignore[attr-defined]
    rootfs = prepared.rootfs  # type: ignore[attr-defined]
    assert (rootfs / "etc/skyreg-test.txt").read_bytes() == img.marker_text
    assert (rootfs / "bin/busybox").stat().st_mode & 0o111
    # Warm: nothing is downloaded again, the same unpacked tree is reused.
    again, fetched_again = _prepare(registry_with_images, cache, "web", digest)
    assert fetched_again == []
    assert again.rootfs == rootfs  # type: ignore[attr-defined]
    # A machine gets its own copy.
    machine = tmp_path / "machine-1"
    clone_rootfs(rootfs, machine)
    (machine / "etc/skyreg-test.txt").write_text("changed")
    assert (rootfs / "etc/skyreg-test.txt").read_bytes() == img.marker_text


def test_index_resolves_to_the_host_platform(
    registry_with_images: ServedRegistry, tmp_path: Path
) -> None:
    host, other = build_platform_pair("prepare-index")
    layout = write_oci_layout(tmp_path / "layout", [], indexes=[("multi", [host, other])])
    digest = _push_layout(registry_with_images, layout, "web:multi", "multi")
    prepared, _ = _prepare(registry_with_images, tmp_path / "cache", "web", digest)
    assert prepared.manifest_digest == host.manifest_digest  # type: ignore[attr-defined]
    rootfs = prepared.rootfs  # type: ignore[attr-defined]
    assert (rootfs / f"etc/skyreg-arch-{host.architecture}").exists()
    assert not (rootfs / f"etc/skyreg-arch-{other.architecture}").exists()
    with pytest.raises(PrepareError, match="no linux/s390x image"):
        _prepare(registry_with_images, tmp_path / "cache2", "web", digest, arch="s390x")


def test_unknown_image_is_a_clear_error(
    registry_with_images: ServedRegistry, tmp_path: Path
) -> None:
    missing = "sha256:" + "0" * 64
    with pytest.raises(PrepareError, match="MANIFEST_UNKNOWN"):
        _prepare(registry_with_images, tmp_path / "cache", "web", missing)
