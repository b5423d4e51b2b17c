"""`/orgs/{org}/audit` and `/audit`: the audit log (append-only; read, never changed here)."""

from __future__ import annotations

from datetime import datetime

from skyreg.meta.audit import MAX_PAGE, AuditRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route, bad_request
from skyreg.services.access import may_manage, required, visible_org
from skyreg.services.errors import Forbidden

QUERY = (
    Param("since", {"type": "string", "format": "date-time"}, "Entries at or after this time"),
    Param("after", {"type": "integer", "minimum": 0}, "Entries after this id (next_after)"),
    Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, f"At most {MAX_PAGE}"),
    Param("order", {"type": "string", "enum": ["oldest", "newest"], "default": "oldest"},
          "oldest: oldest first, paged with `after`; newest: newest first, paged with `before`"),
    Param("before", {"type": "integer", "minimum": 1},
          "With order=newest: entries before this id (next_before)"),
)  # fmt: skip


def _entry(r: AuditRecord) -> models.AuditEntry:
    return models.AuditEntry(
        id=r.id,
        at=models.time(r.at),
        org=r.org,
        actor_id=r.actor_id,
        actor_name=r.actor_name,
        actor_kind=r.actor_kind,
        action=r.action,
        target=r.target,
        client=r.client,
        status=r.status,
    )


def _since(call: Call) -> datetime | None:
    raw = call.query("since")
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request("since must be an RFC 3339 time") from None
    if value.tzinfo is None:
        raise bad_request("since must name its time zone (Z or +HH:MM)")
    return value


async def _page(call: Call, org_name: str | None) -> models.AuditLog:
    since, after = _since(call), call.query_int("after", 0)
    limit = call.query_int("limit", MAX_PAGE, minimum=1, maximum=MAX_PAGE)
    order = call.query("order") or "oldest"
    if order not in ("oldest", "newest"):
        raise bad_request("order must be oldest or newest")
    newest = order == "newest"
    before = call.query_int("before", 0, minimum=1) if call.query("before") is not None else None
    if before is not None and not newest:
        raise bad_request("before pages entries with order=newest")
    services = call.services
    caller = call.caller()
    audit = services.audit
    if audit is None:  # pragma: no cover - every management API has one
        raise bad_request("no audit log here")

    def read() -> list[AuditRecord]:
        token = required(caller)
        if org_name is None:
            if token.kind != "admin":
                raise Forbidden("only an admin token reads the whole audit log")
            return audit.entries(
                None, all_orgs=True, since=since, after=after, limit=limit, before=before,
                newest_first=newest,
            )  # fmt: skip
        org = visible_org(services.auth.platform, token, org_name)
        if not may_manage(token, org.id):
            raise Forbidden("an org token of the organization (or admin) reads its audit log")
        return audit.entries(
            org.id, since=since, after=after, limit=limit, before=before, newest_first=newest
        )

    records = await audit.read(read)
    full = len(records) == limit
    return models.AuditLog(
        entries=[_entry(r) for r in records],
        next_after=records[-1].id if full and not newest else None,
        next_before=records[-1].id if full and newest else None,
    )


async def org_audit(call: Call) -> models.AuditLog:
    """An org's audit log (admin, or an org token of it)."""
    return await _page(call, call.path("org"))


async def all_audit(call: Call) -> models.AuditLog:
    """Every org's audit log and the entries of no org (admin)."""
    return await _page(call, None)


ROUTES = [
    Route(
        "GET", "/orgs/{org}/audit", org_audit, "getOrgAudit",
        "An org's audit log: who changed what, when, from where, with what result (admin, or "
        "an org token of the org)", models.AuditLog, errors=(400, 403, 404), query=QUERY,
        response_description="Entries, oldest first unless order=newest",
    ),
    Route(
        "GET", "/audit", all_audit, "getAudit",
        "The whole audit log, entries of no org included (admin)", models.AuditLog,
        errors=(400, 403), query=QUERY,
        response_description="Entries, oldest first unless order=newest",
    ),
]  # fmt: skip
