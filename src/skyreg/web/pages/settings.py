"""Console pages of an org's settings: its tokens, webhooks and their deliveries, audit log,
storage and quota; and the registry's replication status.

Every page reads and changes through the management API's operations (`View.api`) as the
session's token. A secret (a new token's, a new webhook's) is shown once, in the answer to the
POST that made it: never in a URL, never again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from skyreg.platform.http import ApiError
from skyreg.services.webhooks import EVENT_TYPES
from skyreg.web.base import (
    SECURITY_HEADERS,
    Page,
    Refused,
    View,
    page,
    paged,
    query_string,
    redirect,
)

PAGES: list[Page] = []

TOKEN_KINDS = (
    ("org", "org: everything in the organization"),
    ("deploy", "deploy: push and pull one app, pull the others"),
    ("readonly", "readonly: pull the organization's apps"),
)
AUDIT_PAGE = 50  # entries of an audit page unless the URL asks for another `limit`
AUDIT_MAX_PAGE = 1000  # the API's bound
DELIVERIES_SHOWN = 50
RETENTION_APPS = 20  # apps whose retention policy the usage page reads (one call each)
FORM_ERRORS = (400, 409, 413)  # refusals a form page shows next to the form


def _org_path(org: str, *rest: str) -> str:
    return "/".join(("/orgs", org, *rest))


# -- tokens ------------------------------------------------------------------------------------


async def _form_page(
    view: View,
    org: str,
    template: str,
    title: str,
    shown: dict[str, Any],
    created: Any,
    error: str | None,
    status: int,
) -> web.StreamResponse:
    """An org's list page with its create form: the org's apps for the form, what was just
    made (its secret shown this once), or the form again with what was typed and the error."""
    apps = (await view.api("listApps", query={"org": org})).apps
    return view.render(
        template,
        status=status,
        title=title,
        org=org,
        apps=[a.name for a in apps],
        created=created,
        error=error,
        form=view.form if error else {},
        **shown,
    )


async def _tokens_page(
    view: View,
    org: str,
    *,
    created: Any = None,
    error: str | None = None,
    status: int = 200,
) -> web.StreamResponse:
    tokens = (await view.api("listTokens", query={"org": org})).tokens
    listing = paged(view, tokens, lambda t: f"{t.name} {t.kind} {t.app or ''} {t.id}")
    shown = {"listing": listing, "kinds": TOKEN_KINDS}
    return await _form_page(
        view, org, "tokens.html", f"Tokens of {org}", shown, created, error, status
    )


@page(PAGES, "GET", "/orgs/{org}/tokens")
async def tokens(view: View) -> web.StreamResponse:
    """The org's tokens (never a secret) and the form that creates one."""
    return await _tokens_page(view, view.param("org"))


@page(PAGES, "POST", "/orgs/{org}/tokens")
async def create_token(view: View) -> web.StreamResponse:
    """Create a token: the answer shows its secret, once."""
    org, form = view.param("org"), view.form
    kind = form.get("kind", "")
    if kind not in {k for k, _ in TOKEN_KINDS}:
        return await _tokens_page(
            view, org, error="Choose the kind: org, deploy or readonly.", status=400
        )
    body: dict[str, Any] = {
        "kind": kind,
        "org": org,
        "name": form.get("name", "").strip() or None,
        "expiry": form.get("expiry", "").strip() or None,
    }
    if kind == "deploy":
        body["app"] = form.get("app") or None
    try:
        created = await view.api("createToken", body=body)
    except ApiError as e:
        if e.status not in FORM_ERRORS:
            raise
        return await _tokens_page(view, org, error=e.message, status=e.status)
    return await _tokens_page(view, org, created=created)


@page(PAGES, "POST", "/orgs/{org}/tokens/{token_id}/revoke")
async def revoke_token(view: View) -> web.StreamResponse:
    """Revoke one of the org's tokens, then back to the list."""
    org, token_id = view.param("org"), view.param("token_id")
    listed = (await view.api("listTokens", query={"org": org})).tokens
    if not any(t.id == token_id for t in listed):
        raise Refused(404, "no such token in this organization")
    await view.api("revokeToken", params={"token_id": token_id})
    return redirect(_org_path(org, "tokens"))


# -- webhooks ----------------------------------------------------------------------------------


async def _webhooks_page(
    view: View,
    org: str,
    *,
    created: Any = None,
    error: str | None = None,
    status: int = 200,
) -> web.StreamResponse:
    hooks = (await view.api("listWebhooks", params={"org": org})).webhooks
    shown = {"hooks": hooks, "events": EVENT_TYPES}
    return await _form_page(
        view, org, "webhooks.html", f"Webhooks of {org}", shown, created, error, status
    )


async def _org_webhook(view: View, org: str, webhook_id: str) -> Any:
    """The org's webhook `webhook_id` with its latest deliveries (404 when another org's)."""
    found = await view.api(
        "listWebhookDeliveries",
        params={"webhook_id": webhook_id},
        query={"limit": DELIVERIES_SHOWN},
    )
    if found.webhook.org != org:
        raise Refused(404, "no such webhook in this organization")
    return found


@page(PAGES, "GET", "/orgs/{org}/webhooks")
async def webhooks(view: View) -> web.StreamResponse:
    """The org's webhooks and the form that creates one."""
    return await _webhooks_page(view, view.param("org"))


@page(PAGES, "POST", "/orgs/{org}/webhooks")
async def create_webhook(view: View) -> web.StreamResponse:
    """Create a webhook: the answer shows its signing secret, once."""
    org, form = view.param("org"), view.form
    body = {
        "url": form.get("url", "").strip(),
        "events": [e for e in EVENT_TYPES if form.get("event:" + e)],
        "app": form.get("app") or None,
    }
    try:
        created = await view.api("createWebhook", params={"org": org}, body=body)
    except ApiError as e:
        if e.status not in FORM_ERRORS:
            raise
        return await _webhooks_page(view, org, error=e.message, status=e.status)
    return await _webhooks_page(view, org, created=created)


@page(PAGES, "POST", "/orgs/{org}/webhooks/{webhook_id}/delete")
async def delete_webhook(view: View) -> web.StreamResponse:
    org, webhook_id = view.param("org"), view.param("webhook_id")
    await _org_webhook(view, org, webhook_id)
    await view.api("deleteWebhook", params={"webhook_id": webhook_id})
    return redirect(_org_path(org, "webhooks"))


@page(PAGES, "GET", "/orgs/{org}/webhooks/{webhook_id}")
async def webhook(view: View) -> web.StreamResponse:
    """A webhook and its delivery log (refreshed in place while the page is open)."""
    org = view.param("org")
    found = await _org_webhook(view, org, view.param("webhook_id"))
    return view.render(
        "webhook.html",
        title=f"Webhook {found.webhook.id}",
        org=org,
        hook=found.webhook,
        deliveries=found.deliveries,
    )


@page(PAGES, "GET", "/orgs/{org}/webhooks/{webhook_id}/deliveries")
async def deliveries(view: View) -> web.StreamResponse:
    """The delivery log alone: the fragment the webhook's page refreshes itself from."""
    org = view.param("org")
    found = await _org_webhook(view, org, view.param("webhook_id"))
    return view.render(
        "settings_deliveries.html", org=org, hook=found.webhook, deliveries=found.deliveries
    )


@page(PAGES, "POST", "/orgs/{org}/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")
async def redeliver(view: View) -> web.StreamResponse:
    """Send a delivery's event again (same event id), then back to the log."""
    org, webhook_id = view.param("org"), view.param("webhook_id")
    await _org_webhook(view, org, webhook_id)
    await view.api(
        "redeliverWebhook",
        params={"webhook_id": webhook_id, "delivery_id": view.param("delivery_id")},
    )
    return redirect(_org_path(org, "webhooks", webhook_id))


# -- audit -------------------------------------------------------------------------------------


def _since(raw: str) -> str | None:
    """The filter's time as the API takes it (RFC 3339): a date, or a date and time, read as
    UTC unless it names its zone. None when empty; Refused(400) when unreadable."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        raise Refused(
            400, "“Since” must be a date such as 2026-12-03 or 2026-12-03T10:00"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


@page(PAGES, "GET", "/orgs/{org}/audit")
async def audit(view: View) -> web.StreamResponse:
    """One page of the org's audit log, newest first (the API's `order=newest`), older pages
    by its `before` cursor; filtered by `since`."""
    org = view.param("org")
    since_text = view.arg("since").strip()
    before = view.int_arg("before", 0)
    limit = view.int_arg("limit", AUDIT_PAGE, maximum=AUDIT_MAX_PAGE) or AUDIT_PAGE
    kept = {"since": since_text, "limit": None if limit == AUDIT_PAGE else limit}
    base = _org_path(org, "audit")
    context: dict[str, Any] = {
        "title": f"Audit log of {org}",
        "org": org,
        "since": since_text,
        "limit": limit,
        "before": before,
        "export_url": base + "/export" + query_string(since=since_text),
    }
    try:
        since = _since(since_text)
    except Refused as e:
        # Only for an org the token may read the log of: the API answers first.
        await view.api("getOrgAudit", params={"org": org}, query={"limit": 1})
        return view.render(
            "audit.html", status=400, entries=[], next_url=None, first_url=None, error=e.message,
            **context,
        )  # fmt: skip
    log = await view.api(
        "getOrgAudit",
        params={"org": org},
        query={"since": since, "order": "newest", "before": before or None, "limit": limit},
    )
    return view.render(
        "audit.html",
        entries=list(log.entries),
        next_url=None
        if log.next_before is None
        else base + query_string(**kept, before=log.next_before),
        first_url=base + query_string(**kept) if before else None,
        error=None,
        **context,
    )


EXPORT_PAGES = 200  # pages of 1000 entries one export reads at most


@page(PAGES, "GET", "/orgs/{org}/audit/export")
async def audit_export(view: View) -> web.StreamResponse:
    """The org's audit log (since `since`) as JSON lines, oldest first: a download, read from
    the API a page at a time (at most EXPORT_PAGES pages)."""
    org = view.param("org")
    await view.api("getOrgAudit", params={"org": org}, query={"limit": 1})  # 404/403 first
    since = _since(view.arg("since").strip())
    exports = view.console.exports
    if exports.locked():
        raise Refused(429, "as many audit exports as this server runs at once are running: retry")
    async with exports:
        return await _export(view, org, since)


async def _export(view: View, org: str, since: str | None) -> web.StreamResponse:
    after = 0
    # The first page before answering: a refusal (404, 403) is still an error page.
    log = await view.api(
        "getOrgAudit",
        params={"org": org},
        query={"since": since, "limit": AUDIT_MAX_PAGE},
    )
    response = web.StreamResponse(
        headers={
            **SECURITY_HEADERS,
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="audit-{org}.jsonl"',
        }
    )
    await response.prepare(view.request)
    for _ in range(EXPORT_PAGES):
        await response.write(b"".join(msgspec.json.encode(e) + b"\n" for e in log.entries))
        if log.next_after is None:
            break
        after = log.next_after
        log = await view.api(
            "getOrgAudit",
            params={"org": org},
            query={"since": since, "after": after, "limit": AUDIT_MAX_PAGE},
        )
    await response.write_eof()
    return response


# -- usage -------------------------------------------------------------------------------------


def _duration(seconds: int | None) -> str:
    """Seconds as people say them: 30d, 12h, 90m, 45s."""
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class RetentionRow:
    """What the usage page says of one app's retention policy."""

    app: str
    summary: str
    last_run_at: str | None
    tags_deleted: int
    would_delete: int | None


def _policy_summary(policy: Any) -> str:
    if policy is None:
        return "No policy: every tag is kept."
    parts = []
    if policy.keep_recent is not None:
        parts.append(f"keeps the {policy.keep_recent} most recent tags of each repository")
    if policy.keep_within is not None:
        parts.append(f"keeps tags pushed or pulled within {_duration(policy.keep_within)}")
    if policy.keep_tags:
        parts.append("never deletes tags matching " + ", ".join(policy.keep_tags))
    if policy.untagged_after is not None:
        parts.append(f"untagged manifests go after {_duration(policy.untagged_after)}")
    if not policy.deletes_tags:
        parts.append("deletes no tag (neither keep_recent nor keep_within is set)")
    return "; ".join(parts).capitalize() + "."


async def _retention(view: View, app: str) -> RetentionRow:
    try:
        found = await view.api("getRetention", params={"app": app})
    except ApiError as e:
        if e.status not in (403, 404):
            raise
        return RetentionRow(app, f"Not available: {e.message}", None, 0, None)
    return RetentionRow(
        app,
        _policy_summary(found.policy),
        found.last_run_at,
        found.tags_deleted,
        len(found.would_delete) if found.policy is not None else None,
    )


@page(PAGES, "GET", "/orgs/{org}/usage")
async def usage(view: View) -> web.StreamResponse:
    """The org's storage against its quota, its apps' retention policies, and garbage
    collection's status where the token may see it (an admin's)."""
    org = view.param("org")
    used = await view.api("getOrgUsage", params={"org": org})
    apps = (await view.api("listApps", query={"org": org})).apps
    retention = [await _retention(view, a.name) for a in apps[:RETENTION_APPS]]
    gc: Any = None
    gc_note: str | None = None
    try:
        gc = await view.api("gcStatus")
    except ApiError as e:
        if e.status not in (403, 404):
            raise
        gc_note = e.message
    return view.render(
        "usage.html",
        title=f"Storage and quota of {org}",
        org=org,
        usage=used,
        retention=retention,
        apps_total=len(apps),
        gc=gc,
        gc_note=gc_note,
        duration=_duration,
    )


# -- replication -------------------------------------------------------------------------------


@page(PAGES, "GET", "/replication")
async def replication(view: View) -> web.StreamResponse:
    """The replication queue by region and state, and the latest jobs (admin tokens)."""
    found: Any = None
    note: str | None = None
    try:
        found = await view.api("replicationStatus")
    except ApiError as e:
        if e.status not in (403, 404):
            raise
        note = e.message
    return view.render("replication.html", title="Replication", replication=found, note=note)
