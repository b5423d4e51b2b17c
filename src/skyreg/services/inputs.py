"""What callers send: the request bodies of the management API, declared once.

`platform/api` decodes each body into one of these (unknown fields and wrong JSON types are
refused there, with msgspec's message) and documents it in the generated OpenAPI document; the
services check the values (names, kinds, counts, regions) and give their own messages. Schema
constraints that the services check are documentation only (`extra_json_schema`), so a refused
value always gets the service's message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeAlias, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

DNS_LABEL_PATTERN = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
INT32_MAX = 2**31 - 1  # what an Integer column holds on every database

Name = Annotated[
    str,
    msgspec.Meta(extra_json_schema={"pattern": DNS_LABEL_PATTERN, "description": "A DNS label"}),
]


def _doc(**schema: object) -> msgspec.Meta:
    return msgspec.Meta(extra_json_schema=schema)


class Input(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are refused."""


In = TypeVar("In", bound=Input)

# A body as it is, or as a function giving it: a service asks for it once the caller's checks
# pass, so a refused caller is refused (403, 404) whatever it sent.
Body: TypeAlias = In | Callable[[], In]


def given(body: Body[In]) -> In:
    """The body itself (calling the function that gives it, once)."""
    return body() if callable(body) else body


class CreateOrg(Input):
    """`POST /orgs`."""

    name: Name


class CreateApp(Input):
    """`POST /apps`: a `name`, or `generate_name: true`; `org` defaults to the caller's."""

    name: Name | None = None
    generate_name: bool = False
    org: Annotated[Name | None, _doc(description="Default: the caller's organization")] = None
    public: Annotated[bool, _doc(description="Anyone may pull a public app (never push).")] = False


class CheckSpec(Input):
    """One health check of a service's machines (`checks`)."""

    type: Annotated[str, _doc(enum=["http", "tcp"])]
    port: Annotated[
        int | None, _doc(minimum=1, maximum=65535, description="Default: internal_port")
    ] = None
    path: Annotated[
        str | None,
        _doc(
            description='http only (default "/"): starts with /, at most 1024 printable ASCII '
            "characters without spaces",
            maxLength=1024,
        ),
    ] = None
    interval: Annotated[float, _doc(minimum=1, maximum=3600, description="Seconds")] = 10.0
    timeout: Annotated[
        float, _doc(minimum=0.1, maximum=60, description="Seconds, at most interval")
    ] = 2.0
    grace_period: Annotated[
        float,
        _doc(
            minimum=0,
            maximum=3600,
            description="Seconds after a start during which failures keep the machine starting",
        ),
    ] = 5.0


class ServiceSpec(Input):
    """What an app's machines serve: the port the proxy sends requests to and how agents check
    their health."""

    internal_port: Annotated[int, _doc(minimum=1, maximum=65535)]
    checks: Annotated[list[CheckSpec], _doc(maxItems=10)] = msgspec.field(default_factory=list)


class UpdateApp(Input):
    """`PATCH /apps/{app}`: only the fields given change."""

    public: bool | UnsetType = UNSET
    regions: Annotated[
        list[str] | UnsetType,
        _doc(
            description="Regions the app runs in (multi-region registries only); deploys "
            "without --region go there"
        ),
    ] = UNSET
    replicate_ahead: Annotated[
        bool | UnsetType,
        _doc(
            description="Copy every tagged push of the app's images to its regions ahead of any "
            "deploy"
        ),
    ] = UNSET
    service: Annotated[
        ServiceSpec | UnsetType | None,
        _doc(description="The app's service (null: none); its next release takes it"),
    ] = UNSET


class CreateToken(Input):
    """`POST /tokens`: an org, deploy or readonly token (never admin)."""

    kind: Annotated[str, _doc(enum=["org", "deploy", "readonly", "agent", "proxy"])]
    org: Annotated[
        Name | None,
        _doc(description="org and readonly tokens (default: the caller's organization)"),
    ] = None
    app: Annotated[Name | None, _doc(description="deploy tokens (required)")] = None
    name: Annotated[str | None, _doc(maxLength=100)] = None
    expiry: Annotated[
        str | float | None,
        _doc(
            description="Lifetime: a duration such as 720h, 30m, 1h30m, 7d, or seconds; absent: "
            "never expires"
        ),
    ] = None


class CreateRelease(Input):
    """`POST /apps/{app}/releases`: a deploy."""

    image: Annotated[
        str,
        _doc(
            description="[HOST/]REPOSITORY[:TAG] or REPOSITORY@DIGEST of any app the token may "
            "pull (required)"
        ),
    ] = ""
    image_label: str | None = None
    strategy: Annotated[str, _doc(enum=["rolling", "immediate"])] = "rolling"
    regions: Annotated[
        list[str],
        _doc(
            description="Region codes that exist (this registry's regions file; a single-region "
            "registry has only `local`); at most `--max-regions-per-release` (default 50)"
        ),
    ] = msgspec.field(default_factory=list)
    count: Annotated[
        int,
        _doc(
            minimum=1,
            description="Machines per region, up to `--max-machines-per-region` (default 100); "
            "count x regions is capped by `--max-machines-per-release` (1000), the app's live "
            "machines by `--max-machines-per-app` (1000)",
        ),
    ] = 1
    description: str | None = None
    env: Annotated[
        dict[str, str],
        _doc(
            description="Plain (not secret) environment variables of the release's machines: "
            "names letters, digits and _ (not SKYREG_...), at most 200, values text of at most "
            "32 KiB (the [env] table of an app's config file)",
            maxProperties=200,
        ),
    ] = msgspec.field(default_factory=dict)
    service: Annotated[
        ServiceSpec | None,
        _doc(description="The release's service, also set as the app's (absent: the app's)"),
    ] = None


DURATION_TEXT = (
    "A duration such as 30d, 12h, 90m, 1h30m, or seconds (a number or a string of digits), "
    "0 to ten years"
)
SIZE_TEXT = (
    "Bytes: an integer, or a number (decimals allowed) with a unit, case-insensitive: B, kB, "
    "MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024), e.g. 500MB, 1.5GiB; at "
    "most 2^63-1 bytes"
)
Duration = Annotated[str | int | float | None, _doc(examples=["30d", "12h", 86400])]
Size = Annotated[int | str | None, _doc(examples=[5368709120, "5GiB", "1.5TB"])]


class SetRetention(Input):
    """`PUT /apps/{app}/retention`: the app's retention policy, replacing any other.

    A tag stays when any rule keeps it: its name matches `keep_tags`, it is one of its
    repository's `keep_recent` most recent tags, or it was pushed or pulled within
    `keep_within`. A policy without `keep_recent` and `keep_within` deletes no tag (it may still
    set `untagged_after`). Deleted tags leave their manifests to garbage collection.
    """

    keep_tags: Annotated[
        list[str],
        _doc(
            description="Tags never deleted: shell-style glob patterns matched against the whole "
            "tag, case-sensitive (`v*`, `release-?`, `[0-9]*`); at most 32 patterns of 1 to 128 "
            "printable characters",
            maxItems=32,
        ),
    ] = msgspec.field(default_factory=list)
    keep_recent: Annotated[
        int | None,
        _doc(
            description="Keep the N most recent tags of each repository of the app (recent: "
            "the later of the tag's push and its manifest's last pull); 0 to 100000; null: no "
            "such rule",
            minimum=0,
            maximum=100_000,
        ),
    ] = None
    keep_within: Annotated[
        Duration,
        _doc(
            description="Keep tags pushed or pulled within this duration; null: no such rule. "
            + DURATION_TEXT
        ),
    ] = None
    untagged_after: Annotated[
        Duration,
        _doc(
            description="How long a manifest of the app left without a tag waits before garbage "
            "collection may delete it; null: the registry's review delay. " + DURATION_TEXT
        ),
    ] = None


class SetQuota(Input):
    """`PUT /orgs/{org}/quota`: an org's limits on the bytes of the unique blobs its apps'
    repositories hold (admin tokens only)."""

    hard: Annotated[
        Size,
        _doc(
            description="Pushes that would take the org over this many bytes are refused; "
            "null: no hard limit. " + SIZE_TEXT
        ),
    ] = None
    soft: Annotated[
        Size,
        _doc(
            description="Above this many bytes the org is over its soft limit (a warning; not "
            "above `hard`); null (the default): no soft limit. " + SIZE_TEXT
        ),
    ] = None


class StateReport(Input):
    """`POST /agent/machines/{id}/state`."""

    state: Annotated[str, _doc(enum=["starting", "started", "stopped", "failed"])]
    exit_code: Annotated[int | None, _doc(minimum=-INT32_MAX - 1, maximum=INT32_MAX)] = None
    address: Annotated[
        str | None,
        _doc(description="The IPv4 or IPv6 address the machine listens on", maxLength=64),
    ] = None


class HealthReport(Input):
    """`POST /agent/machines/{id}/health`: the outcome of the machine's health checks."""

    status: Annotated[str, _doc(enum=["passing", "critical"])]
    message: Annotated[str | None, _doc(maxLength=1000)] = None


class MachineEventInput(Input):
    """`POST /agent/machines/{id}/events`."""

    message: str
    duration_ms: Annotated[int | None, _doc(minimum=0, maximum=INT32_MAX)] = None


class LogLines(Input):
    """`POST /agent/machines/{id}/logs`."""

    lines: list[str]


class RegisterBuilder(Input):
    """`POST /builders`: a builder host announces itself (admin or org token)."""

    region: Annotated[str, _doc(description="The region the builder runs in")]
    public_key: Annotated[
        str, _doc(description="Base64 X25519 public key; build secrets are sealed to it")
    ]
    name: Annotated[str, _doc(maxLength=100)] = ""


class CreateBuild(Input):
    """`POST /apps/{app}/builds`: build the context blob (already pushed to the app) with its
    Dockerfile. Build secrets come sealed to `builder_id`'s public key (`GET
    /apps/{app}/builder`), so the server never holds them in the clear."""

    context_digest: Annotated[str, _doc(description="The context tar.gz, pushed to the app")]
    dockerfile: Annotated[str, _doc(description="Path of the Dockerfile inside the context")] = (
        "Dockerfile"
    )
    target: str | None = None
    platform: Annotated[str | None, _doc(description="linux/amd64, linux/arm64, ...")] = None
    build_args: dict[str, str] = msgspec.field(default_factory=dict)
    secrets: Annotated[
        dict[str, str],
        _doc(description="Secret id -> base64 of the secret sealed to the builder's key"),
    ] = msgspec.field(default_factory=dict)
    builder_id: Annotated[str | None, _doc(description="Required when secrets are sent")] = None
    no_cache: bool = False
    image_label: Annotated[
        str | None, _doc(description="Tag for the result (default: deployment-YYYYMMDD-HHMMSS)")
    ] = None
    timeout: Annotated[int, _doc(minimum=10, maximum=7200, description="Seconds")] = 1800


class BuildStep(Input):
    """One Dockerfile step as the builder timed it."""

    step: int
    instruction: str
    seconds: float
    cached: bool = False


class BuildLogLines(Input):
    """`POST /builder/builds/{id}/logs`."""

    lines: list[str]


class BuildResult(Input):
    """`POST /builder/builds/{id}/result`: how a build ended."""

    status: Annotated[str, _doc(enum=["succeeded", "failed", "cancelled"])]
    image_digest: str | None = None
    steps: list[BuildStep] = msgspec.field(default_factory=list)
    error: str | None = None


__all__ = [
    "UNSET",
    "Body",
    "BuildLogLines",
    "BuildResult",
    "BuildStep",
    "CheckSpec",
    "CreateApp",
    "CreateBuild",
    "CreateOrg",
    "CreateRelease",
    "CreateToken",
    "HealthReport",
    "Input",
    "LogLines",
    "MachineEventInput",
    "Name",
    "RegisterBuilder",
    "ServiceSpec",
    "SetQuota",
    "SetRetention",
    "StateReport",
    "UnsetType",
    "UpdateApp",
    "given",
]


class SetSecrets(Input):
    """`POST /apps/{app}/secrets`: add or replace secrets (values are never answered back)."""

    secrets: Annotated[
        dict[str, str],
        _doc(
            description="NAME -> value; names are letters, digits and _ (not SKYREG_...), "
            "values UTF-8 text of at most 64 KiB",
            maxProperties=100,
        ),
    ]
    stage: Annotated[
        bool, _doc(description="Keep the change for the next deploy instead of rolling now")
    ] = False


class UnsetSecrets(Input):
    """`POST /apps/{app}/secrets/unset`: remove secrets by name (absent names are ignored)."""

    names: Annotated[list[str], _doc(maxItems=100)]
    stage: Annotated[
        bool, _doc(description="Keep the change for the next deploy instead of rolling now")
    ] = False


class MachineSecretsRequest(Input):
    """`POST /agent/machines/{id}/secrets`: the agent starting the machine asks for its values."""

    generation: Annotated[int, _doc(minimum=0, maximum=INT32_MAX)]


class CreateWebhook(Input):
    """`POST /orgs/{org}/webhooks`: a webhook of the org (or of one of its apps)."""

    url: Annotated[
        str,
        _doc(
            maxLength=2048,
            description="http(s) URL the events are POSTed to; loopback and private addresses "
            "are refused unless the server allows them (`serve --webhook-allow-private`)",
        ),
    ]
    events: Annotated[
        list[str],
        _doc(maxItems=20, description="Event types (`dev.skyreg.image.pushed`, ...); [] = all"),
    ] = msgspec.field(default_factory=list)
    app: Annotated[Name | None, _doc(description="Only this app's events")] = None
