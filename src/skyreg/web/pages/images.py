"""Console pages: an app's images (its manifests with their tags, sizes, last pulls, scans) and
one image (its tags, platforms and layers, referrers, regions, scan and findings, the commands
that pull and deploy it).

Everything comes from the management API's operations: `getApp`, `listImages` (paged by its
own cursor), `showImage` and `getVulns`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from skyreg.oci import mediatypes as mt
from skyreg.platform.http import ApiError
from skyreg.services.scans import SEVERITIES
from skyreg.web.base import PAGE_SIZE, Page, View, page, query_string

PAGES: list[Page] = []

SEARCH_CHUNK = 200  # tags per API page while searching
SEARCH_PAGES = 25  # API pages one search page reads at most (then: "continue searching")
TAG_PAGES = 10  # API pages of 1000 tags the image page reads to find the image's tags
TAG_CHUNK = 1000
FINDINGS_SHOWN = 200  # rows of the image page's findings table
LAYERS_SHOWN = 500  # rows of one platform's layers table (and of the blobs table)
SPDX = "application/spdx+json"
CYCLONEDX = "application/vnd.cyclonedx+json"


@dataclass(frozen=True)
class Scan:
    """What the scanner says of an image: its state and, once matched, counts by severity."""

    state: str
    counts: list[tuple[str, int]] | None  # worst first, severities found only
    digest: str  # the manifest scanned (of an index: its default platform's)


@dataclass
class ImageRow:
    """One manifest of the app's listing, with the tags of it on this page."""

    repository: str
    digest: str
    media_type: str
    size: int
    pushed_at: str  # the latest push of its tags
    pulled_at: str | None  # the manifest's last pull (recorded in batches); None: never
    tags: list[str] = field(default_factory=list)
    scan: Scan | None = None

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES

    @property
    def reference(self) -> str:
        """How the image page names it: DIGEST, or REPO@DIGEST outside the app's repository."""
        return self.digest if "/" not in self.repository else f"{self.repository}@{self.digest}"


def _group(images: list[Any]) -> list[ImageRow]:
    """Tags (in the API's order) grouped by manifest, in the order of their first tag."""
    rows: dict[tuple[str, str], ImageRow] = {}
    for image in images:
        key = (image.repository, image.digest)
        row = rows.get(key)
        if row is None:
            row = rows[key] = ImageRow(
                image.repository,
                image.digest,
                image.media_type,
                image.size,
                image.pushed_at,
                image.pulled_at,
            )
        row.tags.append(image.tag)
        row.pushed_at = max(row.pushed_at, image.pushed_at)
        if image.pulled_at is not None:
            row.pulled_at = max(row.pulled_at or "", image.pulled_at)
    return list(rows.values())


def _matches(image: Any, needle: str) -> bool:
    return needle in image.tag.casefold() or needle in image.digest.casefold()


def _counts(counts: dict[str, int] | None) -> list[tuple[str, int]] | None:
    if counts is None:
        return None
    return [(s, counts[s]) for s in SEVERITIES if counts.get(s)]


async def _scan(view: View, app: str, repository: str, digest: str) -> tuple[Scan | None, Any]:
    """The scan of the image (None: never queued) and getVulns' answer."""
    try:
        found = await view.api(
            "getVulns", params={"app": app}, query={"image": f"{repository}@{digest}"}
        )
    except ApiError as e:
        if e.status == 404:
            return None, None
        raise
    return Scan(found.scan.state, _counts(found.counts), found.scan.digest), found


@dataclass(frozen=True)
class Listing:
    """A page of the app's images: by the API's cursor, or a search over its pages."""

    rows: list[ImageRow]
    tags: int  # tags on this page
    q: str
    cursor: str
    next_cursor: str | None
    scanned: int  # tags the search read (0: no search)


async def _listing(view: View, app: str) -> Listing:
    q = view.arg("q").strip()
    cursor = view.arg("cursor")
    if not q:
        answer = await view.api(
            "listImages", params={"app": app}, query={"limit": PAGE_SIZE, "cursor": cursor}
        )
        after = answer.next_cursor if isinstance(answer.next_cursor, str) else None
        return Listing(_group(answer.images), len(answer.images), q, cursor, after, 0)
    # The API has no search: read its pages, keeping the tags that match, until a console
    # page is full (at an API page's end, so its cursor continues the search) or the bound.
    needle = q.casefold()
    kept: list[Any] = []
    scanned = 0
    next_cursor: str | None = cursor or None
    for _ in range(SEARCH_PAGES):
        answer = await view.api(
            "listImages",
            params={"app": app},
            query={"limit": SEARCH_CHUNK, "cursor": next_cursor},
        )
        scanned += len(answer.images)
        kept.extend(i for i in answer.images if _matches(i, needle))
        next_cursor = answer.next_cursor if isinstance(answer.next_cursor, str) else None
        if next_cursor is None or len(kept) >= PAGE_SIZE:
            break
    return Listing(_group(kept), len(kept), q, cursor, next_cursor, scanned)


@page(PAGES, "GET", "/apps/{app}")
async def app_page(view: View) -> web.StreamResponse:
    """The app's facts and its images, a page at a time, with their scans."""
    name = view.param("app")
    app = await view.api("getApp", params={"app": name})
    listing = await _listing(view, app.name)
    for row in listing.rows:
        row.scan, _ = await _scan(view, app.name, row.repository, row.digest)
    base = f"/apps/{app.name}"
    next_url = None
    if listing.next_cursor is not None:
        next_url = base + query_string(q=listing.q, cursor=listing.next_cursor)
    return view.render(
        "app.html",
        title=app.name,
        app=app,
        regions=app.regions if isinstance(app.regions, list) else [],
        listing=listing,
        base=base,
        next_url=next_url,
        first_url=base + query_string(q=listing.q) if listing.cursor else None,
    )


async def _app_tags(view: View, app: str) -> tuple[list[Any], bool]:
    """The app's first TAG_PAGES pages of tags, and whether that is all of them."""
    found: list[Any] = []
    cursor: str | None = None
    for _ in range(TAG_PAGES):
        answer = await view.api(
            "listImages", params={"app": app}, query={"limit": TAG_CHUNK, "cursor": cursor}
        )
        found.extend(answer.images)
        cursor = answer.next_cursor if isinstance(answer.next_cursor, str) else None
        if cursor is None:
            return found, True
    return found, False


@dataclass(frozen=True)
class Platform:
    """An image manifest of the shown image (itself, or one platform of an index) as the page
    shows it: at most LAYERS_SHOWN of its layers."""

    platform: str | None  # os/arch[/variant] of an index's child; None: a single image
    digest: str
    media_type: str
    manifest_size: int
    config: Any  # ImagePart, or None (an index's child this repository does not hold)
    layers: list[Any]  # the first LAYERS_SHOWN
    layer_count: int
    size: int  # manifest, config and layers

    @property
    def held(self) -> bool:
        return self.config is not None or self.layer_count > 0


def _platform(manifest: Any) -> Platform:
    parts = [manifest.config, *manifest.layers] if manifest.config else manifest.layers
    return Platform(
        manifest.platform,
        manifest.digest,
        manifest.media_type,
        manifest.size,
        manifest.config,
        manifest.layers[:LAYERS_SHOWN],
        len(manifest.layers),
        manifest.size + sum(p.size for p in parts),
    )


@dataclass(frozen=True)
class Referrer:
    """A manifest whose subject is the image, with what people call it."""

    kind: str  # "SBOM (SPDX)", "SBOM (CycloneDX)", "Signature", or "" when not known
    artifact_type: str | None
    digest: str
    media_type: str
    size: int


def _referrer(found: Any) -> Referrer:
    artifact = found.artifact_type
    kind = ""
    if artifact == SPDX:
        kind = "SBOM (SPDX)"
    elif artifact == CYCLONEDX:
        kind = "SBOM (CycloneDX)"
    elif artifact and ("cosign" in artifact.casefold() or "notary" in artifact.casefold()):
        kind = "Signature"
    return Referrer(kind, artifact, found.digest, found.media_type, found.size)


@page(PAGES, "GET", "/apps/{app}/images/{reference:.+}")
async def image_page(view: View) -> web.StreamResponse:
    """One image: its tags, size, platforms and layers, referrers, last pull, regions, scan,
    findings and the commands that use it."""
    name = view.param("app")
    reference = view.param("reference")
    app = await view.api("getApp", params={"app": name})
    every, complete = await _app_tags(view, app.name)
    image = await view.api("showImage", params={"app": app.name, "reference": reference})
    tags = [t for t in every if t.repository == image.repository and t.digest == image.digest]
    scan, vulns = await _scan(view, app.name, image.repository, image.digest)
    findings = [] if vulns is None or vulns.vulnerabilities is None else vulns.vulnerabilities
    host = view.services.auth.public_host
    first_tag = tags[0].tag if tags else None
    commands = []
    if first_tag is not None:
        commands.append(("Pull by tag", f"docker pull {host}/{image.repository}:{first_tag}"))
    commands.append(("Pull by digest", f"docker pull {host}/{image.repository}@{image.digest}"))
    commands.append(
        (
            "Deploy",
            f"skyreg deploy --app {app.name} --image {host}/{image.repository}@{image.digest}",
        )
    )
    title = f"{image.repository}:{first_tag}" if first_tag else f"{image.repository}@"
    if not first_tag:
        title += image.digest.partition(":")[2][:12]
    blobs = image.blobs if isinstance(image.blobs, list) else None
    return view.render(
        "image.html",
        title=title,
        app=app,
        image=image,
        reference=reference,
        is_index=image.media_type in mt.INDEXES,
        size=image.size if isinstance(image.size, int) else None,
        pushed_at=max((t.pushed_at for t in tags), default=None),
        pulled_at=image.pulled_at,
        platforms=[_platform(m) for m in image.manifests],
        platforms_left_out=image.platforms_left_out,
        layers_shown=LAYERS_SHOWN,
        referrers=[_referrer(r) for r in image.referrers],
        tags=tags,
        tags_complete=complete,
        tag_pages=TAG_PAGES * TAG_CHUNK,
        scan=scan,
        vulns=vulns,
        findings=findings[:FINDINGS_SHOWN],
        findings_total=len(findings),
        blobs=None if blobs is None else blobs[:LAYERS_SHOWN],
        blob_count=0 if blobs is None else len(blobs),
        regions=image.regions if isinstance(image.regions, dict) else None,
        commands=commands,
    )
