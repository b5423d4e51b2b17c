"""`/apps/{app}/images` and `/apps/{app}/images/{reference}` (show, delete)."""

from __future__ import annotations

from msgspec import UNSET

from skyreg.meta.platform import ImageTag
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.services import images


def image_model(image: ImageTag) -> models.Image:
    """A tag of an app's repositories."""
    return models.Image(
        repository=image.repository,
        tag=image.tag,
        digest=image.digest,
        media_type=image.media_type,
        size=image.size,
        pushed_at=models.time(image.pushed_at),
        pulled_at=models.maybe_time(image.pulled_at),
    )


def _part(part: images.Part) -> models.ImagePart:
    return models.ImagePart(digest=part.digest, media_type=part.media_type, size=part.size)


def image_detail_model(found: images.ImageDetail) -> models.ImageDetail:
    """One image, with its blobs and regions in a multi-region registry."""
    detail = models.ImageDetail(
        repository=found.repository,
        reference=found.reference,
        digest=found.digest,
        media_type=found.media_type,
        size=found.size,
        manifests=[
            models.ImageManifest(
                digest=m.digest,
                media_type=m.media_type,
                size=m.size,
                platform=m.platform,
                config=None if m.config is None else _part(m.config),
                layers=[_part(p) for p in m.layers],
            )
            for m in found.manifests
        ],
        platforms_left_out=found.platforms_left_out,
        referrers_left_out=found.referrers_left_out,
        referrers=[
            models.ImageReferrer(
                digest=r.digest,
                media_type=r.media_type,
                size=r.size,
                artifact_type=r.artifact_type,
            )
            for r in found.referrers
        ],
        pulled_at=models.maybe_time(found.pulled_at),
    )
    if found.blobs is None or found.regions is None:
        return detail
    detail.blobs = [models.BlobRegions(digest=b.digest, size=b.size, regions=b.regions)
                    for b in found.blobs]  # fmt: skip
    detail.regions = {
        region: models.RegionHolding(complete=complete, bytes=held)
        for region, (complete, held) in found.regions.items()
    }
    return detail


async def list_images(call: Call) -> models.ImageList:
    """A page of the tags of the app's repositories."""
    limit = call.query_int("limit", images.MAX_IMAGE_PAGE, 1, images.MAX_IMAGE_PAGE)
    app, tags = await call.services.images.list_images(
        call.token, call.path("app"), limit, call.query("cursor")
    )
    return models.ImageList(
        app=app.name,
        images=[image_model(i) for i in tags],
        next_cursor=images.image_cursor(tags[-1]) if len(tags) == limit else UNSET,
    )


async def show_image(call: Call) -> models.ImageDetail:
    """One image of the app."""
    found = await call.services.images.show_image(
        call.token, call.path("app"), call.path("reference")
    )
    return image_detail_model(found)


async def delete_image(call: Call) -> models.DeletedImage:
    """Remove a tag, or a manifest with its tags."""
    deleted = await call.services.images.delete_image(
        call.caller(), call.path("app"), call.path("reference")
    )
    result = models.DeletedImage(repository=deleted.repository)
    if deleted.tag is not None:
        result.tag = deleted.tag
    if deleted.digest is not None:
        result.digest = deleted.digest
    return result


ROUTES = [
    Route(
        "GET", "/apps/{app}/images", list_images, "listImages",
        "The tags of the app's repositories (`<app>` and `<app>/...`) by repository and tag, "
        "a page at a time", models.ImageList, errors=(400, 404), security="optional",
        query=(
            Param("limit", {"type": "integer", "minimum": 1, "maximum": images.MAX_IMAGE_PAGE,
                            "default": images.MAX_IMAGE_PAGE}, "Tags per page"),
            Param("cursor", {"type": "string"},
                  "The next_cursor of the previous page (absent: the first page)"),
        ),
        response_description="Tags with digest, media type, size and push time",
    ),
    Route(
        "GET", "/apps/{app}/images/{reference}", show_image, "showImage",
        "One image: its blobs and, in a multi-region registry, the regions holding each and "
        "whether the image is complete in each region", models.ImageDetail,
        errors=(404,), security="optional", response_description="The image",
    ),
    Route(
        "DELETE", "/apps/{app}/images/{reference}", delete_image, "deleteImage",
        "Delete an image of the app (tokens that may push to it): a tag (`TAG`, `REPO:TAG`) "
        "is removed and garbage collection deletes its manifest once nothing else holds it; "
        "a digest (`DIGEST`, `REPO@DIGEST`) deletes the manifest and every tag of it, refused "
        "(409) while an index of the repository references it", models.DeletedImage,
        errors=(403, 404, 409), response_description="What was deleted",
    ),
]  # fmt: skip
