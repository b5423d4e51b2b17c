"""`/agent/machines...`, `/agent/routes` and `/agent/apps/{app}/images/{reference}/prefetch`: what
region agents and proxies call (an admin token, or an org or agent token for its org's machines;
prefetch lists: admin and agent tokens only)."""

from __future__ import annotations

from skyreg.meta.machines import MAX_ROUTES
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.platform.api.machines import CURSOR, limit_param, machine_fields, machine_model
from skyreg.services.inputs import HealthReport, LogLines, MachineEventInput, StateReport
from skyreg.services.machines import MAX_MACHINE_PAGE
from skyreg.services.prefetch import MAX_BODY as MAX_PREFETCH_BODY
from skyreg.services.prefetch import PrefetchList, PrefetchReport
from skyreg.services.releases import DEFAULT_REGION


async def agent_machines(call: Call) -> models.AgentMachineList:
    """A page of the region's machines desired started."""
    caller = call.caller()
    region = call.query("region")
    limit = call.query_int("limit", MAX_MACHINE_PAGE, 1, MAX_MACHINE_PAGE)
    page = await call.services.machines.agent_machines(caller, region, limit, call.query("cursor"))
    return models.AgentMachineList(
        region=DEFAULT_REGION if region is None else region,
        machines=[
            models.AgentMachine(
                **machine_fields(m),  # type: ignore[arg-type]
                image=models.ImageRef(repository=m.image_repository, digest=m.image_digest),
                org=m.org_name,
                service=models.service(m.service),
            )
            for m in page.machines
        ],
        next_cursor=page.next_cursor,
    )


async def agent_state(call: Call) -> models.Machine:
    """An agent reports a machine's state."""
    machine = await call.services.machines.report_state(
        call.caller(), call.path("machine_id"), call.lazy_body(StateReport)
    )
    return machine_model(machine)


async def agent_health(call: Call) -> models.Machine:
    """An agent reports the outcome of a machine's health checks."""
    machine = await call.services.machines.report_health(
        call.caller(), call.path("machine_id"), call.lazy_body(HealthReport)
    )
    return machine_model(machine)


async def agent_routes(call: Call) -> models.Routes:
    """The machines a proxy sends each app's requests to."""
    found = await call.services.machines.routes(call.caller())
    return models.Routes(
        apps=[
            models.AppRoute(
                app=a.app,
                machines=[
                    models.RouteMachine(
                        id=m.id,
                        region=m.region,
                        address=m.address,
                        port=m.port,
                        healthy=m.healthy,
                        draining=m.draining,
                    )
                    for m in a.machines
                ],
            )
            for a in found.apps
        ],
        truncated=found.truncated,
    )


async def agent_event(call: Call) -> models.Recorded:
    """An agent records a machine event."""
    await call.services.machines.add_event(
        call.caller(), call.path("machine_id"), call.lazy_body(MachineEventInput)
    )
    return models.Recorded()


async def agent_logs(call: Call) -> models.Recorded:
    """An agent appends a machine's log lines."""
    await call.services.machines.add_logs(
        call.caller(), call.path("machine_id"), call.lazy_body(LogLines)
    )
    return models.Recorded()


def prefetch_model(found: PrefetchList) -> models.PrefetchList:
    """An image's prefetch list as the API shows it."""
    return models.PrefetchList(
        repository=found.repository,
        digest=found.digest,
        ranges=[
            models.PrefetchRange(layer=r.layer, offset=r.offset, length=r.length)
            for r in found.ranges
        ],
        bytes=found.bytes,
        reported_at=models.maybe_time(found.reported_at),
    )


async def agent_prefetch(call: Call) -> models.PrefetchList:
    """An image's learned prefetch list."""
    found = await call.services.prefetch.get(
        call.caller(), call.path("app"), call.path("reference")
    )
    return prefetch_model(found)


async def agent_report_prefetch(call: Call) -> models.PrefetchList:
    """An agent reports what an image's machine read first."""
    found = await call.services.prefetch.replace(
        call.caller(), call.path("app"), call.path("reference"), call.lazy_body(PrefetchReport)
    )
    return prefetch_model(found)


PREFETCH = "/agent/apps/{app}/images/{reference}/prefetch"

ROUTES = [
    Route(
        "GET", "/agent/machines", agent_machines, "agentMachines",
        "For region agents (admin or org token): the region's machines desired started, "
        "oldest first, a page at a time, with their generation, image and service",
        models.AgentMachineList, errors=(400, 403),
        query=(Param("region", {"type": "string", "default": DEFAULT_REGION}),
               limit_param(MAX_MACHINE_PAGE), CURSOR),
        response_description="Machines of the region",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/state", agent_state, "agentReportState",
        "An agent reports a machine's state; the release's status follows (complete when all "
        "its machines started, failed when one failed)", models.Machine, request=StateReport,
        errors=(400, 403, 404), response_description="The machine", audited=False,
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/health", agent_health, "agentReportHealth",
        "An agent reports a machine's health checks passing or critical; the release follows "
        "(complete when all its machines started and pass, failed when one is critical)",
        models.Machine, request=HealthReport, errors=(400, 403, 404, 409),
        description="409 when the machine's release has no checks or the machine is neither "
        "starting nor started.",
        response_description="The machine", audited=False,
    ),
    Route(
        "GET", "/agent/routes", agent_routes, "agentRoutes",
        "For proxies (admin, org or agent token; an org-bound token: its org's apps): the "
        f"machines with an address of each app with a service, at most {MAX_ROUTES}",
        models.Routes, errors=(403,), response_description="Routes",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/events", agent_event, "agentReportEvent",
        "An agent records a machine event", models.Recorded, status=201,
        request=MachineEventInput, errors=(400, 403, 404), response_description="Recorded",
        audited=False,
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/logs", agent_logs, "agentSendLogs",
        "An agent appends a machine's log lines", models.Recorded, status=201,
        request=LogLines, errors=(400, 403, 404), response_description="Recorded",
        audited=False,
    ),
    Route(
        "GET", PREFETCH, agent_prefetch, "agentImagePrefetch",
        "For agents (admin or agent token): the ranges of an image's layers its machines read "
        "first (lazy pull's learned prefetch), to read before the next lazy start",
        models.PrefetchList, errors=(400, 403, 404),
        description="`reference` is DIGEST or REPO@DIGEST of one image manifest of the app's "
        "repositories; no list reported yet: no ranges.",
        response_description="The prefetch list",
    ),
    Route(
        "PUT", PREFETCH, agent_report_prefetch, "agentReportImagePrefetch",
        "An agent reports what a lazily started machine of the image read in its first seconds "
        "(ranges of the manifest's layers, in reading order); it replaces the image's list",
        models.PrefetchList, request=PrefetchReport, errors=(400, 403, 404),
        description="400 for more than 4096 ranges, more than 256 MiB in all, or a layer the "
        "manifest does not have.",
        response_description="The prefetch list kept", audited=False,
        max_body=MAX_PREFETCH_BODY,
    ),
]  # fmt: skip
