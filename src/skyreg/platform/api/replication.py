"""`/replication`: the replication queue (admin)."""

from __future__ import annotations

from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route


async def replication_status(call: Call) -> models.ReplicationStatus:
    """Job counts and bytes per region and state, and the latest jobs."""
    status = await call.services.images.replication_status(call.token)
    return models.ReplicationStatus(
        region=status.region,
        regions=status.regions,
        jobs=[
            models.JobCount(region=j.region, state=j.state, count=j.count, bytes=j.bytes)
            for j in status.jobs
        ],
        recent=[
            models.Job(
                digest=j.digest,
                region=j.region,
                state=j.state,
                attempts=j.attempts,
                bytes=j.bytes_moved,
                size=j.size,
                source=j.source_region,
                error=j.error,
                updated_at=models.time(j.updated_at),
            )
            for j in status.recent
        ],
    )


ROUTES = [
    Route(
        "GET", "/replication", replication_status, "replicationStatus",
        "The replication queue: jobs and bytes by region and state, and the 50 latest jobs "
        "(admin)", models.ReplicationStatus, errors=(403,),
        response_description="Queue status",
    ),
]  # fmt: skip
