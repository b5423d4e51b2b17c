"""The garbage collector of one server process (`Collector`): it works the queues `meta/gc.py`
keeps, and removes the bytes of dead blobs from this node's region's store.

A pass first applies the apps' retention policies (`meta/retention.py`) when a round is due
(every `--retention-interval` seconds; a manual pass always: the tags they delete queue their
manifests' reviews), then reviews the due manifests (a manifest deleted queues its blobs),
then the due blobs (a blob deleted queues the deletion of its bytes in every region), then this
region's due byte deletions, in batches of `BATCH`, until nothing is due or `STEP_BUDGET`
seconds are spent (a third each, what a phase leaves unused going to the next; retention gets a
quarter before them, and a round it leaves unfinished goes on at the next pass). The `gc`
worker runs a pass every `--gc-interval` seconds and records it in `gc_runs` when it did
something; `run_once` runs one now (`POST /api/v1/gc/runs`, `skyreg gc run`), the same code, so it
is as safe during pushes. A dry run takes one batch of `DRY_RUN_LIMIT` of each queue, decides
each item as a real pass would, undoes it and lists what would go; it deletes no bytes.

Bytes are deleted from a database thread, inside the transaction holding the pending deletion
(`GcMeta.delete_bytes`): the store is asynchronous, so that thread hands the deletion to this
process's event loop and waits for it (at most `REMOVE_TIMEOUT` seconds). A review or deletion
that raises is recorded as failed (tried again after a backoff) and counted; the pass goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from skyreg.meta.gc import GcMeta, GcRun, node_name
from skyreg.meta.retention import RetentionMeta
from skyreg.oci.digest import Digest
from skyreg.store.base import BlobStore
from skyreg.workers import PeriodicWorker

log = logging.getLogger("skyreg.registry.gc")

BATCH = 100  # items taken from a queue at a time
STEP_BUDGET = 10.0  # seconds a pass works before it yields until the next one
DRY_RUN_LIMIT = 1000  # items of each queue a dry run decides (and at most this many listed)
LISTED = 1000  # manifests and blobs a run lists as deleted (each list)
REMOVE_TIMEOUT = 120.0  # seconds the database thread waits for the store to delete a blob
DEFAULT_RETENTION_INTERVAL = 300.0  # seconds between rounds over the apps' retention policies
APPS_PER_PAGE = 100

BLOB_OUTCOMES = ("kept", "unlinked", "deleted", "skipped", "failed")
MANIFEST_OUTCOMES = ("kept", "deleted", "gone", "skipped", "failed")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


class Collector:
    """Reviews the GC queues of the registry's database and deletes dead blobs' bytes from
    `store`, the store of region `region` ("" without regions). Counters are this process's."""

    def __init__(
        self,
        meta: GcMeta,
        store: BlobStore,
        region: str,
        node: str | None = None,
        *,
        retention: RetentionMeta | None = None,
        retention_interval: float = DEFAULT_RETENTION_INTERVAL,
    ):
        self.meta = meta
        self.store = store
        self.region = region
        self.node = node or node_name()
        self.retention = retention  # None: apps' retention policies are not applied here
        self.retention_interval = retention_interval
        self.tags_deleted = 0  # by retention policies, in this process
        # called after a pass that unlinked or deleted blobs (org usage is smaller now)
        self.on_freed: Callable[[], None] | None = None
        self._retention_after = 0  # the app a retention round goes on after (by id)
        self._retention_due = 0.0  # monotonic time the next retention round may start
        self.reviews: Counter[tuple[str, str]] = Counter()  # (kind, outcome) -> reviews
        self.bytes_deleted = 0  # from this region's store, by this process
        self.deletion_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- running -------------------------------------------------------------------------------

    def worker(self, interval: float) -> PeriodicWorker:
        """The `gc` worker: a pass every `interval` seconds, recorded when it did something."""
        return PeriodicWorker("gc", interval, self._step, logger=log)

    async def _step(self) -> None:
        run = await self._pass("worker", dry_run=False)
        if run.did_something or run.failures:
            await self.meta.run(self.meta.record_run, run)
        if run.manifests_deleted or run.blobs_deleted or run.bytes_deleted:
            log.info(
                "gc: deleted %d manifest(s), %d blob(s), %d byte(s); %d failure(s)",
                run.manifests_deleted,
                run.blobs_deleted,
                run.bytes_deleted,
                run.failures,
            )

    async def run_once(self, dry_run: bool) -> GcRun:
        """One pass now (the same as the worker's), recorded as a manual run; a dry run
        changes nothing and lists what would be deleted."""
        run = await self._pass("manual", dry_run=dry_run)
        await self.meta.run(self.meta.record_run, run)
        return run

    async def _pass(self, kind: str, *, dry_run: bool) -> GcRun:
        self._loop = asyncio.get_running_loop()
        run = GcRun(node=self.node, kind=kind, dry_run=dry_run, started_at=datetime.now(UTC))
        start = time.monotonic()
        if self.retention is not None and (kind == "manual" or start >= self._retention_due):
            # before the reviews: the tags it deletes queue their manifests' reviews
            await self._apply_retention(run, dry_run, start + STEP_BUDGET / 4)
        start = time.monotonic()
        limit = DRY_RUN_LIMIT if dry_run else BATCH
        # Each phase may work until its share of the budget ends (time a phase leaves unused
        # goes to the next), so a backlog of one queue never starves the others.
        deadline = start + STEP_BUDGET / 3
        while True:  # manifests first: a manifest deleted queues its blobs
            due = await self.meta.read(self.meta.due_manifest_reviews, limit)
            progress = False
            for repo_id, digest in due:
                progress |= await self._review_manifest(run, repo_id, digest, dry_run)
                if time.monotonic() > deadline:
                    break
            if dry_run or len(due) < limit or not progress or time.monotonic() > deadline:
                break
        deadline = start + STEP_BUDGET * 2 / 3
        while True:
            blobs = await self.meta.read(self.meta.due_blob_reviews, limit)
            progress = False
            for digest in blobs:
                progress |= await self._review_blob(run, digest, dry_run)
                if time.monotonic() > deadline:
                    break
            if dry_run or len(blobs) < limit or not progress or time.monotonic() > deadline:
                break
        deadline = start + STEP_BUDGET
        while not dry_run:  # a dry run deletes no bytes
            digests = await self.meta.read(self.meta.due_deletions, self.region, BATCH)
            progress = False
            for digest in digests:
                progress |= await self._delete_bytes(run, digest)
                if time.monotonic() > deadline:
                    break
            if len(digests) < BATCH or not progress or time.monotonic() > deadline:
                break
        run.finished_at = datetime.now(UTC)
        if self.on_freed is not None and (run.links_deleted or run.blobs_deleted) and not dry_run:
            self.on_freed()
        return run

    async def _apply_retention(self, run: GcRun, dry_run: bool, deadline: float) -> None:
        """Apply every app's retention policy once (a round), app by app, until `deadline`;
        a round left unfinished goes on at the next pass. A dry run plans from the first app
        and changes nothing."""
        retention = self.retention
        assert retention is not None
        after = 0 if dry_run else self._retention_after
        while True:
            apps = await retention.read(retention.apps_with_policies, after, APPS_PER_PAGE)
            for app_id, app in apps:
                after = app_id
                try:
                    done = await retention.run(retention.apply, app_id, app, dry_run=dry_run)
                except Exception as e:
                    run.failures += 1
                    log.warning("retention: applying the policy of app %s failed: %s", app, e)
                    continue
                run.tags_deleted += done.tags_deleted
                if not dry_run:
                    self.tags_deleted += done.tags_deleted
                for tag in done.tags:
                    if len(run.deleted_tags) >= LISTED:
                        break
                    run.deleted_tags.append(f"{tag.repository}:{tag.tag}")
                if done.tags_deleted and not dry_run:
                    log.info("retention: deleted %d tag(s) of app %s", done.tags_deleted, app)
                if time.monotonic() > deadline:
                    if not dry_run:
                        self._retention_after = after  # the round goes on next pass
                    return
            if len(apps) < APPS_PER_PAGE:
                break
        if not dry_run:  # the round is over
            self._retention_after = 0
            self._retention_due = time.monotonic() + self.retention_interval

    async def _review_manifest(self, run: GcRun, repo_id: int, digest: str, dry_run: bool) -> bool:
        """Review one manifest into `run`; whether it was reviewed (not skipped)."""
        try:
            review = await self.meta.run(
                self.meta.review_manifest, repo_id, digest, dry_run=dry_run
            )
        except Exception as e:
            self.reviews["manifest", "failed"] += 1
            run.failures += 1
            log.warning("gc: review of manifest %s (repository %d) failed: %s", digest, repo_id, e)
            if not dry_run:
                await self.meta.run(
                    self.meta.review_failed, "manifest", (repo_id, digest), _describe(e)
                )
            return True
        self.reviews["manifest", review.outcome] += 1
        if review.outcome == "skipped":
            return False
        run.manifests_reviewed += 1
        if review.outcome == "deleted":
            run.manifests_deleted += 1
            if len(run.deleted_manifests) < LISTED:
                run.deleted_manifests.append(f"{review.repository}@{review.digest}")
        return True

    async def _review_blob(self, run: GcRun, digest: str, dry_run: bool) -> bool:
        """Review one blob into `run`; whether it was reviewed (not skipped)."""
        try:
            review = await self.meta.run(self.meta.review_blob, digest, dry_run=dry_run)
        except Exception as e:
            self.reviews["blob", "failed"] += 1
            run.failures += 1
            log.warning("gc: review of blob %s failed: %s", digest, e)
            if not dry_run:
                await self.meta.run(self.meta.review_failed, "blob", digest, _describe(e))
            return True
        self.reviews["blob", review.outcome] += 1
        if review.outcome == "skipped":
            return False
        run.blobs_reviewed += 1
        run.links_deleted += review.links_deleted
        if review.outcome == "deleted":
            run.blobs_deleted += 1
            if len(run.deleted_blobs) < LISTED:
                run.deleted_blobs.append(digest)
        return True

    async def _delete_bytes(self, run: GcRun, digest: str) -> bool:
        """Delete one dead blob's bytes from this region's store; whether the deletion was
        settled (done, found unneeded, or failed and put off)."""
        try:
            freed = await self.meta.run(self.meta.delete_bytes, digest, self.region, self._remove)
        except Exception as e:
            self.deletion_failures += 1
            run.failures += 1
            log.warning("gc: deleting the bytes of %s from the store failed: %s", digest, e)
            await self.meta.run(self.meta.deletion_failed, digest, self.region, _describe(e))
            return True
        if freed:
            self.bytes_deleted += freed
            run.bytes_deleted += freed
        return True

    def _remove(self, digest: str) -> int | None:
        """Delete `digest` from the store, from a database thread (inside the transaction
        holding its pending deletion), on this process's event loop; the bytes freed, or None
        when the store did not hold it."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the collector has no event loop yet")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # waiting here for the loop would never end
            raise RuntimeError("blob bytes are deleted from a database thread, not the loop")
        future = asyncio.run_coroutine_threadsafe(self._remove_async(digest), loop)
        try:
            return future.result(timeout=REMOVE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the store did not delete {digest} within {REMOVE_TIMEOUT:g}s"
            ) from None

    async def _remove_async(self, digest: str) -> int | None:
        parsed = Digest.parse(digest)
        size = await self.store.stat(parsed)
        if size is None:
            return None
        return size if await self.store.delete(parsed) else None

    # -- reporting -----------------------------------------------------------------------------

    async def metrics(self) -> str:
        """The `skyreg_gc_*` Prometheus section: this process's reviews and deleted bytes, and
        the registry's queue depths (deletions: this region's)."""
        status = await self.meta.run(self.meta.status, 0)
        deletions = status.deletions.get(self.region)
        lines = [
            "# HELP skyreg_gc_reviews_total GC reviews this process ran, by kind and outcome.",
            "# TYPE skyreg_gc_reviews_total counter",
        ]
        for kind, outcomes in (("blob", BLOB_OUTCOMES), ("manifest", MANIFEST_OUTCOMES)):
            lines += [
                f'skyreg_gc_reviews_total{{kind="{kind}",outcome="{o}"}} {self.reviews[kind, o]}'
                for o in outcomes
            ]
        lines += [
            "# HELP skyreg_gc_bytes_deleted_total Bytes of dead blobs this process deleted from "
            "its region's store.",
            "# TYPE skyreg_gc_bytes_deleted_total counter",
            f"skyreg_gc_bytes_deleted_total {self.bytes_deleted}",
            "# HELP skyreg_gc_deletion_failures_total Deletions of dead blobs' bytes by this "
            "process that failed (tried again later).",
            "# TYPE skyreg_gc_deletion_failures_total counter",
            f"skyreg_gc_deletion_failures_total {self.deletion_failures}",
            "# HELP skyreg_gc_queue_depth Items queued for GC: blob and manifest reviews, and "
            "byte deletions in this node's region.",
            "# TYPE skyreg_gc_queue_depth gauge",
            f'skyreg_gc_queue_depth{{queue="blobs"}} {status.blobs.queued}',
            f'skyreg_gc_queue_depth{{queue="manifests"}} {status.manifests.queued}',
            f'skyreg_gc_queue_depth{{queue="deletions"}} {deletions.queued if deletions else 0}',
            "# HELP skyreg_retention_tags_deleted_total Tags apps' retention policies deleted "
            "in this process.",
            "# TYPE skyreg_retention_tags_deleted_total counter",
            f"skyreg_retention_tags_deleted_total {self.tags_deleted}",
        ]
        return "\n".join(lines) + "\n"
