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


class CreateToken(Input):
    """`POST /tokens`: an org, deploy or readonly token (never admin)."""

    kind: Annotated[str, _doc(enum=["org", "deploy", "readonly"])]
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


class StateReport(Input):
    """`POST /agent/machines/{id}/state`."""

    state: Annotated[str, _doc(enum=["starting", "started", "stopped", "failed"])]
    exit_code: Annotated[int | None, _doc(minimum=-INT32_MAX - 1, maximum=INT32_MAX)] = None


class MachineEventInput(Input):
    """`POST /agent/machines/{id}/events`."""

    message: str
    duration_ms: Annotated[int | None, _doc(minimum=0, maximum=INT32_MAX)] = None


class LogLines(Input):
    """`POST /agent/machines/{id}/logs`."""

    lines: list[str]


__all__ = [
    "UNSET",
    "Body",
    "CreateApp",
    "CreateOrg",
    "CreateRelease",
    "CreateToken",
    "Input",
    "LogLines",
    "MachineEventInput",
    "Name",
    "StateReport",
    "UnsetType",
    "UpdateApp",
    "given",
]
