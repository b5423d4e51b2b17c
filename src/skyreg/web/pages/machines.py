"""Console pages: an app's releases and machines, one machine (facts, events, live log tail),
and stopping, starting and restarting it.

Everything comes from the management API's operations (`listReleases`, `listMachines`,
`getMachine`, `machineLogs` with `tail`, `stopMachine`…).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from skyreg.platform.api.releases import MAX_RELEASES
from skyreg.services.machines import MAX_MACHINE_PAGE
from skyreg.web.base import Page, Refused, View, page, paged, redirect

PAGES: list[Page] = []

LOG_TAIL = 200  # lines of a machine's log its page shows
MACHINE_PAGES = 10  # pages of listMachines (MAX_MACHINE_PAGE each) one app's listing reads
ACTIONS = {"stop": "stopMachine", "start": "startMachine", "restart": "restartMachine"}


def _machine_url(machine_id: str) -> str:
    return "/machines/" + quote(machine_id, safe="")


async def _org_of(view: View, app: str) -> str:
    return str((await view.api("getApp", params={"app": app})).org)


async def _releases(view: View, app: str) -> list[Any]:
    """The app's releases, newest first (as many as the API gives at once)."""
    found = await view.api("listReleases", params={"app": app}, query={"limit": MAX_RELEASES})
    return list(found.releases)


async def _machines(view: View, app: str) -> tuple[list[Any], bool]:
    """The app's machines, oldest first, and whether more than MACHINE_PAGES pages were left."""
    machines: list[Any] = []
    cursor: str | None = None
    for _ in range(MACHINE_PAGES):
        found = await view.api(
            "listMachines",
            params={"app": app},
            query={"limit": MAX_MACHINE_PAGE, "cursor": cursor},
        )
        machines.extend(found.machines)
        cursor = found.next_cursor
        if cursor is None:
            return machines, False
    return machines, True


async def _find_machine(view: View, machine_id: str) -> tuple[Any, Any]:
    """(app, machine) of `machine_id`; 404 as the API's for one the token does not see."""
    if not machine_id or len(machine_id) > 100:
        raise Refused(404, f"machine {machine_id[:100]!r} not found")
    machine = await view.api("getMachine", params={"machine_id": machine_id})
    app = await view.api("getApp", params={"app": machine.app})
    return app, machine


async def _log_tail(view: View, machine_id: str, count: int = LOG_TAIL) -> list[Any]:
    """The machine's newest `count` log lines, oldest first."""
    found = await view.api("machineLogs", params={"machine_id": machine_id}, query={"tail": count})
    return list(found.lines)


def _may_change(view: View, app: Any) -> bool:
    """Whether the session's token may stop and start the app's machines (as the API
    decides: admin, the app's org token, the app's deploy token)."""
    token = view.caller
    if token.kind == "admin":
        return True
    if token.org_name != app.org:
        return False
    return token.kind == "org" or (token.kind == "deploy" and token.app_name == app.name)


@page(PAGES, "GET", "/apps/{app}/releases")
async def release_list(view: View) -> web.StreamResponse:
    """The app's releases, newest first, searchable."""
    app = view.param("app")
    releases = await _releases(view, app)
    org = await _org_of(view, app)
    listing = paged(
        view,
        releases,
        lambda r: f"v{r.version} {r.status} {r.image_ref} {r.user.name} {r.reason} {r.description}",
    )
    return view.render("releases.html", title=f"{app}: releases", app=app, org=org, listing=listing)


@page(PAGES, "GET", "/apps/{app}/machines")
async def machine_list(view: View) -> web.StreamResponse:
    """The app's machines (oldest first) with their release's image, searchable by id,
    region and state."""
    app = view.param("app")
    machines, truncated = await _machines(view, app)
    org = await _org_of(view, app)
    images = {r.version: r for r in await _releases(view, app)}
    listing = paged(view, machines, lambda m: f"{m.id} {m.region} {m.state} {m.desired}")
    return view.render(
        "machines.html",
        title=f"{app}: machines",
        app=app,
        org=org,
        listing=listing,
        releases=images,
        truncated=truncated,
    )


@page(PAGES, "GET", "/machines/{machine_id}")
async def machine_page(view: View) -> web.StreamResponse:
    """One machine: its facts, health checks, events and the live tail of its log."""
    app, machine = await _find_machine(view, view.param("machine_id"))
    release = next((r for r in await _releases(view, app.name) if r.version ==
                    machine.release_version), None)  # fmt: skip
    lines = await _log_tail(view, machine.id)
    return view.render(
        "machine.html",
        title=f"Machine {machine.id}",
        app=app,
        machine=machine,
        release=release,
        lines=lines,
        url=_machine_url(machine.id),
        may_change=_may_change(view, app),
    )


@page(PAGES, "GET", "/machines/{machine_id}/logs")
async def machine_logs(view: View) -> web.StreamResponse:
    """The machine's log tail as an HTML fragment (what its page refreshes itself from)."""
    machine_id = view.param("machine_id")
    lines = await _log_tail(view, machine_id)
    return view.render("machine_logs.html", machine={"id": machine_id}, lines=lines)


def _action_page(action: str, operation: str) -> None:
    async def act(view: View) -> web.StreamResponse:
        machine_id = view.param("machine_id")
        await view.api(operation, params={"machine_id": machine_id})
        return redirect(_machine_url(machine_id))

    act.__doc__ = f"{action.capitalize()} the machine (the API's {operation}), back to its page."
    page(PAGES, "POST", "/machines/{machine_id}/" + action)(act)


for _action, _operation in ACTIONS.items():
    _action_page(_action, _operation)
