"""Releases: deploying an image to an app records which image (pinned by digest) it runs.

A release is recorded `pending`, becomes `running` once its machines are created, then
`complete` (all started) or `failed` (see `MachineMeta.reconcile_release`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyreg.auth.policy import PULL, PUSH, AccessPolicy
from skyreg.meta.machines import MachineMeta, TooManyMachines
from skyreg.meta.platform import App, PlatformMeta, Release, ReleaseMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.manifest import parse_manifest
from skyreg.oci.names import TAG_RE
from skyreg.oci.reference import parse_reference
from skyreg.services.access import visible_app
from skyreg.services.errors import Forbidden, Invalid, LimitExceeded, NotFound
from skyreg.services.inputs import ServiceSpec

# `X as X`: re-exported for the modules that import them from here; defined in services/names.py,
# where the CLI checks a skyreg.toml against them without loading SQLAlchemy.
from skyreg.services.names import REGION_RE as REGION_RE
from skyreg.services.names import STRATEGIES as STRATEGIES
from skyreg.services.names import deployment_tag

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

log = logging.getLogger("skyreg.services")

MAX_IMAGE_MANIFESTS = 256  # an index and its children, walked to check a deploy's blobs
DEFAULT_REGION = "local"  # the one region of a single-region registry
MAX_DESCRIPTION = 1000

# What a caller sees for a field it got wrong (the API says the same for a wrong JSON type).
IMAGE_REQUIRED = "image is required: REPOSITORY[:TAG] or REPOSITORY@DIGEST"
LABEL_INVALID = "image_label must be a valid tag"
STRATEGY_INVALID = f"strategy must be one of {', '.join(STRATEGIES)}"
REGIONS_INVALID = "regions must be a list of region codes such as iad, sin, syd"


MAX_ENV = 200  # plain variables of a release
MAX_ENV_VALUE = 32 << 10  # characters of one value
MAX_ENV_TOTAL = 256 << 10  # characters of a release's names and values in all
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """A release's plain environment variables, checked (Invalid / LimitExceeded)."""
    if len(env) > MAX_ENV:
        raise LimitExceeded(f"env holds at most {MAX_ENV} variables", MAX_ENV)
    total = 0
    for name, value in env.items():
        if not ENV_NAME_RE.match(name) or name.upper().startswith("SKYREG_"):
            raise Invalid(
                f"env name {name[:130]!r} must be letters, digits and _, not starting with a "
                "digit or SKYREG_, at most 128 characters"
            )
        if "\x00" in value or len(value) > MAX_ENV_VALUE:
            raise Invalid(f"env {name}: the value must be text of at most 32 KiB without NUL")
        total += len(name) + len(value)
    if total > MAX_ENV_TOTAL:
        raise LimitExceeded(f"env is larger than {MAX_ENV_TOTAL >> 10} KiB in all", MAX_ENV_TOTAL)
    return dict(env)


MAX_CHECKS = 10  # health checks of a service
MAX_CHECK_PATH = 1024
CHECK_TYPES = ("http", "tcp")
CHECK_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,1023}\Z")


def _within(value: float, low: float, high: float) -> bool:
    return low <= value <= high  # False for NaN too


def check_service(service: ServiceSpec) -> dict[str, Any]:
    """A service, checked (Invalid naming the field), with every default filled in: what is
    stored and answered."""
    port = service.internal_port
    if not 1 <= port <= 65535:
        raise Invalid("service.internal_port must be a whole number from 1 to 65535")
    if len(service.checks) > MAX_CHECKS:
        raise Invalid(f"service.checks holds at most {MAX_CHECKS} checks")
    checks: list[dict[str, Any]] = []
    for i, check in enumerate(service.checks):
        at = f"service.checks[{i}]"
        if check.type not in CHECK_TYPES:
            raise Invalid(f"{at}.type must be one of {', '.join(CHECK_TYPES)}")
        if check.port is not None and not 1 <= check.port <= 65535:
            raise Invalid(f"{at}.port must be a whole number from 1 to 65535")
        path = check.path
        if check.type == "tcp" and path is not None:
            raise Invalid(f"{at}.path is for http checks only")
        if check.type == "http":
            path = "/" if path is None else path
            if not CHECK_PATH_RE.match(path):
                raise Invalid(
                    f"{at}.path must start with / and be at most {MAX_CHECK_PATH} printable "
                    "ASCII characters without spaces"
                )
        if not _within(check.interval, 1, 3600):
            raise Invalid(f"{at}.interval must be from 1 to 3600 seconds")
        if not _within(check.timeout, 0.1, 60) or check.timeout > check.interval:
            raise Invalid(f"{at}.timeout must be from 0.1 to 60 seconds and at most interval")
        if not _within(check.grace_period, 0, 3600):
            raise Invalid(f"{at}.grace_period must be from 0 to 3600 seconds")
        checks.append(
            {
                "type": check.type,
                "port": port if check.port is None else check.port,
                "path": path,
                "interval": float(check.interval),
                "timeout": float(check.timeout),
                "grace_period": float(check.grace_period),
            }
        )
    return {"internal_port": port, "checks": checks}


def count_invalid(limits: DeployLimits) -> str:
    """The refusal of a `count` that is not a whole number from 1 to `limits.per_region`."""
    return f"count must be a whole number from 1 to {limits.per_region}"


@dataclass(frozen=True)
class DeployLimits:
    """How many machines deploys may create (`skyreg serve --max-machines-...`).

    A live machine is one desired `started` (`MachineMeta.live_count`): a rolling deploy counts
    the app's current live machines plus its own, an immediate one (which stops the others at
    once) its own only.
    """

    per_region: int = 100  # `count`
    per_release: int = 1000  # count x regions
    per_app: int = 1000  # live machines of an app
    regions: int = 50  # regions one release names


@dataclass(frozen=True)
class DeployRequest:
    """One deploy, as the caller asked for it (values checked by `ReleaseService.deploy`).

    `image` is `[HOST[:PORT]/]REPO[:TAG][@DIGEST]` ("" when not given); `label` the tag the image
    gets in the app (default `deployment-YYYYMMDD-HHMMSS` when it is copied); `regions` empty
    means the app's placement (multi-region) or `local`.
    """

    app: str
    image: str
    token: TokenRecord
    label: str | None = None
    strategy: str = "rolling"
    regions: Sequence[str] = ()
    count: int = 1
    description: str | None = None
    reason: str = "deploy"  # "secrets": a change of the app's secrets rolls its machines
    env: Mapping[str, str] = field(default_factory=dict)  # plain variables of its machines
    service: ServiceSpec | None = None  # None: the app's (else also set as the app's)


@dataclass
class ReleaseService:
    """Deploys: the platform tables, the registry's manifests and tags, and machines.

    Every store shares the process's one `Database`; each public method does its queries in one
    hop to it (`deploy`: `Database.run`; `list_releases`: `Database.read`).
    """

    registry: RegistryMeta
    releases: ReleaseMeta
    machines: MachineMeta
    platform: PlatformMeta
    policy: AccessPolicy
    public_host: str  # HOST[:PORT] the image references of releases begin with
    geo: GeoNode | None = None  # multi-region: deploys queue copies of the image
    limits: DeployLimits = field(default_factory=DeployLimits)

    async def deploy(self, request: DeployRequest) -> Release:
        """Deploy `request.image` to `request.app`: resolve it to a digest, copy and tag it into
        the app's repository when it lives elsewhere (or a label is given), record the release
        and create its machines. Returns the release (`running`).

        Nothing is recorded or copied unless the caller may see the app (else NotFound) and push
        to it (Forbidden), every field is valid (Invalid), the regions exist, the machines fit
        the limits (LimitExceeded), the caller may pull the image (else NotFound, as if missing)
        and every blob of it will be in the app's repository (Invalid). One hop to a database
        thread.
        """
        return await self.releases.run(self._deploy, request)

    def _deploy(self, request: DeployRequest) -> Release:
        token, limits = request.token, self.limits
        app = self._visible_app(request.app, token)
        if PUSH not in self.policy.allowed(token, app.name):
            raise Forbidden(f"this token may not deploy app {app.name}")
        image = request.image
        if not image:
            raise Invalid(IMAGE_REQUIRED)
        try:
            ref = parse_reference(image.strip()).for_pull()  # a HOST[:PORT]/ in front is ignored
        except ValueError as e:
            raise Invalid(f"image {image[:200]!r}: {e}") from None
        label = request.label
        if label is not None and TAG_RE.match(label) is None:
            raise Invalid(LABEL_INVALID)
        strategy = request.strategy
        if strategy not in STRATEGIES:
            raise Invalid(STRATEGY_INVALID)
        if not all(REGION_RE.match(r) for r in request.regions):
            raise Invalid(REGIONS_INVALID)
        if len(set(request.regions)) > limits.regions:
            raise LimitExceeded(
                f"a release may name at most {limits.regions} regions", limits.regions
            )
        env = check_env(request.env)
        service = None if request.service is None else check_service(request.service)
        count = request.count
        if count < 1:
            raise Invalid(count_invalid(limits))
        if count > limits.per_region:
            raise LimitExceeded(count_invalid(limits), limits.per_region)
        regions = self._regions(app, request.regions)
        wanted = count * len(regions)
        if wanted > limits.per_release:
            raise LimitExceeded(
                f"{count} machines in each of {len(regions)} regions is {wanted}, over the "
                f"limit of {limits.per_release} machines per release",
                limits.per_release,
            )
        live = 0 if strategy == "immediate" else self.machines.live_count(app.id)
        if live + wanted > limits.per_app:
            raise LimitExceeded(
                f"app {app.name} has {live} live machines; {wanted} more would exceed its limit "
                f"of {limits.per_app} (an immediate deploy stops the others first)",
                limits.per_app,
            )
        stored = None
        if PULL in self.policy.allowed(token, ref.repository):
            stored = self.registry.get_manifest(
                ref.repository, ref.reference, by_digest=ref.digest is not None
            )
        if stored is None:  # the same answer for missing and not readable
            raise NotFound("image", image[:200])
        digest = stored.digest
        try:
            unavailable = self.unavailable_blobs(ref.repository, digest, app.name)
        except ValueError as e:
            raise Invalid(f"image {image[:200]!r}: {e}") from None
        if unavailable:  # e.g. a foreign layer (`urls`) whose bytes were never pushed to this app
            more = f" (and {len(unavailable) - 1} more)" if len(unavailable) > 1 else ""
            raise Invalid(
                f"blob {unavailable[0]}{more} of image {image[:200]!r} is not in repository "
                f"{app.name}: push every layer (foreign layers too) before deploying"
            )
        repository = ref.repository
        if ref.repository != app.name or label:
            tag = label or deployment_tag()
            # False: the manifest left `ref.repository` (a concurrent DELETE) since we read it.
            # Recording the release anyway would name a tag never made (or, with a label already
            # in use, another image) and give machines an image the app does not hold, after an
            # immediate deploy has stopped the app's running ones.
            if not self.registry.copy_manifest(ref.repository, digest, app.name, tag):
                raise NotFound("image", image[:200])
            repository, image_ref = app.name, f"{self.public_host}/{app.name}:{tag}"
        elif ref.tag:
            image_ref = f"{self.public_host}/{app.name}:{ref.tag}"
        else:
            image_ref = f"{self.public_host}/{app.name}@{digest}"
        release = self.releases.create_release(
            app_id=app.id,
            status="pending",
            description=(request.description or f"Deploy image {image_ref}")[:MAX_DESCRIPTION],
            reason=request.reason,
            image_ref=image_ref,
            image_repository=repository,
            image_digest=digest,
            strategy=strategy,
            regions=regions,
            machine_count=count,
            user_id=token.id,
            user_name=token.name,
            env=env,
            service=service,
        )
        if self.geo is not None:  # copies first: a region's machines then find the image at home
            queued = self.geo.enqueue_image(repository, digest, list(release.regions))
            log.info("app %s: %d blob copies queued for %s", app.name, queued, release.regions)
        try:
            self.machines.create_for_release(
                release.id, app.id, list(release.regions), count, strategy, max_live=limits.per_app
            )
        except TooManyMachines as e:  # a concurrent deploy took the room: this release failed
            raise LimitExceeded(f"app {app.name}: {e}", e.limit) from None
        release = self.releases.get_release(release.id) or release
        log.info("app %s release v%d: %s (%s)", app.name, release.version, image_ref, digest)
        return release

    def _visible_app(self, name: str, token: TokenRecord) -> App:
        """The app `name` when `token` may see it (admin: any; else its org's), else NotFound."""
        return visible_app(self.platform, token, name)

    async def list_releases(
        self, caller: TokenRecord, app: str, limit: int
    ) -> tuple[App, list[Release]]:
        """The app's latest `limit` releases, newest first (the caller's org's apps only)."""
        return await self.releases.read(self.releases_of, caller, app, limit)

    def releases_of(self, caller: TokenRecord, app: str, limit: int) -> tuple[App, list[Release]]:
        """`list_releases`, blocking: for callers already on a worker thread (GraphQL runs
        each query on its own pool's threads)."""
        found = visible_app(self.platform, caller, app)
        return found, (self.releases.list_releases(found.id, limit) if limit else [])

    def _regions(self, app: App, asked: Sequence[str]) -> list[str]:
        """The release's regions, sorted: those asked for (each must exist), else the app's
        placement (multi-region) or this node's region, else `local`."""
        geo = self.geo
        absent = sorted(
            r for r in set(asked) if not (geo.regions.knows(r) if geo else r == DEFAULT_REGION)
        )
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise Invalid(f"unknown region {absent[0]!r}{more}")
        regions = list(asked)
        if geo is not None and not regions:
            placement = geo.meta.app_placement(app.name)
            regions = list((placement[0] if placement else []) or [geo.region])
        return sorted(set(regions)) or [DEFAULT_REGION]

    def unavailable_blobs(self, source: str, digest: str, target: str) -> list[str]:
        """`unavailable_blobs` with this service's stores. Queries, and walking an index parses
        up to MAX_IMAGE_MANIFESTS manifests: call it on a database thread."""
        return unavailable_blobs(self.registry, self.releases, source, digest, target)


def unavailable_blobs(
    registry: RegistryMeta, releases: ReleaseMeta, source: str, digest: str, target: str
) -> list[str]:
    """Blobs a machine of image `source@digest` needs that `target` will not serve.

    Every config and layer of the image counts (of an index, of every child manifest). When
    the image is copied from `source` into `target`, the copy links the blobs the source's
    manifests reference (config and layers without `urls`) as far as `source` has them;
    anything else, a foreign layer named only by its `urls` in particular, must already be
    linked to `target`. Raises ValueError for an image too large to walk.
    """
    needed: dict[str, bool] = {}  # digest -> linked along by a copy
    pending, seen = [digest], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if len(seen) > MAX_IMAGE_MANIFESTS:
            raise ValueError(f"the image has more than {MAX_IMAGE_MANIFESTS} manifests")
        stored = registry.get_manifest(source, current, by_digest=True)
        if stored is None:
            raise ValueError(f"manifest {current} is not in repository {source}")
        try:
            manifest = parse_manifest(
                stored.content, stored.media_type, Digest.parse(stored.digest)
            )
        except RegistryError as e:
            raise ValueError(f"manifest {current}: {e.message}") from None
        pending += [str(child.digest) for child in manifest.manifests]
        copied = {str(d.digest) for d in manifest.required_blobs()}
        for blob in [*([manifest.config] if manifest.config else []), *manifest.layers]:
            key = str(blob.digest)
            needed[key] = needed.get(key, False) or key in copied
    digests = sorted(needed)
    present = releases.linked_blobs(target, digests)
    if source != target:
        present |= {d for d in releases.linked_blobs(source, digests) if needed[d]}
    return [d for d in digests if d not in present]
