"""`/apps/{app}/retention`: an app's retention policy (show, set or try, remove)."""

from __future__ import annotations

from skyreg.meta.retention import AppRetention
from skyreg.meta.retention import RetentionPolicy as PolicyRecord
from skyreg.meta.retention import TagToDelete as TagRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route, bad_request
from skyreg.services.inputs import SetRetention

DRY_RUN_PARAM = Param(
    "dry_run",
    {"type": "string", "enum": ["true", "false"]},
    "true: save nothing, answer what the body's policy would delete now",
)


def policy_model(policy: PolicyRecord) -> models.RetentionPolicy:
    """A policy as the API shows it."""
    return models.RetentionPolicy(
        keep_tags=list(policy.keep_tags),
        keep_recent=policy.keep_recent,
        keep_within=policy.keep_within,
        untagged_after=policy.untagged_after,
        deletes_tags=policy.deletes_tags,
    )


def tag_model(tag: TagRecord) -> models.TagToDelete:
    """A tag a policy deletes."""
    return models.TagToDelete(
        repository=tag.repository,
        tag=tag.tag,
        digest=tag.digest,
        pushed_at=models.time(tag.pushed_at),
        pulled_at=models.maybe_time(tag.pulled_at),
    )


def retention_model(
    app: str, stored: AppRetention | None, would_delete: list[TagRecord]
) -> models.Retention:
    """An app's stored policy (or none) with its history and plan."""
    return models.Retention(
        app=app,
        policy=None if stored is None else policy_model(stored.policy),
        updated_at=None if stored is None else models.time(stored.updated_at),
        last_run_at=None if stored is None else models.maybe_time(stored.last_run_at),
        tags_deleted=0 if stored is None else stored.tags_deleted,
        would_delete=[tag_model(t) for t in would_delete],
    )


def dry_run_param(call: Call) -> bool:
    """`?dry_run=true|false` (absent: false); 400 for anything else."""
    raw = call.query("dry_run")
    if raw is None or raw == "false":
        return False
    if raw == "true":
        return True
    raise bad_request(f"dry_run must be true or false, not {raw[:40]!r}")


async def get_retention(call: Call) -> models.Retention:
    """The app's policy and what it would delete now."""
    view = await call.services.retention.show(call.caller(), call.path("app"))
    return retention_model(view.app, view.stored, view.would_delete)


async def set_retention(call: Call) -> models.RetentionSet:
    """Set (or, with ?dry_run=true, try) the app's policy."""
    caller, dry_run = call.caller(), dry_run_param(call)
    change = await call.services.retention.set(
        caller, call.path("app"), call.lazy_body(SetRetention), dry_run=dry_run
    )
    return models.RetentionSet(
        app=change.app,
        dry_run=change.dry_run,
        saved=not change.dry_run,
        policy=policy_model(change.policy),
        would_delete=[tag_model(t) for t in change.would_delete],
    )


async def delete_retention(call: Call) -> bytes:
    """Remove the app's policy."""
    await call.services.retention.unset(call.caller(), call.path("app"))
    return b""


ROUTES = [
    Route(
        "GET", "/apps/{app}/retention", get_retention, "getRetention",
        "An app's retention policy and the tags it would delete now (any token that sees the "
        "app; a public app's retention is not public)", models.Retention, errors=(404,),
        response_description="The policy (null: none) and its plan",
    ),
    Route(
        "PUT", "/apps/{app}/retention", set_retention, "setRetention",
        "Set an app's retention policy (admin, or an org token of its organization); "
        "`?dry_run=true` saves nothing and lists what the policy would delete now",
        models.RetentionSet, request=SetRetention, errors=(400, 403, 404),
        query=(DRY_RUN_PARAM,),
        description="A policy deletes tags; the manifests they leave untagged go through "
        "garbage collection after `untagged_after` (else the registry's review delay). A tag "
        "stays when its name matches `keep_tags`, it is one of its repository's `keep_recent` "
        "most recent, or it was pushed or pulled within `keep_within`; without `keep_recent` "
        "and `keep_within` no tag is deleted. The GC worker applies stored policies.",
        response_description="The policy and the tags it deletes now",
    ),
    Route(
        "DELETE", "/apps/{app}/retention", delete_retention, "deleteRetention",
        "Remove an app's retention policy (admin, or an org token of its organization)",
        None, status=204, errors=(403, 404), response_description="Removed (or there was none)",
    ),
]  # fmt: skip
