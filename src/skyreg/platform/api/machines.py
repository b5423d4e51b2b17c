"""`/apps/{app}/machines`, `/apps/{app}/logs`, `/machines/{machine_id}` (with `/logs`) and
`/machines/{machine_id}/stop|start|restart`."""

from __future__ import annotations

from skyreg.meta.machines import LogLine, Machine, MachineEvent
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Handler, Param, Route
from skyreg.services.machines import MACHINE_PAGE, MAX_LOG_LINES, MAX_MACHINE_PAGE

CURSOR = Param(
    "cursor",
    {"type": "string", "pattern": "^[0-9a-f]{1,64}$"},
    "The next_cursor of the previous page (absent: the first page)",
)


def limit_param(default: int) -> Param:
    """`limit`: machines per page."""
    schema = {"type": "integer", "minimum": 1, "maximum": MAX_MACHINE_PAGE, "default": default}
    return Param("limit", schema, "Machines per page")


def machine_fields(machine: Machine) -> dict[str, object]:
    """The fields every machine answer has."""
    return {
        "id": machine.id,
        "app": machine.app_name,
        "region": machine.region,
        "release_version": machine.release_version,
        "desired": machine.desired,
        "state": machine.state,
        "generation": machine.generation,
        "exit_code": machine.exit_code,
        "created_at": models.time(machine.created_at),
        "updated_at": models.time(machine.updated_at),
        "address": machine.address,
        "health": machine.health,
    }


def machine_model(machine: Machine) -> models.Machine:
    """A machine as the API shows it."""
    return models.Machine(**machine_fields(machine))  # type: ignore[arg-type]


def _event(event: MachineEvent) -> models.MachineEvent:
    return models.MachineEvent(
        at=models.time(event.at), message=event.message, duration_ms=event.duration_ms
    )


def _line(line: LogLine) -> models.LogLine:
    return models.LogLine(
        id=line.id,
        machine_id=line.machine_id,
        region=line.region,
        at=models.time(line.at),
        line=line.line,
    )


async def list_machines(call: Call) -> models.MachineList:
    """A page of the app's machines with their latest events."""
    caller = call.caller()
    limit = call.query_int("limit", MACHINE_PAGE, 1, MAX_MACHINE_PAGE)
    found = await call.services.machines.list_machines(
        caller, call.path("app"), limit, call.query("cursor")
    )
    return models.MachineList(
        app=found.app.name,
        machines=[
            models.MachineWithEvents(
                **machine_fields(m),  # type: ignore[arg-type]
                events=[_event(e) for e in events],
            )
            for m, events in found.machines
        ],
        next_cursor=found.next_cursor,
    )


async def app_logs(call: Call) -> models.LogList:
    """Log lines of the app's machines after a line id."""
    caller = call.caller()
    after = call.query_int("after", 0)
    app, lines = await call.services.machines.app_logs(caller, call.path("app"), after)
    return models.LogList(
        app=app.name, lines=[_line(ln) for ln in lines], last=lines[-1].id if lines else after
    )


async def get_machine(call: Call) -> models.MachineWithEvents:
    """A machine with its latest events."""
    machine, events = await call.services.machines.get_machine(
        call.caller(), call.path("machine_id")
    )
    return models.MachineWithEvents(
        **machine_fields(machine),  # type: ignore[arg-type]
        events=[_event(e) for e in events],
    )


async def machine_logs(call: Call) -> models.LogList:
    """One machine's log lines: after a line id, or its last `tail` lines."""
    after = call.query_int("after", 0)
    tail = None
    if call.query("tail") is not None:
        tail = call.query_int("tail", MAX_LOG_LINES, 1, MAX_LOG_LINES)
    machine, lines = await call.services.machines.machine_logs(
        call.caller(), call.path("machine_id"), after, tail
    )
    return models.LogList(
        app=machine.app_name,
        lines=[_line(ln) for ln in lines],
        last=lines[-1].id if lines else after,
    )


def _change(action: str) -> Handler:
    async def change(call: Call) -> models.Machine:
        machine = await call.services.machines.change(
            call.caller(), call.path("machine_id"), action
        )
        return machine_model(machine)

    change.__doc__ = f"{action.capitalize()} a machine."
    return change


ROUTES = [
    Route(
        "GET", "/apps/{app}/machines", list_machines, "listMachines",
        "The app's machines, oldest first, a page at a time, with their region, release, "
        "desired and reported state, address, health and latest events", models.MachineList,
        errors=(400, 404), query=(limit_param(MACHINE_PAGE), CURSOR),
        response_description="Machines",
    ),
    Route(
        "GET", "/apps/{app}/logs", app_logs, "appLogs",
        "Log lines of the app's machines with ids above `after`, oldest first (poll with the "
        "last id to follow)", models.LogList, errors=(400, 404),
        query=(Param("after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                               "default": 0}),),
        response_description="Log lines",
    ),
    Route(
        "GET", "/machines/{machine_id}", get_machine, "getMachine",
        "A machine: region, release, desired and reported state, address, health and latest "
        "events", models.MachineWithEvents, errors=(404,), response_description="The machine",
    ),
    Route(
        "GET", "/machines/{machine_id}/logs", machine_logs, "machineLogs",
        "The machine's log lines with ids above `after`, oldest first; with `tail`, its last "
        "`tail` lines (poll with `after` = the answer's `last` to follow)", models.LogList,
        errors=(400, 404),
        query=(Param("after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                               "default": 0}),
               Param("tail", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_LINES},
                     "The last lines only (at most this many)")),
        response_description="Log lines",
    ),
    Route(
        "POST", "/machines/{machine_id}/stop", _change("stop"), "stopMachine",
        "Stop a machine (desired stopped; the agent sends SIGTERM, SIGKILL after 5 s); needs "
        "push access to the machine's app", models.Machine, errors=(403, 404),
        response_description="The machine",
    ),
    Route(
        "POST", "/machines/{machine_id}/start", _change("start"), "startMachine",
        "Start a stopped or failed machine (desired started, new generation); needs push "
        "access to the machine's app; 400 when the app already has its limit of live machines",
        models.Machine, errors=(400, 403, 404), response_description="The machine",
    ),
    Route(
        "POST", "/machines/{machine_id}/restart", _change("restart"), "restartMachine",
        "Restart a machine on a fresh copy of its image (new generation); needs push access to "
        "the machine's app; 400 for a stopped machine when the app already has its limit of "
        "live machines", models.Machine, errors=(400, 403, 404),
        response_description="The machine",
    ),
]  # fmt: skip
