"""Releases over HTTP: the app key of the `ReleaseService` and the JSON shape of a release.

Deploying itself is `skyreg.services.releases`; `DeployLimits` and `deployment_tag` are
re-exported for the commands and the server configuration that name them here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from skyreg.clock import utc_iso
from skyreg.meta.platform import Release
from skyreg.services.releases import DeployLimits, ReleaseService, deployment_tag

__all__ = ["RELEASES_KEY", "DeployLimits", "deployment_tag", "release_json"]

RELEASES_KEY = web.AppKey("releases", ReleaseService)


def release_json(release: Release) -> dict[str, Any]:
    """A release as the API shows it."""
    return {
        "id": str(release.id),
        "app": release.app_name,
        "version": release.version,
        "status": release.status,
        "description": release.description,
        "reason": release.reason,
        "image_ref": release.image_ref,
        "image_repository": release.image_repository,
        "image_digest": release.image_digest,
        "strategy": release.strategy,
        "regions": list(release.regions),
        "count": release.machine_count,
        "stable": release.stable,
        "user": {"id": release.user_id, "name": release.user_name},
        "created_at": utc_iso(release.created_at),
        "updated_at": utc_iso(release.updated_at),
    }
