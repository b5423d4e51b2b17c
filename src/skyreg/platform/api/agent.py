"""`/agent/machines...`: what region agents call (an admin token, or an org token for its
org's machines)."""

from __future__ import annotations

from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.platform.api.machines import CURSOR, limit_param, machine_fields, machine_model
from skyreg.services.inputs import LogLines, MachineEventInput, StateReport
from skyreg.services.machines import MAX_MACHINE_PAGE
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


ROUTES = [
    Route(
        "GET", "/agent/machines", agent_machines, "agentMachines",
        "For region agents (admin or org token): the region's machines desired started, "
        "oldest first, a page at a time, with their generation and image",
        models.AgentMachineList, errors=(400, 403),
        query=(Param("region", {"type": "string", "default": DEFAULT_REGION}),
               limit_param(MAX_MACHINE_PAGE), CURSOR),
        response_description="Machines of the region",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/state", agent_state, "agentReportState",
        "An agent reports a machine's state; the release's status follows (complete when all "
        "its machines started, failed when one failed)", models.Machine, request=StateReport,
        errors=(400, 403, 404), response_description="The machine",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/events", agent_event, "agentReportEvent",
        "An agent records a machine event", models.Recorded, status=201,
        request=MachineEventInput, errors=(400, 403, 404), response_description="Recorded",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/logs", agent_logs, "agentSendLogs",
        "An agent appends a machine's log lines", models.Recorded, status=201,
        request=LogLines, errors=(400, 403, 404), response_description="Recorded",
    ),
]  # fmt: skip
