"""`/apps/{app}/releases`: list and deploy."""

from __future__ import annotations

from skyreg.meta.platform import Release
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.services.inputs import CreateRelease
from skyreg.services.releases import DeployRequest

MAX_RELEASES = 1000


def release_model(release: Release) -> models.Release:
    """A release as the API shows it."""
    return models.Release(
        id=str(release.id),
        app=release.app_name,
        version=release.version,
        status=release.status,
        description=release.description,
        reason=release.reason,
        image_ref=release.image_ref,
        image_repository=release.image_repository,
        image_digest=release.image_digest,
        strategy=release.strategy,
        regions=list(release.regions),
        count=release.machine_count,
        stable=release.stable,
        user=models.ReleaseUser(id=release.user_id, name=release.user_name),
        created_at=models.time(release.created_at),
        updated_at=models.time(release.updated_at),
        env=release.env,
        service=models.service(release.service),
    )


async def list_releases(call: Call) -> models.ReleaseList:
    """The app's releases, newest first."""
    limit = call.query_int("limit", 25, 1, MAX_RELEASES)
    app, found = await call.services.releases.list_releases(call.caller(), call.path("app"), limit)
    return models.ReleaseList(app=app.name, releases=[release_model(r) for r in found])


async def create_release(call: Call) -> models.Release:
    """Deploy: `ReleaseService.deploy` checks the values, resolves and tags the image and
    records the release."""
    token = call.caller()
    body = call.body(CreateRelease)
    request = DeployRequest(
        app=call.path("app"),
        image=body.image,
        token=token,
        label=body.image_label,
        strategy=body.strategy,
        regions=tuple(body.regions),
        count=body.count,
        description=body.description,
        env=body.env,
        service=body.service,
    )
    return release_model(await call.services.releases.deploy(request))


ROUTES = [
    Route(
        "GET", "/apps/{app}/releases", list_releases, "listReleases",
        "The app's releases, newest first", models.ReleaseList, errors=(400, 404),
        query=(Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_RELEASES,
                               "default": 25}),),
        response_description="Releases",
    ),
    Route(
        "POST", "/apps/{app}/releases", create_release, "createRelease",
        "Deploy an image: resolve it to a digest, tag it into the app "
        "(APP:deployment-YYYYMMDD-HHMMSS or image_label) when it lives under another name, "
        "record a release", models.Release, status=201, request=CreateRelease,
        errors=(400, 403, 404), response_description="The new release",
    ),
]  # fmt: skip
