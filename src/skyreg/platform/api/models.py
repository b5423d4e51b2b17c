"""What the management API answers: every response body, declared once as a msgspec Struct.

Handlers build these from the services' results and the endpoint encodes them; `openapi.py`
generates the document's schemas from the same classes. Constraints here are documentation
(encoding checks nothing). Fields that only a multi-region registry fills default to UNSET and
are left out of the answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from skyreg.clock import utc_iso
from skyreg.scan.model import FileEntry, Finding, OsRelease
from skyreg.services.inputs import DNS_LABEL_PATTERN, INT32_MAX

Time = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Name = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": DNS_LABEL_PATTERN})]
Int32 = Annotated[
    int, msgspec.Meta(extra_json_schema={"minimum": -INT32_MAX - 1, "maximum": INT32_MAX})
]
NextCursor = Annotated[
    str | None,
    msgspec.Meta(description="Pass as `cursor` for the next page; null on the last page"),
]


def time(value: datetime) -> str:
    """RFC 3339 in UTC, as every time in the API is written."""
    return utc_iso(value)


def maybe_time(value: datetime | None) -> str | None:
    """`time`, or None."""
    return None if value is None else utc_iso(value)


class Model(msgspec.Struct, kw_only=True):
    """A response body."""


class ErrorDetail(Model):
    code: Annotated[
        str,
        msgspec.Meta(
            extra_json_schema={
                "enum": [
                    "bad_request",
                    "unauthorized",
                    "forbidden",
                    "not_found",
                    "method_not_allowed",
                    "conflict",
                    "too_large",
                    "too_many_requests",
                    "unavailable",
                    "internal",
                ]
            }
        ),
    ]
    message: str


class Error(Model):
    """Every refusal: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class Org(Model):
    name: Name
    created_at: Time


class OrgList(Model):
    orgs: list[Org]


class Check(Model):
    """A health check, every field filled in."""

    type: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["http", "tcp"]})]
    port: Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": 65535})]
    path: Annotated[str | None, msgspec.Meta(description="http checks (null: tcp)")]
    interval: Annotated[float, msgspec.Meta(description="Seconds")]
    timeout: Annotated[float, msgspec.Meta(description="Seconds")]
    grace_period: Annotated[float, msgspec.Meta(description="Seconds")]


class Service(Model):
    """The port an app's machines serve on (where the proxy sends requests) and their checks."""

    internal_port: Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": 65535})]
    checks: list[Check]


def service(stored: dict[str, object] | None) -> Service | None:
    """A stored service (as `check_service` made it) as the API shows it."""
    return None if stored is None else msgspec.convert(stored, Service)


class App(Model):
    name: Name
    org: Name
    public: bool
    created_at: Time
    regions: Annotated[
        list[str] | UnsetType, msgspec.Meta(description="Multi-region registries only")
    ] = UNSET
    replicate_ahead: Annotated[
        bool | UnsetType, msgspec.Meta(description="Multi-region registries only")
    ] = UNSET
    service: Annotated[
        Service | None, msgspec.Meta(description="Taken by the app's next release (null: none)")
    ] = None


class AppList(Model):
    apps: list[App]


class Token(Model):
    """A token as listings show it: never its secret (which is not stored anyway)."""

    id: str
    name: str
    kind: Annotated[
        str,
        msgspec.Meta(
            extra_json_schema={
                "enum": ["admin", "org", "deploy", "readonly", "build", "agent", "proxy"]
            }
        ),
    ]
    org: str | None
    app: str | None
    created_at: Time
    expires_at: Annotated[str | None, msgspec.Meta(extra_json_schema={"format": "date-time"})]
    revoked_at: Annotated[str | None, msgspec.Meta(extra_json_schema={"format": "date-time"})]
    active: bool


class NewToken(Token):
    """A token just made, with its secret: shown in this answer only."""

    secret: Annotated[
        str, msgspec.Meta(description="The token itself; not stored, not shown again")
    ]


class TokenList(Model):
    tokens: list[Token]


class Image(Model):
    repository: str
    tag: str
    digest: str
    media_type: str
    size: Annotated[
        int,
        msgspec.Meta(
            description="Manifest plus the blobs (and child manifests) it references, in bytes"
        ),
    ]
    pushed_at: Time
    pulled_at: Annotated[
        str | None,
        msgspec.Meta(
            description="When it was last pulled (recorded in batches); null: never",
            extra_json_schema={"format": "date-time"},
        ),
    ] = None


class ImageList(Model):
    app: str
    images: list[Image]
    next_cursor: Annotated[
        str | UnsetType,
        msgspec.Meta(description="Pass as `cursor` for the next page; absent on the last page"),
    ] = UNSET


class BlobRegions(Model):
    digest: str
    size: int
    regions: list[str]


class RegionHolding(Model):
    complete: bool
    bytes: int


class ImagePart(Model):
    digest: str
    media_type: str
    size: int


class ImageManifest(Model):
    """An image manifest of the image: itself, or one platform of an index."""

    digest: str
    media_type: str
    size: int
    platform: Annotated[str | None, _d("os/architecture[/variant] from the index; null: single")]
    config: ImagePart | None
    layers: list[ImagePart]


class ImageReferrer(Model):
    """A manifest whose subject is the image (signature, SBOM, attestation)."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None


class ImageDetail(Model):
    repository: str
    reference: str
    digest: str
    media_type: str
    size: Annotated[
        int, _d("The manifest and the distinct blobs and manifests it references, in bytes")
    ] = 0
    manifests: Annotated[
        list[ImageManifest], _d("The image's manifests with their layers (an index: each platform)")
    ] = msgspec.field(default_factory=list)
    platforms_left_out: Annotated[int, _d("An index's manifests past the 64 listed")] = 0
    referrers: list[ImageReferrer] = msgspec.field(default_factory=list)
    referrers_left_out: Annotated[int, _d("Referrers past the 100 listed")] = 0
    pulled_at: Annotated[
        str | None, _d("When it was last pulled (recorded in batches); null: never")
    ] = None
    blobs: list[BlobRegions] | UnsetType = UNSET
    regions: dict[str, RegionHolding] | UnsetType = UNSET


class JobCount(Model):
    region: str
    state: Annotated[
        str, msgspec.Meta(extra_json_schema={"enum": ["queued", "running", "done", "failed"]})
    ]
    count: int
    bytes: int


class Job(Model):
    digest: str
    region: str
    state: str
    attempts: int
    bytes: int
    size: int
    source: str | None
    error: str | None
    updated_at: Time


class ReplicationStatus(Model):
    region: Annotated[str | None, msgspec.Meta(description="The region of the node that answered")]
    regions: list[str]
    jobs: list[JobCount]
    recent: list[Job]


class ReleaseUser(Model):
    id: str
    name: str


class Release(Model):
    id: str
    app: str
    version: int
    status: Annotated[str, msgspec.Meta(description="pending until machines run it")]
    description: str
    reason: str
    image_ref: Annotated[str, msgspec.Meta(description="HOST/APP:TAG the release runs")]
    image_repository: str
    image_digest: str
    strategy: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["rolling", "immediate"]})]
    regions: list[str]
    count: int
    stable: bool
    user: ReleaseUser
    created_at: Time
    updated_at: Time
    env: Annotated[
        dict[str, str], msgspec.Meta(description="Plain environment variables of its machines")
    ]
    service: Annotated[Service | None, msgspec.Meta(description="Its machines' (null: none)")]


class ReleaseList(Model):
    app: str
    releases: list[Release]


class Machine(Model):
    id: str
    app: str
    region: str
    release_version: int
    desired: Annotated[
        str,
        msgspec.Meta(
            description="waiting: a rolling deploy starts it once the machines before it are ready",
            extra_json_schema={"enum": ["started", "stopped", "waiting"]},
        ),
    ]
    state: Annotated[
        str,
        msgspec.Meta(
            extra_json_schema={"enum": ["created", "starting", "started", "stopped", "failed"]}
        ),
    ]
    generation: Annotated[
        int, msgspec.Meta(description="Bumped by every restart; an agent runs each generation once")
    ]
    exit_code: Annotated[
        int | None,
        msgspec.Meta(extra_json_schema={"minimum": -INT32_MAX - 1, "maximum": INT32_MAX}),
    ]
    created_at: Time
    updated_at: Time
    address: Annotated[str | None, msgspec.Meta(description="Where its agent reaches it")]
    health: Annotated[
        str | None,
        msgspec.Meta(
            description="Its health checks' outcome (null: its release has none)",
            extra_json_schema={"enum": ["starting", "passing", "critical", None]},
        ),
    ]


class MachineEvent(Model):
    at: Time
    message: str
    duration_ms: Annotated[
        int | None, msgspec.Meta(extra_json_schema={"minimum": 0, "maximum": INT32_MAX})
    ]


class MachineWithEvents(Machine):
    events: list[MachineEvent]


class MachineList(Model):
    app: str
    machines: list[MachineWithEvents]
    next_cursor: NextCursor


class ImageRef(Model):
    repository: str
    digest: str


class AgentMachine(Machine):
    image: ImageRef
    org: Annotated[str, msgspec.Meta(description="The organization of its app")]
    service: Annotated[Service | None, msgspec.Meta(description="Its release's (null: none)")]


class AgentMachineList(Model):
    region: str
    machines: list[AgentMachine]
    next_cursor: NextCursor


class RouteMachine(Model):
    id: str
    region: str
    address: str
    port: Annotated[int, msgspec.Meta(description="Its release's service.internal_port")]
    healthy: Annotated[
        bool, msgspec.Meta(description="Started, and passing its checks when it has some")
    ]
    draining: Annotated[
        bool, msgspec.Meta(description="No longer desired started: send it no new requests")
    ]


class AppRoute(Model):
    app: str
    machines: Annotated[
        list[RouteMachine],
        msgspec.Meta(description="Empty: the app has a service but no machine to route to"),
    ]


class Routes(Model):
    """What a proxy routes to: the apps with a service and their reachable machines."""

    apps: list[AppRoute]
    truncated: Annotated[bool, msgspec.Meta(description="Some machines or apps were left out")]


class LogLine(Model):
    id: int
    machine_id: str
    region: str
    at: Time
    line: str


class LogList(Model):
    app: str
    lines: list[LogLine]
    last: int


class Recorded(Model):
    """An empty answer: the report was recorded."""


class DeletedImage(Model):
    """What `DELETE /apps/{app}/images/{reference}` removed: a tag (its manifest stays until
    garbage collection finds nothing else holds it), or a manifest with every tag of it."""

    repository: str
    tag: Annotated[str | UnsetType, msgspec.Meta(description="The tag removed")] = UNSET
    digest: Annotated[
        str | UnsetType, msgspec.Meta(description="The manifest deleted, with its tags")
    ] = UNSET


class GcQueue(Model):
    queued: Annotated[int, msgspec.Meta(description="Items waiting")]
    due: Annotated[int, msgspec.Meta(description="Items a pass would take now")]
    failing: Annotated[int, msgspec.Meta(description="Items whose last try failed")]


class GcDeletions(GcQueue):
    """Bytes of deleted blobs still to remove from one region's store."""

    region: Annotated[str, msgspec.Meta(description='"" in a registry without regions')]
    bytes: Annotated[int, msgspec.Meta(description="What they will free")]


class GcTotals(Model):
    """Everything collected since garbage collection began, by every node."""

    bytes_deleted: int
    blobs_deleted: int
    manifests_deleted: int
    links_deleted: Annotated[int, msgspec.Meta(description="Blobs removed from a repository")]
    failures: int


class GcSettings(Model):
    review_delay: Annotated[
        float, msgspec.Meta(description="Seconds between an event and the review it queues")
    ]
    keep_releases: Annotated[
        int, msgspec.Meta(description="Releases per app whose images are kept")
    ]
    regions: Annotated[
        list[str], msgspec.Meta(description='Regions whose stores hold bytes ("": no regions)')
    ]


class GcRun(Model):
    """One pass of a collector."""

    node: Annotated[str, msgspec.Meta(description="host:pid of the process that ran it")]
    kind: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["worker", "manual"]})]
    dry_run: bool
    started_at: Time
    finished_at: Time
    manifests_reviewed: int
    manifests_deleted: int
    blobs_reviewed: int
    blobs_deleted: int
    links_deleted: int
    bytes_deleted: int
    failures: int
    error: str | None
    tags_deleted: Annotated[
        int, msgspec.Meta(description="Tags the apps' retention policies deleted in the pass")
    ]


class GcRunResult(GcRun):
    """A pass just run; in a dry run, what it would have deleted (nothing was)."""

    deleted_manifests: Annotated[
        list[str],
        msgspec.Meta(description="REPOSITORY@DIGEST of the manifests deleted (at most 1000)"),
    ]
    deleted_blobs: Annotated[
        list[str], msgspec.Meta(description="Digests of the blobs deleted (at most 1000)")
    ]
    deleted_tags: Annotated[
        list[str],
        msgspec.Meta(description="REPOSITORY:TAG of the tags retention deleted (at most 1000)"),
    ]


class GcStatus(Model):
    """Garbage collection of the whole registry, as the node that answered sees it."""

    region: Annotated[str, msgspec.Meta(description='The answering node\'s region ("": none)')]
    worker: Annotated[
        bool, msgspec.Meta(description="Whether the answering process runs the gc worker")
    ]
    settings: GcSettings
    manifest_reviews: GcQueue
    blob_reviews: GcQueue
    deletions: list[GcDeletions]
    totals: GcTotals
    runs: Annotated[list[GcRun], msgspec.Meta(description="The latest passes, newest first")]
    errors: Annotated[list[str], msgspec.Meta(description="Recent failures' messages")]


def _d(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class RetentionPolicy(Model):
    """What an app keeps; durations in seconds (null: no such rule)."""

    keep_tags: Annotated[list[str], _d("Shell-style glob patterns of tags never deleted")]
    keep_recent: Annotated[int | None, _d("The N most recent tags of each repository kept")]
    keep_within: Annotated[int | None, _d("Tags pushed or pulled within this many seconds kept")]
    untagged_after: Annotated[
        int | None,
        _d("Seconds a manifest left without a tag waits for GC (null: the review delay)"),
    ]
    deletes_tags: Annotated[
        bool, _d("Whether the policy deletes tags at all (keep_recent or keep_within set)")
    ]


class TagToDelete(Model):
    """A tag a policy deletes now (or would, in a dry run)."""

    repository: str
    tag: str
    digest: str
    pushed_at: Time
    pulled_at: Annotated[Time | None, _d("The last pull of its manifest (null: never)")]


WouldDelete = Annotated[
    list[TagToDelete],
    _d("The tags the policy deletes now, least recent first (at most 1000)"),
]


class Retention(Model):
    """An app's retention policy (null: none) and what it would delete now."""

    app: Name
    policy: RetentionPolicy | None
    updated_at: Annotated[Time | None, _d("When the policy was last set")]
    last_run_at: Annotated[Time | None, _d("When the policy was last applied")]
    tags_deleted: Annotated[int, _d("Tags the policy has deleted so far")]
    would_delete: WouldDelete


class RetentionSet(Model):
    """A policy set (`saved`), or only tried (`dry_run`: nothing was saved)."""

    app: Name
    dry_run: bool
    saved: bool
    policy: RetentionPolicy
    would_delete: WouldDelete


class Quota(Model):
    """An org's limits in bytes (null: no such limit)."""

    soft: int | None
    hard: int | None


class OrgUsage(Model):
    """What an org's repositories hold: the unique blobs linked from any of its apps."""

    org: Name
    bytes: Annotated[int, _d("Bytes of the unique blobs held (manifests not counted)")]
    blobs: Annotated[int, _d("Unique blobs held")]
    quota: Annotated[Quota | None, _d("The org's limits (null: no quota)")]
    state: Annotated[
        str,
        msgspec.Meta(
            description="ok; soft: over the soft limit; hard: over the hard limit",
            extra_json_schema={"enum": ["ok", "soft", "hard"]},
        ),
    ]


# -- builds ---------------------------------------------------------------------------------------


class Builder(Model):
    """A builder host: where it runs and the key build secrets are sealed to."""

    id: str
    name: str
    region: str
    org: Annotated[str | None, msgspec.Meta(description="null: builds for every organization")]
    public_key: Annotated[str, msgspec.Meta(description="Base64 X25519 public key")]
    registered_at: Time
    last_seen: Time


class BuildStepTime(Model):
    step: int
    instruction: str
    seconds: float
    cached: bool


class Build(Model):
    """One build of an app's Dockerfile."""

    id: str
    app: str
    org: str
    status: Annotated[
        str,
        msgspec.Meta(
            extra_json_schema={"enum": ["queued", "running", "succeeded", "failed", "cancelled"]}
        ),
    ]
    created_by: Annotated[str, msgspec.Meta(description="The id of the token that asked")]
    created_at: Time
    started_at: Time | None
    finished_at: Time | None
    builder: str
    region: str
    context_digest: str
    context_size: int
    dockerfile: str
    target: str | None
    platform: str | None
    build_args: dict[str, str]
    secrets: Annotated[list[str], msgspec.Meta(description="The ids of the build secrets")]
    no_cache: bool
    image_label: str
    image_digest: str | None
    image_ref: Annotated[str | None, msgspec.Meta(description="APP@DIGEST once built")]
    steps: list[BuildStepTime]
    error: str | None
    log_lines: int


class BuildList(Model):
    builds: list[Build]


class BuildLogLine(Model):
    seq: int
    line: str


class BuildLog(Model):
    """Log lines after `after`, and the build's status when they were read."""

    build: str
    status: str
    lines: list[BuildLogLine]
    next: Annotated[int, msgspec.Meta(description="Pass as `after` for the lines that follow")]
    ended: bool
    error: str | None
    image_digest: str | None


class ClaimedBuild(Model):
    """What a builder gets for the build it claimed (null `build`: nothing to do)."""

    build: Build | None
    credential: Annotated[
        str | None, msgspec.Meta(description="A build token of the app, revoked when it ends")
    ] = None
    sealed_secrets: dict[str, str] = msgspec.field(default_factory=dict)


class BuildLogAccepted(Model):
    stop: Annotated[
        bool, msgspec.Meta(description="The builder stops the build (cancelled, client gone)")
    ]


class SecretInfo(Model):
    """One secret as the API shows it: never its value."""

    name: str
    digest: Annotated[
        str, _d("A keyed digest of the value: equal values show equal digests within an org")
    ]
    version: Annotated[int, _d("The app's secrets version that set this value")]
    deployed: Annotated[bool, _d("Whether the newest release runs with this value")]
    set_by: ReleaseUser
    set_at: Time


class SecretList(Model):
    app: str
    version: Annotated[int, _d("The app's current secrets version (staged changes included)")]
    deployed_version: Annotated[int | None, _d("The newest release's (null: no release yet)")]
    secrets: list[SecretInfo]


class SecretsChanged(Model):
    app: str
    version: int
    changed: Annotated[list[str], _d("Names set or unset (empty: nothing changed)")]
    staged: Annotated[bool, _d("True: no release was made; the next deploy uses the change")]
    release: Annotated[Release | None, _d("The release that rolls the machines")]


class MachineSecretValues(Model, omit_defaults=True):
    """For the agent starting the machine only: its environment's variables (asked for once per
    start, so a release's variables do not travel with every poll of the region's machines)."""

    env: Annotated[dict[str, str], _d("Its secrets")]
    release_env: Annotated[dict[str, str], _d("Its release's plain variables (absent: none)")] = (
        msgspec.field(default_factory=dict)
    )


class KeyRotation(Model):
    key_id: Annotated[str, _d("The id of the master key every data key is now wrapped with")]
    rewrapped: int
    total: int
    webhooks_resealed: Annotated[int, _d("Webhook secrets now sealed under that key")] = 0


# -- scans: packages, files and vulnerabilities of an app's images -------------------------------


class ScanState(Model):
    """Where the scan of one image stands."""

    digest: Annotated[str, _d("The image manifest scanned (of an index: one platform's)")]
    state: Annotated[str, _d("queued, indexing, done or failed")]
    error: Annotated[str | None, _d("Why the last attempt failed")]
    queued_at: Time
    indexed_at: Time | None
    os: OsRelease | None
    packages: Annotated[int | None, _d("Packages found (null: not indexed yet)")]
    files: Annotated[int | None, _d("Entries of the image's final tree")]
    matched_at: Annotated[Time | None, _d("When the findings were computed")]
    matched_generation: Annotated[int, _d("The vulnerability data generation matched against")]


class VulnDb(Model):
    """The OSV advisories the operator loaded."""

    generation: Annotated[int, _d("Grows with each import that changed something")]
    advisories: int
    imported_at: Time | None
    source: str | None


class ImageVulns(Model):
    app: str
    image: Annotated[str, _d("The image as named (default: the current release's)")]
    repository: str
    digest: str
    scan: ScanState
    database: VulnDb
    counts: Annotated[dict[str, int] | None, _d("Findings per severity (null: not matched)")]
    vulnerabilities: Annotated[
        list[Finding] | None, _d("Worst first; null until the image is indexed and matched")
    ]


class ImageFiles(Model):
    app: str
    image: str
    digest: str
    scan: ScanState
    files: Annotated[list[FileEntry], _d("By path, after `after`")]
    truncated: Annotated[bool, _d("The indexer kept only the first entries of a huge tree")]
    next_after: Annotated[str | None, _d("Pass as `after` for the next page; null: last page")]


class SummaryEntry(Model):
    advisory: str
    aliases: list[str]
    severity: str
    apps: Annotated[dict[str, list[str]], _d("App -> its affected packages")]


class VulnSummary(Model):
    org: str
    apps: Annotated[list[str], _d("Apps whose current image has a finding")]
    advisories: Annotated[list[SummaryEntry], _d("Worst first (at most 10,000)")]


class VulnImport(Model):
    read: Annotated[int, _d("Advisories read from the upload")]
    changed: Annotated[int, _d("New or modified (the others were already stored)")]
    unchanged: int
    failed: Annotated[int, _d("Records refused (errors names the first 20)")]
    errors: list[str]
    generation: int
    seconds: float


# -- the audit log -------------------------------------------------------------------------------


class AuditEntry(Model):
    id: Annotated[int, _d("Grows with each entry; pass the last as `after` for the next page")]
    at: Time
    org: Annotated[str | None, _d("The org whose thing was acted on (null: none)")]
    actor_id: Annotated[str | None, _d("The token's id (null: an anonymous caller)")]
    actor_name: str | None
    actor_kind: str | None
    action: Annotated[str, _d("The API operation (operationId) or registry action")]
    target: Annotated[str, _d("What it acted on: METHOD PATH, or REPOSITORY:TAG / @DIGEST")]
    client: Annotated[str, _d("The client's address")]
    status: Annotated[int, _d("The HTTP status it answered")]


class AuditLog(Model):
    entries: Annotated[list[AuditEntry], _d("Oldest first (with `order=newest`: newest first)")]
    next_after: Annotated[int | None, _d("Pass as `after` for more; null: no more now")]
    next_before: Annotated[
        int | None, _d("With `order=newest`: pass as `before` for older ones; null: no more")
    ] = None


# -- webhooks ------------------------------------------------------------------------------------


class Webhook(Model):
    id: str
    org: str
    app: Annotated[str | None, _d("Only this app's events (null: every app of the org)")]
    url: str
    events: Annotated[list[str], _d("Event types ([]: all)")]
    created_at: Time


class NewWebhook(Webhook):
    secret: Annotated[
        str, _d("Signs every delivery (X-Skyreg-Signature: sha256=HMAC); shown only now")
    ]


class WebhookList(Model):
    webhooks: list[Webhook]


class Delivery(Model):
    id: int
    event_id: Annotated[str, _d("The CloudEvents id: the same in every delivery of the event")]
    event_type: str
    subject: str | None
    time: Time
    state: Annotated[str, _d("pending, delivered or failed")]
    attempts: int
    next_attempt_at: Time
    last_status: Annotated[int | None, _d("The receiver's last HTTP status")]
    last_latency_ms: int | None
    last_response: Annotated[str | None, _d("The start of the receiver's last answer")]
    last_error: str | None
    delivered_at: Time | None


class DeliveryList(Model):
    webhook: Webhook
    deliveries: Annotated[list[Delivery], _d("Newest first")]


class PrefetchRange(Model):
    """Bytes of one layer's uncompressed stream (its tar) the image's machine read first."""

    layer: Annotated[str, _d("The layer blob's digest")]
    offset: Annotated[int, _d("Offset in the layer's uncompressed stream (chunk-aligned)")]
    length: int


class PrefetchList(Model):
    """An image's learned prefetch list (lazy pull): what its machine read in its first seconds,
    in that order, as an agent last reported it; the next lazy start reads it first."""

    repository: str
    digest: Annotated[str, _d("The image manifest's digest")]
    ranges: list[PrefetchRange]
    bytes: Annotated[int, _d("Bytes of every range together")]
    reported_at: Annotated[Time | None, _d("When it was reported (null: never, no ranges)")]
