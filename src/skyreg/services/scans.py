"""What is inside an app's images and what is known to be wrong with them.

The `scans` worker (`ScanService.worker`) takes queued image manifests (`meta/scans.py`), reads
their layers from the blob store as streams, on a thread (`scan/index.py`: nothing is unpacked
to disk), stores the index, attaches an SPDX and a CycloneDX SBOM to the image as OCI referrers
in the repository it was pushed to (so `GET /v2/<name>/referrers/<digest>` and oras find them),
and matches the packages against the OSV advisories the operator loaded (`import_advisories`);
when the advisories change, stored package lists are matched again without reading layers.

The read side (`sbom`, `vulns`, `files`, `summary`) answers for an app's image: a reference the
caller names or, by default, the image of the app's current release; for an index, the image of
one platform (linux/amd64 unless asked).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

import msgspec

from skyreg.meta.platform import App, PlatformMeta, Release, ReleaseMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta
from skyreg.meta.scans import (
    DONE,
    MAX_ATTEMPTS,
    AdvisoryRow,
    Claim,
    ScanMeta,
    ScanRecord,
    VulnDbStatus,
    unpack,
)
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest, digest_of
from skyreg.oci.manifest import parse_manifest
from skyreg.scan.index import IndexLimits, Layer, ScanError, index_image
from skyreg.scan.match import lookup_keys, match, normalize_name
from skyreg.scan.model import SEVERITIES as SEVERITIES  # the order pages show them in
from skyreg.scan.model import FileEntry, Finding, ImageIndex, OsRelease, Package
from skyreg.scan.osv import Advisory, OsvError, read_source
from skyreg.scan.sbom import (
    CYCLONEDX_ARTIFACT_TYPE,
    SPDX_ARTIFACT_TYPE,
    SbomError,
    cyclonedx_json,
    spdx_json,
)
from skyreg.services.access import required, visible_app, visible_org
from skyreg.services.artifacts import Stored, put_blob
from skyreg.services.errors import Forbidden, Invalid, NotFound
from skyreg.services.images import split_reference
from skyreg.services.lazyindex import LazyIndexer
from skyreg.store.base import BlobStore
from skyreg.workers import PeriodicWorker

log = logging.getLogger("skyreg.services.scans")

DEFAULT_INTERVAL = 2.0
STALE_CLAIM = timedelta(minutes=30)  # a claim older than this: its worker died
STEP_BUDGET = 30.0  # seconds of indexing per worker step before matching gets a turn
MATCH_BATCH = 20
READ_CHUNK = 8 * 1024 * 1024
BLOB_READ_TIMEOUT = 300.0
IMPORT_BATCH = 500
MAX_SUMMARY_APPS = 1000
MAX_SUMMARY_ROWS = 10_000
SBOM_FORMATS = {"spdx": SPDX_ARTIFACT_TYPE, "cyclonedx": CYCLONEDX_ARTIFACT_TYPE}
DEFAULT_PLATFORM = ("linux", "amd64")
_ANNOTATION_CREATED = "org.opencontainers.image.created"
_EMPTY = b"{}"


class _Forgotten(Exception):
    """No repository holds the image any more: its scan was dropped."""


def retry_delay(attempts: int) -> float:
    """Seconds before a failed scan is tried again: 1 min, 4 min, ..."""
    return 60.0 * float(4 ** max(0, attempts - 1))


class _BlobReader(io.RawIOBase):
    """A blob of a store that has no local file (S3), read from a thread as a file: each read
    of a chunk runs on the event loop, bounded in time."""

    def __init__(self, store: BlobStore, digest: Digest, loop: asyncio.AbstractEventLoop) -> None:
        self._store, self._digest, self._loop = store, digest, loop
        self._offset = 0
        self._buffer = b""
        self._ended = False

    def readable(self) -> bool:
        return True

    async def _chunk(self) -> bytes:
        parts = [c async for c in self._store.read(self._digest, self._offset, READ_CHUNK)]
        return b"".join(parts)

    def readinto(self, target: Any) -> int:
        if not self._buffer and not self._ended:
            future = asyncio.run_coroutine_threadsafe(self._chunk(), self._loop)
            data = future.result(timeout=BLOB_READ_TIMEOUT)
            self._offset += len(data)
            self._ended = len(data) < READ_CHUNK
            self._buffer = data
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _Abandoned(Exception):
    """The scan's worker was stopped: the indexing thread gives up at its next read."""


class _Stoppable(io.RawIOBase):
    """A blob file whose reads end once `stop` is set: a thread still indexing when the server
    stops must not hold the process's shutdown for the rest of a large image."""

    def __init__(self, raw: BinaryIO, stop: threading.Event) -> None:
        self._raw, self._stop = raw, stop

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        if self._stop.is_set():
            raise _Abandoned("the scan worker stopped")
        data = self._raw.read(len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _opener(
    store: BlobStore, digest: Digest, loop: asyncio.AbstractEventLoop, stop: threading.Event
) -> Callable[[], BinaryIO]:
    def open_blob() -> BinaryIO:
        path = store.local_path(digest)
        raw: BinaryIO = (
            path.open("rb")
            if path is not None
            else cast(BinaryIO, io.BufferedReader(_BlobReader(store, digest, loop), 1 << 20))
        )
        return cast(BinaryIO, io.BufferedReader(_Stoppable(raw, stop), 1 << 20))

    return open_blob


def _sbom_manifest(
    artifact_type: str,
    blob: bytes,
    subject_digest: str,
    subject_size: int,
    subject_type: str,
    created: str,
) -> bytes:
    """An OCI 1.1 artifact manifest: the empty config, the document as its one layer."""
    document = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": mt.OCI_EMPTY_CONFIG,
            "digest": str(digest_of(_EMPTY)),
            "size": len(_EMPTY),
        },
        "layers": [{"mediaType": artifact_type, "digest": str(digest_of(blob)), "size": len(blob)}],
        "subject": {"mediaType": subject_type, "digest": subject_digest, "size": subject_size},
        "annotations": {_ANNOTATION_CREATED: created},
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class ImageRef:
    """The image a question is about: where it is and what the caller called it."""

    app: App
    repository: str
    digest: str  # an image manifest (for an index: the chosen platform's)
    name: str  # REPOSITORY@DIGEST or REPOSITORY:TAG, for people


@dataclass(frozen=True)
class ImageVulns:
    image: ImageRef
    scan: ScanRecord
    findings: tuple[Finding, ...] | None
    database: VulnDbStatus


@dataclass(frozen=True)
class ImageFiles:
    """A page of an image's file list, by path."""

    image: ImageRef
    scan: ScanRecord
    files: list[FileEntry]
    next_after: str | None  # the last path of this page when more follow


@dataclass(frozen=True)
class SummaryRow:
    """One advisory and the apps whose current image it affects."""

    advisory: str
    aliases: tuple[str, ...]
    severity: str
    apps: dict[str, list[str]]  # app -> affected packages


@dataclass(frozen=True)
class ImportResult:
    read: int
    changed: int
    unchanged: int
    failed: int
    errors: list[str]
    generation: int
    seconds: float


@dataclass
class ScanService:
    """Indexing, matching and the questions about both."""

    scans: ScanMeta
    registry: RegistryMeta
    platform: PlatformMeta
    releases: ReleaseMeta
    store: BlobStore
    limits: IndexLimits = field(default_factory=IndexLimits)
    # Layer indexes for lazy pull, made for each image scanned (None: not made here).
    lazy: LazyIndexer | None = None
    stored: Stored | None = None  # records this region's copy of each blob put (multi-region)
    indexed: int = 0  # images this process indexed
    failed: int = 0
    matched: int = 0
    _last_prune: float = 0.0

    # -- the worker --------------------------------------------------------------------------

    def worker(self, interval: float = DEFAULT_INTERVAL) -> PeriodicWorker:
        return PeriodicWorker("scans", interval, self.step, logger=log)

    async def step(self) -> None:
        """Index what is queued (for at most STEP_BUDGET seconds), then match what is due."""
        deadline = time.monotonic() + STEP_BUDGET
        while time.monotonic() < deadline:
            # Scans of pushes into this region's store (its blobs are there).
            claim = await self.scans.run(self.scans.claim, STALE_CLAIM, self.registry.region)
            if claim is None:
                break
            await self.index(claim)
        while await self.match_due() and time.monotonic() < deadline:
            pass
        if time.monotonic() - self._last_prune > 600:
            self._last_prune = time.monotonic()
            await self.scans.run(self.scans.prune)

    async def index(self, claim: Claim) -> None:
        """Index one claimed image, store it, attach its SBOMs."""
        try:
            claim, index, stored_type, stored_size = await self._read_image(claim)
        except _Forgotten:
            return
        except ScanError as e:
            self.failed += 1
            log.info("scan of %s failed: %s", claim.digest, e)
            await self.scans.run(self.scans.fail, claim.digest, str(e), None)
            return
        except Exception as e:
            self.failed += 1
            retry = retry_delay(claim.attempts) if claim.attempts < MAX_ATTEMPTS else None
            log.warning("scan of %s failed (attempt %d): %r", claim.digest, claim.attempts, e)
            await self.scans.run(self.scans.fail, claim.digest, f"{type(e).__name__}: {e}", retry)
            return
        await self.scans.run(self.scans.finish, claim.digest, index)
        self.indexed += 1
        try:
            await self._attach_sboms(claim, index, stored_type, stored_size)
        except Exception:  # the scan stands; the SBOMs are still served from the index
            log.exception("SBOMs of %s not attached", claim.digest)
        if self.lazy is not None:
            try:
                await self._attach_layer_indexes(self.lazy, claim)
            except asyncio.CancelledError:
                raise
            except Exception:  # machines pull the image whole
                log.exception("layer indexes of %s not attached", claim.digest)

    async def _attach_layer_indexes(self, lazy: LazyIndexer, claim: Claim) -> None:
        stored = await self.registry.read(
            self.registry.get_manifest, claim.repository, claim.digest, True
        )
        if stored is None:
            return
        manifest = parse_manifest(stored.content, stored.media_type, Digest.parse(stored.digest))
        loop, stop = asyncio.get_running_loop(), threading.Event()
        try:
            await lazy.attach(
                claim.repository, manifest, lambda d: _opener(self.store, d, loop, stop)
            )
        except asyncio.CancelledError:
            stop.set()
            raise

    async def _read_image(self, claim: Claim) -> tuple[Claim, ImageIndex, str, int]:
        stored = await self.registry.read(
            self.registry.get_manifest, claim.repository, claim.digest, True
        )
        if stored is None:
            # Deleted from the repository that queued it (maybe pushed and deleted on purpose):
            # another repository holding the digest takes the scan over, else it is forgotten.
            holder = await self.scans.run(self.scans.relocate, claim.digest)
            if holder is None:
                raise _Forgotten
            claim = Claim(claim.digest, holder, claim.attempts)
            stored = await self.registry.read(
                self.registry.get_manifest, holder, claim.digest, True
            )
            if stored is None:  # deleted meanwhile too: the next claim tries again
                raise RuntimeError("the image's repositories changed while it was being read")
        manifest = parse_manifest(stored.content, stored.media_type, Digest.parse(stored.digest))
        loop, stop = asyncio.get_running_loop(), threading.Event()
        layers = [
            Layer(str(d.digest), d.media_type, _opener(self.store, d.digest, loop, stop))
            for d in manifest.layers
            if d.media_type not in mt.FOREIGN_LAYERS and not d.urls
        ]
        try:
            index = await asyncio.to_thread(index_image, layers, self.limits)
        except asyncio.CancelledError:
            # The worker is stopping: the thread ends at its next read; the claim goes stale
            # and is taken again (STALE_CLAIM) by a worker that runs.
            stop.set()
            raise
        return claim, index, stored.media_type, len(stored.content)

    async def _attach_sboms(
        self, claim: Claim, index: ImageIndex, subject_type: str, subject_size: int
    ) -> None:
        present = {
            r.artifact_type
            for r in await self.registry.read(
                self.registry.referrers, claim.repository, claim.digest, None
            )
        }
        created = datetime.now(UTC)
        for kind, artifact_type in SBOM_FORMATS.items():
            if artifact_type in present:
                continue
            render = spdx_json if kind == "spdx" else cyclonedx_json
            try:
                document = await asyncio.to_thread(
                    render, index, claim.repository, claim.digest, created
                )
            except SbomError as e:
                log.warning("%s SBOM of %s not made: %s", kind, claim.digest, e)
                continue
            raw = _sbom_manifest(
                artifact_type,
                document,
                claim.digest,
                subject_size,
                subject_type,
                created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            await self._put_blob(claim.repository, _EMPTY)
            await self._put_blob(claim.repository, document)
            digest = digest_of(raw)
            manifest = parse_manifest(raw, mt.OCI_MANIFEST, digest)
            await self.registry.run(self.registry.put_manifest, claim.repository, manifest, [])

    async def _put_blob(self, repository: str, data: bytes) -> None:
        await put_blob(self.store, self.registry, repository, data, self.stored)

    async def match_due(self) -> bool:
        """Match a batch of scans against the current advisories; whether there was any."""
        generation, batch = await self.scans.read(self.scans.to_match, MATCH_BATCH)
        for digest, os, packed in batch:
            packages = unpack(packed, tuple[Package, ...])
            findings = await asyncio.to_thread(self._match, packages, os)
            await self.scans.run(self.scans.store_findings, digest, generation, findings)
            self.matched += 1
        return bool(batch)

    def _match(self, packages: Sequence[Package], os: OsRelease | None) -> list[Finding]:
        keys = {k for p in packages for k in lookup_keys(p, os)}
        records = self.scans.advisories_for(keys)
        decoded: dict[tuple[str, str], list[Advisory]] = {
            key: [msgspec.json.decode(r, type=Advisory) for r in raw]
            for key, raw in records.items()
        }

        def lookup(ecosystem: str, name: str) -> Iterable[Advisory]:
            return decoded.get((ecosystem, name), ())

        return match(packages, os, lookup)

    # -- the vulnerability database -------------------------------------------------------------

    async def import_advisories(
        self, caller: TokenRecord | None, source: Path, label: str
    ) -> ImportResult:
        """Load OSV advisories from a zip or directory (admin): stored in batches while the
        registry serves; unchanged ones (same `modified`) skipped. Scans are matched again by
        the worker once the import changed anything."""
        if required(caller).kind != "admin":
            raise Forbidden("only an admin token may load vulnerability data")
        try:
            return await asyncio.to_thread(self._import, source, label)
        except (OsvError, zipfile.BadZipFile) as e:
            raise Invalid(f"not an OSV export: {e}"[:300]) from None

    def _import(self, source: Path, label: str) -> ImportResult:
        started = time.monotonic()
        read = changed = failed = 0
        errors: list[str] = []
        batch: list[AdvisoryRow] = []
        for item in read_source(source):
            if isinstance(item, Exception):
                failed += 1
                if len(errors) < 20:
                    errors.append(str(item)[:300])
                continue
            read += 1
            keys = frozenset(
                (a.ecosystem, normalize_name(a.ecosystem, a.name))
                for a in item.affected
                if a.ecosystem and a.name
            )
            batch.append(AdvisoryRow(item.id, item.modified, msgspec.json.encode(item), keys))
            if len(batch) >= IMPORT_BATCH:
                changed += self.scans.import_advisories(_unique(batch))
                batch = []
        if batch:
            changed += self.scans.import_advisories(_unique(batch))
        generation = self.scans.imported(label, changed)
        return ImportResult(
            read, changed, read - changed, failed, errors, generation, time.monotonic() - started
        )

    async def database(self) -> VulnDbStatus:
        return await self.scans.read(self.scans.vulndb_status)

    # -- questions -----------------------------------------------------------------------------

    def _image(
        self, caller: TokenRecord | None, app_name: str, image: str | None, platform: str | None
    ) -> ImageRef:
        app = visible_app(self.platform, caller, app_name, public_ok=True)
        if image is None:
            release = _current_release(self.releases.list_releases(app.id, 50))
            if release is None:
                raise NotFound("release of app", app.name)
            repository, digest, name = (
                release.image_repository,
                release.image_digest,
                f"{release.image_repository}@{release.image_digest}",
            )
        else:
            repository, ref, by_digest = split_reference(app.name, image)
            if repository != app.name and not repository.startswith(app.name + "/"):
                raise NotFound("image", image[:200])
            stored = self.registry.get_manifest(repository, ref, by_digest)
            if stored is None:
                raise NotFound("image", image[:200])
            digest, name = stored.digest, image
        stored = self.registry.get_manifest(repository, digest, True)
        if stored is None:
            raise NotFound("image", name[:200])
        if stored.media_type in mt.INDEXES:
            digest = _platform_child(stored.content, stored.media_type, stored.digest, platform)
        return ImageRef(app, repository, digest, name)

    def _scan(self, ref: ImageRef) -> ScanRecord:
        record = self.scans.scan(ref.digest)
        if record is None:
            raise NotFound("scan of image", ref.digest)
        return record

    async def sbom(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        fmt: str,
        platform: str | None = None,
    ) -> tuple[ImageRef, bytes]:
        """The image's SBOM document in `fmt` ("spdx" or "cyclonedx"), as attached to it in
        its repository; an image scanned while in another repository (the same digest pushed
        elsewhere first) gets one made now from the stored index, named after this repository:
        nothing of the other repository shows."""
        artifact_type = SBOM_FORMATS.get(fmt)
        if artifact_type is None:
            raise Invalid("format must be spdx or cyclonedx")
        ref, layer = await self.platform.read(self._sbom_layer, caller, app, image, platform, fmt)
        # Attached here; in a multi-region registry its bytes may not be in this region yet.
        if layer is not None and await self.store.stat(Digest.parse(layer)) is not None:
            chunks = [c async for c in self.store.read(Digest.parse(layer))]
            return ref, b"".join(chunks)
        index = await self.index_summary(ref.digest)
        render = spdx_json if fmt == "spdx" else cyclonedx_json
        try:
            document = await asyncio.to_thread(
                render, index, ref.repository, ref.digest, datetime.now(UTC)
            )
        except SbomError as e:
            raise Invalid(f"no {fmt} SBOM can be made for this image: {e}"[:300]) from None
        return ref, document

    def _sbom_layer(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        platform: str | None,
        fmt: str,
    ) -> tuple[ImageRef, str | None]:
        ref = self._image(caller, app, image, platform)
        record = self._scan(ref)
        for referrer in self.registry.referrers(ref.repository, ref.digest, SBOM_FORMATS[fmt]):
            stored = self.registry.get_manifest(ref.repository, referrer.digest, True)
            if stored is None:
                continue
            layers = parse_manifest(
                stored.content, stored.media_type, Digest.parse(stored.digest)
            ).layers
            if layers:
                return ref, str(layers[0].digest)
        if record.state != DONE:
            raise NotFound(f"{fmt} SBOM (scan {record.state}) of image", ref.name[:200])
        return ref, None

    async def vulns(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        severity: str | None = None,
        platform: str | None = None,
    ) -> ImageVulns:
        """The findings of the image's latest match, worst first; with `severity`, only those
        at least that severe."""
        if severity is not None and severity.upper() not in SEVERITIES:
            raise Invalid(f"severity must be one of {', '.join(SEVERITIES)}")
        return await self.platform.read(self._vulns, caller, app, image, platform, severity)

    def _vulns(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        platform: str | None,
        severity: str | None,
    ) -> ImageVulns:
        ref = self._image(caller, app, image, platform)
        record = self._scan(ref)
        findings = self.scans.findings(ref.digest)
        if severity is not None and findings is not None:
            worst = SEVERITIES.index(severity.upper())
            findings = tuple(f for f in findings if SEVERITIES.index(f.severity) <= worst)
        return ImageVulns(ref, record, findings, self.scans.vulndb_status())

    async def files(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        platform: str | None = None,
        *,
        prefix: str = "",
        after: str = "",
        limit: int = 10_000,
    ) -> ImageFiles:
        """Up to `limit` entries of the image's file list by path: those beginning with
        `prefix`, after the path `after` (sorting a large list runs off the event loop)."""
        return await self.platform.read(
            self._files, caller, app, image, platform, prefix.lstrip("/"), after, limit
        )

    def _files(
        self,
        caller: TokenRecord | None,
        app: str,
        image: str | None,
        platform: str | None,
        prefix: str,
        after: str,
        limit: int,
    ) -> ImageFiles:
        ref = self._image(caller, app, image, platform)
        record = self._scan(ref)
        entries = sorted(
            (
                e
                for e in self.scans.files(ref.digest)
                if e.path.startswith(prefix) and e.path > after
            ),
            key=lambda e: e.path,
        )
        page = entries[:limit]
        return ImageFiles(ref, record, page, page[-1].path if len(entries) > limit else None)

    async def packages(
        self, caller: TokenRecord | None, app: str, image: str | None, platform: str | None = None
    ) -> tuple[ImageRef, ScanRecord, tuple[Package, ...]]:
        return await self.platform.read(self._packages, caller, app, image, platform)

    def _packages(
        self, caller: TokenRecord | None, app: str, image: str | None, platform: str | None
    ) -> tuple[ImageRef, ScanRecord, tuple[Package, ...]]:
        ref = self._image(caller, app, image, platform)
        return ref, self._scan(ref), self.scans.packages(ref.digest)

    async def index_summary(self, digest: str) -> ImageIndex:
        """The OS release and packages of a scanned image (no file list)."""
        record = await self.scans.read(self.scans.scan, digest)
        packages = await self.scans.read(self.scans.packages, digest)
        return ImageIndex(os=record.os if record else None, packages=packages, files=())

    async def summary(self, caller: TokenRecord | None, org: str) -> list[SummaryRow]:
        """Advisories x apps: each advisory affecting the current image of an app of `org`."""
        return await self.platform.run(self._summary, caller, org)

    def _summary(self, caller: TokenRecord | None, org_name: str) -> list[SummaryRow]:
        org = visible_org(self.platform, required(caller), org_name)
        rows: dict[str, SummaryRow] = {}
        for app in self.platform.list_apps(org.id)[:MAX_SUMMARY_APPS]:
            release = _current_release(self.releases.list_releases(app.id, 50))
            if release is None:
                continue
            try:
                ref = self._image(
                    caller, app.name, f"{release.image_repository}@{release.image_digest}", None
                )
            except NotFound:
                continue
            for f in self.scans.findings(ref.digest) or ():
                row = rows.get(f.advisory)
                if row is None:
                    if len(rows) >= MAX_SUMMARY_ROWS:
                        continue
                    row = rows[f.advisory] = SummaryRow(f.advisory, f.aliases, f.severity, {})
                packages = row.apps.setdefault(app.name, [])
                if f.package not in packages:
                    packages.append(f.package)
        return sorted(rows.values(), key=lambda r: (SEVERITIES.index(r.severity), r.advisory))

    def metrics(self) -> str:
        return (
            "# HELP skyreg_scans_indexed_total Images this process indexed.\n"
            "# TYPE skyreg_scans_indexed_total counter\n"
            f"skyreg_scans_indexed_total {self.indexed}\n"
            "# HELP skyreg_scans_failed_total Image indexing attempts that failed here.\n"
            "# TYPE skyreg_scans_failed_total counter\n"
            f"skyreg_scans_failed_total {self.failed}\n"
            "# HELP skyreg_scans_matched_total Scans this process matched against advisories.\n"
            "# TYPE skyreg_scans_matched_total counter\n"
            f"skyreg_scans_matched_total {self.matched}\n"
        )


def _unique(rows: list[AdvisoryRow]) -> list[AdvisoryRow]:
    """The last record of each id in a batch (an export may hold one twice)."""
    return list({r.id: r for r in rows}.values())


def _current_release(releases: Sequence[Release]) -> Release | None:
    """The newest complete release, else the newest."""
    for release in releases:
        if release.status == "complete":
            return release
    return releases[0] if releases else None


def _platform_child(content: bytes, media_type: str, digest: str, platform: str | None) -> str:
    """The image of `platform` ("os/arch[/variant]", default linux/amd64) in an index."""
    index = parse_manifest(content, media_type, Digest.parse(digest))
    wanted = tuple(platform.split("/")) if platform else DEFAULT_PLATFORM
    images = [d for d in index.manifests if d.media_type in mt.IMAGE_MANIFESTS]
    for d in images:
        p = d.platform or {}
        have = (p.get("os"), p.get("architecture"), p.get("variant"))
        if have[:2] == wanted[:2] and (len(wanted) < 3 or have[2] == wanted[2]):
            return str(d.digest)
    if platform is None and images:
        return str(images[0].digest)
    raise NotFound("platform of image", platform or "/".join(DEFAULT_PLATFORM))
