"""`/gc` and `/gc/runs`: garbage collection's status, and a pass on demand (admin)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from skyreg.meta.gc import GcRun, QueueDepth
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route
from skyreg.platform.http import ApiError
from skyreg.services.gc import GcService, StartGcRun

GC_KEY = web.AppKey("gc_service", GcService)


def _service(call: Call) -> GcService:
    service = call.request.app.get(GC_KEY)
    if service is None:  # an application built without a collector
        raise ApiError(404, "not_found", "garbage collection does not run on this server")
    return service


def run_model(run: GcRun) -> models.GcRun:
    """A pass as the status lists it."""
    return models.GcRun(
        node=run.node,
        kind=run.kind,
        dry_run=run.dry_run,
        started_at=models.time(run.started_at),
        finished_at=models.time(run.finished_at or run.started_at),
        manifests_reviewed=run.manifests_reviewed,
        manifests_deleted=run.manifests_deleted,
        blobs_reviewed=run.blobs_reviewed,
        blobs_deleted=run.blobs_deleted,
        links_deleted=run.links_deleted,
        bytes_deleted=run.bytes_deleted,
        failures=run.failures,
        error=run.error,
        tags_deleted=run.tags_deleted,
    )


async def gc_status(call: Call) -> models.GcStatus:
    """Queues, pending byte deletions per region, totals, the latest passes."""
    found = await _service(call).status(call.caller())
    status, settings = found.status, found.settings
    regions = sorted({*settings.regions, *status.deletions})
    none = QueueDepth(0, 0, 0)
    deletions = [
        models.GcDeletions(
            region=region,
            queued=status.deletions.get(region, none).queued,
            due=status.deletions.get(region, none).due,
            failing=status.deletions.get(region, none).failing,
            bytes=status.deletion_bytes.get(region, 0),
        )
        for region in regions
    ]
    totals = status.totals
    return models.GcStatus(
        region=found.region,
        worker=found.worker,
        settings=models.GcSettings(
            review_delay=settings.review_delay,
            keep_releases=settings.keep_releases,
            regions=list(settings.regions),
        ),
        manifest_reviews=models.GcQueue(
            queued=status.manifests.queued,
            due=status.manifests.due,
            failing=status.manifests.failing,
        ),
        blob_reviews=models.GcQueue(
            queued=status.blobs.queued, due=status.blobs.due, failing=status.blobs.failing
        ),
        deletions=deletions,
        totals=models.GcTotals(
            bytes_deleted=totals.get("bytes_deleted", 0),
            blobs_deleted=totals.get("blobs_deleted", 0),
            manifests_deleted=totals.get("manifests_deleted", 0),
            links_deleted=totals.get("links_deleted", 0),
            failures=totals.get("failures", 0),
        ),
        runs=[run_model(r) for r in status.runs],
        errors=status.last_errors,
    )


async def start_run(call: Call) -> models.GcRunResult:
    """One pass now, on the node that answers."""
    run = await _service(call).run(call.caller(), call.lazy_body(StartGcRun))
    return models.GcRunResult(
        **msgspec.structs.asdict(run_model(run)),
        deleted_manifests=run.deleted_manifests,
        deleted_blobs=run.deleted_blobs,
        deleted_tags=run.deleted_tags,
    )


ROUTES = [
    Route(
        "GET", "/gc", gc_status, "gcStatus",
        "Garbage collection: review queues (queued, due now, failing), bytes still to delete "
        "per region, totals collected, the latest passes and errors (admin)", models.GcStatus,
        errors=(403,), response_description="Garbage collection status",
    ),
    Route(
        "POST", "/gc/runs", start_run, "startGcRun",
        "Run a garbage collection pass now on the node that answers, safe during pushes "
        "(admin); `dry_run: true` deletes nothing and lists what would go",
        models.GcRunResult, request=StartGcRun, errors=(403,),
        response_description="The pass: what it reviewed and deleted (or would delete)",
    ),
]  # fmt: skip
