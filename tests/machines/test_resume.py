"""An agent restarted mid-download resumes its layer downloads from a real registry.

What a killed agent leaves is the blob's part file in the layer cache, a prefix of the blob:
the next fetch asks the registry only for the rest (`Range`), and the registry's access log
shows what it served.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from skyreg.client.push import push_image as push_local
from skyreg.machines.layercache import LayerCache, Opener
from skyreg.machines.prepare import RegistrySource, prepare_image
from tests.support.images import Entry, TestImage, build_app_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy

MiB = 1 << 20
DEADLINE = 60.0
REPOSITORY = "web"
DATA_BIN = random.Random(30).randbytes(6 * MiB)  # random: gzip cannot shrink it


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    """A registry logging every request (status and bytes sent), with the app `web`."""
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("resume") / "data", options={"access_log": True}
    )
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(REPOSITORY, "acme")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def image(registry: InProcessRegistry, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    """An image whose second layer holds a few MB of random bytes, pushed to `registry`."""
    img = build_app_image("resume", [Entry("data.bin", "file", data=DATA_BIN)], cmd=["/bin/sh"])
    layout = write_oci_layout(tmp_path_factory.mktemp("layout"), [("v1", img)])
    secret = Tenancy(registry.data_dir).admin_secret()
    pushed = push_local(f"oci:{layout}:v1", f"{registry.host}/{REPOSITORY}:v1", secret)
    assert pushed.digest == img.manifest_digest
    return img


def big_layer(img: TestImage) -> tuple[str, bytes]:
    layer = img.layers[-1]
    assert layer.size > 4 * MiB
    return layer.digest, layer.gz


def part_file(cache_root: Path, digest: str) -> Path:
    """Where the layer cache writes `digest` while downloading it (what a kill leaves)."""
    algorithm, hexpart = digest.split(":")
    return cache_root / "blobs" / algorithm / f".{hexpart}.part"


def statuses(registry: InProcessRegistry, since: int, digest: str) -> list[int]:
    """The status of each GET of blob `digest` in the registry's access log, from character
    `since` of its log on (its byte counts leave out what sendfile sends)."""
    pattern = re.compile(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/[\d.]+" (\d+) ')
    return [int(status) for status in pattern.findall(registry.log()[since:])]


@dataclass
class CountingSource(RegistrySource):
    """A RegistrySource noting, by blob digest, the offsets its openers are asked for and the
    bytes the registry's blob streams yield."""

    offsets: dict[str, list[int]] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def opener(self, repository: str, digest: str) -> Opener:  # type: ignore[override]
        real = super().opener(repository, digest)

        async def counting(offset: int) -> AsyncIterator[bytes]:
            self.offsets.setdefault(digest, []).append(offset)
            stream = await real(offset)

            async def counted() -> AsyncIterator[bytes]:
                async for chunk in stream:
                    self.received[digest] = self.received.get(digest, 0) + len(chunk)
                    yield chunk

            return counted()

        return counting


def test_prepare_resumes_a_layer_left_half_downloaded(
    registry: InProcessRegistry, image: TestImage, tmp_path: Path
) -> None:
    digest, blob = big_layer(image)
    half = len(blob) // 2
    cache_root = tmp_path / "cache"
    part = part_file(cache_root, digest)
    part.parent.mkdir(mode=0o700, parents=True)
    part.write_bytes(blob[:half])  # exactly what an agent killed at that point leaves
    since = len(registry.log())

    secret = Tenancy(registry.data_dir).admin_secret()

    async def go() -> tuple[Path, CountingSource]:
        async with aiohttp.ClientSession() as session:
            source = CountingSource(registry.url, secret, session)
            prepared = await prepare_image(
                source, LayerCache(cache_root), REPOSITORY, image.manifest_digest
            )
            return prepared.rootfs, source

    rootfs, source = asyncio.run(go())
    assert source.offsets[digest] == [half]
    assert source.received[digest] == len(blob) - half  # only the second half came
    assert statuses(registry, since, digest) == [206]
    assert LayerCache(cache_root).path(digest).read_bytes() == blob
    assert not part.exists()
    assert (rootfs / "data.bin").read_bytes() == DATA_BIN


STALL_AT = MiB


def _fetch_until_stalled(url: str, secret: str, root: str, digest: str, size: int) -> None:
    """Child process: fetch `digest` through the registry, but once STALL_AT bytes arrived
    stop reading for good (the registry, kept from sending, waits too): a download under way
    when the test SIGKILLs this process."""

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            real = RegistrySource(url, secret, session).opener(REPOSITORY, digest)

            async def stalling(offset: int) -> AsyncIterator[bytes]:
                stream = await real(offset)

                async def slowed() -> AsyncIterator[bytes]:
                    got = 0
                    async for chunk in stream:
                        yield chunk
                        got += len(chunk)
                        if got >= STALL_AT:  # the cache wrote what it had before asking again
                            await asyncio.Event().wait()

                return slowed()

            await LayerCache(Path(root)).fetch(digest, size, stalling)

    asyncio.run(main())


def test_a_fetch_after_a_sigkill_mid_download_resumes_it(
    registry: InProcessRegistry, image: TestImage, tmp_path: Path
) -> None:
    digest, blob = big_layer(image)
    cache_root = tmp_path / "cache"
    part = part_file(cache_root, digest)
    secret = Tenancy(registry.data_dir).admin_secret()
    child = multiprocessing.get_context("spawn").Process(
        target=_fetch_until_stalled,
        args=(registry.url, secret, str(cache_root), digest, len(blob)),
    )
    child.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while not (part.is_file() and part.stat().st_size >= STALL_AT):
            assert child.exitcode is None, f"the child ended ({child.exitcode}) before the kill"
            assert time.monotonic() < deadline, "timed out waiting for the child's part file"
            time.sleep(0.01)
        child.kill()
    finally:
        if child.is_alive():
            child.kill()
        child.join(DEADLINE)
    assert child.exitcode == -9
    left = part.stat().st_size
    assert STALL_AT <= left < len(blob)
    since = len(registry.log())

    async def go() -> tuple[Path, CountingSource]:
        async with aiohttp.ClientSession() as session:
            source = CountingSource(registry.url, secret, session)
            opener = source.opener(REPOSITORY, digest)
            return await LayerCache(cache_root).fetch(digest, len(blob), opener), source

    path, source = asyncio.run(go())
    assert source.offsets[digest] == [left]
    assert source.received[digest] == len(blob) - left
    assert statuses(registry, since, digest) == [206]
    assert path.read_bytes() == blob
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not part.exists()


def test_a_registry_ignoring_the_range_makes_the_download_start_over(tmp_path: Path) -> None:
    """Some registries (or proxies before them) answer a ranged GET with the whole blob (200):
    the cache then cuts its part file and takes the blob from byte 0."""
    blob = random.Random(31).randbytes(3 * MiB)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    ranges: list[str | None] = []

    async def whole_blob(request: web.Request) -> web.Response:
        ranges.append(request.headers.get("Range"))
        return web.Response(body=blob, content_type="application/octet-stream")

    cache_root = tmp_path / "cache"
    part = part_file(cache_root, digest)
    part.parent.mkdir(mode=0o700, parents=True)
    part.write_bytes(blob[: MiB + 7])

    async def go() -> Path:
        app = web.Application()
        app.router.add_get(f"/v2/{REPOSITORY}/blobs/{digest}", whole_blob)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as session:
                source = RegistrySource(f"http://127.0.0.1:{port}", None, session)
                opener = source.opener(REPOSITORY, digest)
                return await LayerCache(cache_root).fetch(digest, len(blob), opener)
        finally:
            await runner.cleanup()

    path = asyncio.run(go())
    assert ranges == [f"bytes={MiB + 7}-", None]
    assert path.read_bytes() == blob
    assert not part.exists()
