"""Starting machines before their image has arrived (lazy pull, issue 18): the agent's side.

When a machine's image has no unpacked tree in the layer cache yet, `LazyMounts.acquire` asks
the registry for the image's layer-index referrer (`GET /v2/<repo>/referrers/<digest>?
artifactType=application/vnd.skyreg.lazy-index.v1`, format: docs/lazy-index.md), fetches its
index documents and gzip seek points through the release's repository into the layer cache
(digests verified there, after a HEAD proved the repository may read each), and, when every
layer of the image has an index, starts a mount helper (`machines/lazymount.py`, one process per
image: pyfuse3 serves one filesystem per process) that presents the merged image tree read-only
at `<data-dir>/lazy/<image hex>/mnt`. The machine's rootfs is then an overlay with that mount as
its lower layer (`rootfs.fresh_rootfs(..., allow_copy=False)`): writes vanish on restart as
usual. Meanwhile the whole image is pulled and unpacked in the background, once per image; later
starts find the unpacked tree and never come here.

Anything missing — no referrer, a layer without an index, a blob that does not verify, a helper
that does not say `ready` within `READY_TIMEOUT` — is `LazyUnavailable` with the reason: the
agent then pulls the image whole, as it always did. `host_problem` says why this host cannot
mount at all (not root, no /dev/fuse, no pyfuse3).

Learned prefetch (`lazy/prefetch.py`): before starting a helper, the agent asks the server for
the image's prefetch list (`GET /api/v1/agent/apps/{app}/images/{reference}/prefetch`; none, or
an error, is an empty list) and hands it to the helper, which reads those chunks into its spool
(`<data-dir>/lazy/<image hex>/spool`) before it says `ready`. The helper records what the machine
reads in its first `PREFETCH_WINDOW` seconds and prints it; the agent reports it with a PUT of
the same path, replacing the list the next start of the image (on any host) will read first.

A mount lives while a machine uses it: `release` by the last one stops its helper (end of stdin,
SIGTERM, SIGKILL after `STOP_TIMEOUT`), detaches whatever is left mounted and removes its
directory; `close` (the agent stopping) does so for all, and `clean_stale` removes what an agent
killed before it could left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

from skyreg.client.api import call_api
from skyreg.client.protocol import basic_authorization
from skyreg.lazy.index import (
    ARTIFACT_TYPE,
    GZIP_POINTS_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    LAYER_ANNOTATION,
)
from skyreg.lazy.prefetch import WINDOW, PrefetchRange
from skyreg.machines.layercache import LayerCache, remove_tree
from skyreg.machines.lazymount import PREFETCH_LINE, READY, LayerSpec, MountSpec
from skyreg.machines.prepare import PrepareError, RegistrySource, ResolvedImage
from skyreg.machines.unpack import UnpackLimits
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.manifest import Descriptor, Manifest, parse_manifest
from skyreg.privatefs import private_dir

log = logging.getLogger("skyreg.agent")

# The annotation naming the layer an index blob describes (services/lazyindex.py: the layer
# contract keeps machines from importing the registry's services for one string).
READY_TIMEOUT = 120.0  # seconds for the helper to merge the tree and mount it
STOP_TIMEOUT = 15.0  # seconds for the helper to unmount before SIGKILL
MAX_REFERRERS_BYTES = 4 << 20
MAX_INDEX_BYTES = 512 << 20  # an index document or seek points blob (bounded by IndexLimits)
PREFETCH_WINDOW = WINDOW  # seconds after `ready` whose reads make the image's prefetch list
MAX_HELPER_LINE = 4 << 20  # bytes of one line of the helper's stdout (a prefetch list)
_MNT_DETACH = 2
_EINVAL = 22
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LazyUnavailable(Exception):
    """This image cannot start from a lazy mount (the message says why): pull it whole."""


def host_problem() -> str | None:
    """Why this agent cannot mount lazy images at all, or None."""
    if os.geteuid() != 0:
        return "the agent does not run as root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (pip install skyreg[lazy])"
    return None


@dataclass
class _Helper:
    """A live lazy mount of one image and the helper process serving it."""

    digest: str
    directory: Path
    proc: asyncio.subprocess.Process
    users: int = 0
    learn: asyncio.Task[None] | None = None  # reads the helper's prefetch list, reports it

    @property
    def mountpoint(self) -> Path:
        return self.directory / "mnt"


def mount_key(image: ResolvedImage) -> str:
    """What a lazy mount serves: one image through one repository. Machines of the same image
    digest pulled through another repository (another org's) get a mount of their own, which
    reads through their repository: a mount never outlives, nor reports for, another's."""
    return f"{image.repository}@{image.manifest_digest}"


@dataclass
class LazyMounts:
    """The agent's lazy mounts, one per image, under `root` (`<data-dir>/lazy`)."""

    root: Path
    cache: LayerCache
    limits: UnpackLimits = field(default_factory=UnpackLimits)  # the merged tree keeps them
    _live: dict[str, _Helper] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _pulls: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def acquire(
        self,
        source: RegistrySource,
        image: ResolvedImage,
        pull: Callable[[], Awaitable[object]],
    ) -> Path:
        """The mountpoint of `image`'s merged tree (one more user of it), mounting it if need
        be and then starting `pull` (the whole image into the cache) in the background.
        LazyUnavailable says why not."""
        key = mount_key(image)
        async with self._locks.setdefault(key, asyncio.Lock()):
            live = self._live.get(key)
            if live is not None and live.proc.returncode is not None:
                log.warning("the lazy mount helper of %s exited: mounting again", key)
                del self._live[key]
                await _stop_helper(live)
                live = None
            if live is None:
                referrer = await self._referrer(source, image)
                # The helper starts (its interpreter and imports) while the indexes come.
                proc = await _spawn_helper()
                helper = _Helper(image.manifest_digest, self._directory(image), proc)
                try:
                    layers = await self._indexes(source, image, referrer)
                    live = await self._start(source, image, layers, helper)
                except BaseException:
                    await _stop_helper(helper)
                    raise
                self._live[key] = live
            live.users += 1
            self._background(key, pull)
            return live.mountpoint

    async def release(self, key: str) -> None:
        """One user fewer of the mount `key` (`mount_key`); the last one unmounts it and stops
        its helper."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            live = self._live.get(key)
            if live is None:
                return
            live.users -= 1
            if live.users > 0:
                return
            del self._live[key]
            await _stop_helper(live)
            log.info("lazy mount of %s removed: no machine uses it any more", key)

    def pulling(self, key: str) -> bool:
        """Whether the background pull of the mount `key`'s image is still under way."""
        task = self._pulls.get(key)
        return task is not None and not task.done()

    async def close(self) -> None:
        """Stop background pulls and every helper; nothing stays mounted."""
        for task in self._pulls.values():
            task.cancel()
        if self._pulls:
            await asyncio.wait(list(self._pulls.values()), timeout=STOP_TIMEOUT)
        self._pulls.clear()
        helpers, self._live = list(self._live.values()), {}
        await asyncio.gather(*(_stop_helper(h) for h in helpers))

    def _background(self, key: str, pull: Callable[[], Awaitable[object]]) -> None:
        if self.pulling(key):
            return

        async def run() -> None:
            began = time.monotonic()
            try:
                await pull()
            except Exception as e:  # the mount serves on; the next start tries again
                log.warning("background pull of %s failed: %s", key, e)
                return
            log.info("background pull of %s done (%.2fs)", key, time.monotonic() - began)

        self._pulls[key] = asyncio.create_task(run(), name=f"pull-{key}")

    # -- indexes -------------------------------------------------------------------------------

    async def _referrer(self, source: RegistrySource, image: ResolvedImage) -> Manifest:
        """The image's lazy-index referrer, or LazyUnavailable."""
        repository = image.repository
        try:
            found = await _referrers(source, repository, image.manifest_digest)
            if not found:
                raise LazyUnavailable("the registry has no lazy index of the image")
            raw, media_type = await source.manifest(repository, found)
            referrer = parse_manifest(raw, media_type, Digest.parse(found))
        except (PrepareError, RegistryError, ValueError) as e:
            raise LazyUnavailable(f"cannot read the image's lazy index: {e}") from None
        subject = referrer.subject
        if referrer.artifact_type != ARTIFACT_TYPE or subject is None:
            raise LazyUnavailable(f"referrer {found} is not a lazy index")
        if str(subject.digest) != image.manifest_digest:
            raise LazyUnavailable(f"referrer {found} indexes another image")
        return referrer

    async def _indexes(
        self, source: RegistrySource, image: ResolvedImage, referrer: Manifest
    ) -> list[LayerSpec]:
        """Every layer's index (and seek points) of `referrer` in the cache, or
        LazyUnavailable."""
        repository = image.repository
        by_layer: dict[str, dict[str, Descriptor]] = {}
        for d in referrer.layers:
            described = (d.annotations or {}).get(LAYER_ANNOTATION)
            if described is not None:
                by_layer.setdefault(described, {})[d.media_type] = d
        wanted: list[tuple[Descriptor, Descriptor, Descriptor | None]] = []
        missing: list[str] = []
        for layer in image.manifest.layers:
            kept = by_layer.get(str(layer.digest), {})
            index = kept.get(INDEX_MEDIA_TYPE)
            if index is None:
                missing.append(str(layer.digest))
            else:
                wanted.append((layer, index, kept.get(GZIP_POINTS_MEDIA_TYPE)))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise LazyUnavailable(f"no lazy index for layer {missing[0]}{more}")
        blobs = [d for _, index, points in wanted for d in (index, points) if d is not None]
        too_large = [d for d in blobs if d.size > MAX_INDEX_BYTES]
        if too_large:
            raise LazyUnavailable(f"index blob {too_large[0].digest} is too large")
        try:
            # The cache is shared by every app: its copies serve only a repository holding them.
            await source.check_readable(repository, [str(d.digest) for d in blobs])
            paths = await asyncio.gather(
                *(
                    self.cache.fetch(
                        str(d.digest), d.size, source.opener(repository, str(d.digest))
                    )
                    for d in blobs
                )
            )
        except Exception as e:  # a blob that does not verify, a failed download: pull whole
            raise LazyUnavailable(f"cannot fetch the lazy index: {e}") from None
        at = dict(zip((str(d.digest) for d in blobs), paths, strict=True))
        return [
            LayerSpec(
                digest=str(layer.digest),
                size=layer.size,
                index=str(at[str(index.digest)]),
                points=None if points is None else str(at[str(points.digest)]),
                blob=str(self.cache.path(str(layer.digest))),
            )
            for layer, index, points in wanted
        ]

    # -- the helper ----------------------------------------------------------------------------

    def _directory(self, image: ResolvedImage) -> Path:
        """The image's hex, then its repository's: one directory per (repository, image)."""
        of_repository = hashlib.sha256(image.repository.encode()).hexdigest()[:16]
        return self.root / f"{Digest.parse(image.manifest_digest).hex}-{of_repository}"

    async def _start(
        self, source: RegistrySource, image: ResolvedImage, layers: list[LayerSpec], helper: _Helper
    ) -> _Helper:
        """Hand the started `helper` its mount; it is `helper` once it said `ready`, else
        LazyUnavailable (the caller stops it)."""
        directory = helper.directory
        await asyncio.to_thread(_unmount_and_remove, directory)
        private_dir(directory)
        private_dir(directory / "mnt")
        private_dir(directory / "spool")
        learned = await _learned(source, image)
        spec = MountSpec(
            mountpoint=str(directory / "mnt"),
            registry=source.base_url,
            repository=image.repository,
            layers=layers,
            password=source.token,
            limits=self.limits,
            prefetch=learned,
            spool=str(directory / "spool"),
            record=PREFETCH_WINDOW if source.token else 0.0,
        )
        proc = helper.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(msgspec.json.encode(spec) + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except (TimeoutError, OSError, ValueError) as e:
            line = f"error: {e or 'no answer in time'}".encode()
        if line != READY:
            why = line.decode(errors="replace").strip().removeprefix("error: ")
            raise LazyUnavailable(f"the lazy mount failed: {why or 'the helper exited'}")
        log.info(
            "lazy mount of %s at %s (pid %d, %d prefetch ranges given)",
            image.manifest_digest,
            directory,
            proc.pid,
            len(learned),
        )
        helper.learn = asyncio.create_task(
            _learn(helper, source, image), name=f"learn-{image.manifest_digest}"
        )
        return helper


async def _spawn_helper() -> asyncio.subprocess.Process:
    """A mount helper process, waiting for its spec on stdin."""
    # The agent's token reaches the helper through stdin only; its environment drops it.
    env = {k: v for k, v in os.environ.items() if k != "SKYREG_TOKEN"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "skyreg.machines.lazymount",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
        start_new_session=True,  # a terminal's ^C reaches the agent, which stops it last
        limit=MAX_HELPER_LINE,
    )


def _prefetch_path(image: ResolvedImage) -> str:
    """The API path of the image's prefetch list: `/agent/apps/<app>/images/<ref>/prefetch`,
    the app being the repository's first component (`<app>` or `<app>/...`)."""
    repository = image.repository
    app = repository.split("/", 1)[0]
    digest = image.manifest_digest
    reference = digest if repository == app else f"{repository}@{digest}"
    quoted = urllib.parse.quote(reference, safe=":@")
    return f"/agent/apps/{urllib.parse.quote(app, safe='')}/images/{quoted}/prefetch"


async def _learned(source: RegistrySource, image: ResolvedImage) -> list[PrefetchRange]:
    """The image's prefetch list as the server keeps it ([] when none, or on any error: a
    start without prefetch is still a start)."""
    if not source.token:
        return []
    try:
        answer = await call_api(
            source.session, source.base_url, source.token, "GET", _prefetch_path(image)
        )
        return msgspec.convert(answer["ranges"], list[PrefetchRange])
    except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError, KeyError,
            TypeError, msgspec.ValidationError) as e:  # fmt: skip
        log.info("no prefetch list for %s: %s", image.manifest_digest, e)
        return []


async def _learn(helper: _Helper, source: RegistrySource, image: ResolvedImage) -> None:
    """Read the helper's stdout after `ready`; report the prefetch list it prints."""
    stdout = helper.proc.stdout
    assert stdout is not None and source.token
    while True:
        try:
            line = await stdout.readline()
        except (ValueError, OSError) as e:  # a line over MAX_HELPER_LINE
            log.warning("lazy mount helper of %s: %s", image.manifest_digest, e)
            return
        if not line:
            return
        if not line.startswith(PREFETCH_LINE):
            continue
        try:
            ranges = msgspec.json.decode(line[len(PREFETCH_LINE) :], type=list[PrefetchRange])
            await call_api(
                source.session,
                source.base_url,
                source.token,
                "PUT",
                _prefetch_path(image),
                {"ranges": msgspec.to_builtins(ranges)},
            )
        except (aiohttp.ClientError, RuntimeError, TimeoutError, msgspec.DecodeError) as e:
            log.warning("cannot report the prefetch list of %s: %s", image.manifest_digest, e)
            continue
        log.info(
            "reported the prefetch list of %s: %d ranges, %d bytes",
            image.manifest_digest,
            len(ranges),
            sum(r.length for r in ranges),
        )


async def _referrers(source: RegistrySource, repository: str, digest: str) -> str | None:
    """The digest of the image's lazy-index referrer, if the registry lists one.

    `AsyncRegistryClient` has no referrers call: this is a GET with the agent's Basic
    credentials (the agent's own region's registry takes them)."""
    client = source.client
    query = urllib.parse.urlencode({"artifactType": ARTIFACT_TYPE})
    url = client.url(f"/v2/{repository}/referrers/{digest}?{query}")
    headers = {"Accept": "application/vnd.oci.image.index.v1+json"}
    if client.password:
        headers["Authorization"] = basic_authorization(client.username, client.password)
    try:
        async with client.session.get(url, headers=headers) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise LazyUnavailable(f"referrers of the image: HTTP {resp.status}")
            if (resp.content_length or 0) > MAX_REFERRERS_BYTES:
                raise LazyUnavailable("referrers of the image: too large an answer")
            body = await resp.content.read(MAX_REFERRERS_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise LazyUnavailable(f"referrers of the image: {e}") from None
    try:
        listed = json.loads(body)["manifests"]
        found = sorted(
            str(m["digest"])
            for m in listed
            if isinstance(m, dict) and m.get("artifactType") == ARTIFACT_TYPE
        )
    except (ValueError, KeyError, TypeError) as e:
        raise LazyUnavailable(f"referrers of the image: not an index: {e}") from None
    return found[0] if found else None


async def _stop_helper(helper: _Helper) -> None:
    """End the helper (stdin closed, SIGTERM, SIGKILL after STOP_TIMEOUT) and remove its mount."""
    proc = helper.proc
    if helper.learn is not None and helper.learn is not asyncio.current_task():
        helper.learn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await helper.learn
    if proc.returncode is None:
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the lazy mount helper %d did not stop: killed", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    await asyncio.to_thread(_unmount_and_remove, helper.directory)


def _unmount_and_remove(directory: Path) -> None:
    """Detach whatever is mounted at `directory/mnt` (a helper that died leaves a dead FUSE
    mount: stat fails there, so no `ismount`), then remove `directory`."""
    mnt = directory / "mnt"
    for _ in range(8):  # stacked mounts, one detach each
        if _libc.umount2(bytes(mnt), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err != _EINVAL and os.path.exists(mnt):
                log.warning("cannot unmount %s: %s", mnt, os.strerror(err))
            break
    if directory.exists():
        remove_tree(directory)


def clean_stale(root: Path) -> None:
    """Remove the lazy mounts an agent killed earlier left under `root` (none are in use)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        log.info("removing a stale lazy mount directory %s", entry)
        _unmount_and_remove(entry)
