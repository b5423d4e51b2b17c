"""Machines: what users see and do (list, logs, stop/start/restart, with push access to the
app) and what region agents do (list their region's machines, report state, health, events,
logs) and proxies read (the routes to the machines of apps with a service)."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from skyreg.auth.policy import PUSH, AccessPolicy
from skyreg.meta.machines import (
    HEALTH,
    MAX_ROUTES,
    STATES,
    AppRoutes,
    HealthRefused,
    LogLine,
    Machine,
    MachineEvent,
    MachineMeta,
    TooManyMachines,
)
from skyreg.meta.platform import App, PlatformMeta, TokenRecord
from skyreg.services.access import sees_org, visible_app
from skyreg.services.errors import Conflict, Forbidden, Invalid, NotFound
from skyreg.services.inputs import (
    INT32_MAX,
    HealthReport,
    LogLines,
    MachineEventInput,
    StateReport,
)
from skyreg.services.releases import DEFAULT_REGION, REGION_RE, DeployLimits

log = logging.getLogger("skyreg.services")

MAX_LOG_LINES = 1000  # log lines one page of an app's logs holds
MAX_EVENT = 1000  # characters of an event message kept
MAX_HEALTH_MESSAGE = 1000  # characters of a health report's message
MAX_ADDRESS = 64  # characters of a machine's address (machines.address)
MAX_MACHINE_PAGE = 1000
MACHINE_PAGE = 100  # default page of an app's machines (the agent's default page is the max)
MACHINE_ID_RE = re.compile(r"^[0-9a-f]{1,64}\Z")
ACTIONS = ("stop", "start", "restart")


@dataclass(frozen=True)
class MachinePage:
    """One page of machines (oldest first) and the cursor of the next (None: the last)."""

    machines: list[Machine]
    next_cursor: str | None


@dataclass(frozen=True)
class AppMachines:
    """A page of an app's machines, each with its latest events."""

    app: App
    machines: list[tuple[Machine, list[MachineEvent]]]
    next_cursor: str | None


def _page(machines: list[Machine], limit: int) -> MachinePage:
    return MachinePage(machines, machines[-1].id if len(machines) == limit else None)


def _cursor(cursor: str | None) -> str | None:
    cursor = cursor or None
    if cursor is not None and not MACHINE_ID_RE.match(cursor):
        raise Invalid("cursor must be the next_cursor of a previous page")
    return cursor


def _int32(value: int | None, minimum: int) -> bool:
    return value is None or minimum <= value <= INT32_MAX


def check_address(address: str) -> str:
    """A machine's reported address, as given: an IPv4 or IPv6 address (else Invalid)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise Invalid("address must be an IPv4 or IPv6 address") from None
    if len(address) > MAX_ADDRESS:
        raise Invalid(f"address must be at most {MAX_ADDRESS} characters")
    return address


@dataclass(frozen=True)
class Routes:
    """What a proxy routes to: apps by name with their machines; `truncated`: some left out."""

    apps: list[AppRoutes]
    truncated: bool


@dataclass
class MachineService:
    """Machines over `MachineMeta`; `limits.per_app` bounds the live machines a start makes."""

    machines: MachineMeta
    platform: PlatformMeta
    policy: AccessPolicy
    limits: DeployLimits = field(default_factory=DeployLimits)

    # -- users -----------------------------------------------------------------------------------

    async def list_machines(
        self, caller: TokenRecord, app: str, limit: int, cursor: str | None
    ) -> AppMachines:
        """A page of the app's machines (`limit` 1 to MAX_MACHINE_PAGE, after `cursor`)."""
        return await self.platform.read(self._list_machines, caller, app, limit, cursor)

    def _list_machines(
        self, caller: TokenRecord, name: str, limit: int, cursor: str | None
    ) -> AppMachines:
        app = visible_app(self.platform, caller, name)
        after = _cursor(cursor)
        if self._foreign(after, lambda m: m.app_id == app.id):
            return AppMachines(app, [], None)
        page = _page(self.machines.of_app(app.id, limit=limit, after=after), limit)
        found = [(m, self.machines.events(m.id)) for m in page.machines]
        return AppMachines(app, found, page.next_cursor)

    def _foreign(self, cursor: str | None, belongs: Callable[[Machine], bool]) -> bool:
        """Whether `cursor` names a machine outside what the caller pages through. Pages
        compare with the cursor machine's creation time, so such a cursor answers as a missing
        machine does (an empty page): it would confirm another org's machine id and bound its
        creation time."""
        if cursor is None:
            return False
        machine = self.machines.get(cursor)
        return machine is not None and not belongs(machine)

    async def app_logs(
        self, caller: TokenRecord, app: str, after: int
    ) -> tuple[App, list[LogLine]]:
        """Log lines of the app's machines with ids above `after`, oldest first."""
        return await self.platform.read(self._app_logs, caller, app, after)

    def _app_logs(self, caller: TokenRecord, name: str, after: int) -> tuple[App, list[LogLine]]:
        app = visible_app(self.platform, caller, name)
        return app, self.machines.logs(app.id, after, MAX_LOG_LINES)

    async def get_machine(
        self, caller: TokenRecord, machine_id: str
    ) -> tuple[Machine, list[MachineEvent]]:
        """A machine the caller sees (its org's), with its latest events."""
        return await self.platform.read(self._get_machine, caller, machine_id)

    def _get_machine(
        self, caller: TokenRecord, machine_id: str
    ) -> tuple[Machine, list[MachineEvent]]:
        machine = self._visible(caller, machine_id)
        return machine, self.machines.events(machine.id)

    def _visible(self, caller: TokenRecord, machine_id: str) -> Machine:
        """A machine of the caller's org; another org's answers as a missing one does."""
        machine = self.machines.get(machine_id)
        if machine is None or not sees_org(caller, machine.org_id):
            raise NotFound("machine", machine_id)
        return machine

    async def machine_logs(
        self, caller: TokenRecord, machine_id: str, after: int, tail: int | None
    ) -> tuple[Machine, list[LogLine]]:
        """One machine's log lines with ids above `after`, oldest first: the first page, or
        its last `tail` lines (at most MAX_LOG_LINES)."""
        return await self.platform.read(self._machine_logs, caller, machine_id, after, tail)

    def _machine_logs(
        self, caller: TokenRecord, machine_id: str, after: int, tail: int | None
    ) -> tuple[Machine, list[LogLine]]:
        machine = self._visible(caller, machine_id)
        limit = MAX_LOG_LINES if tail is None else min(tail, MAX_LOG_LINES)
        lines = self.machines.machine_logs(machine.id, after, limit, tail=tail is not None)
        return machine, lines

    async def change(self, caller: TokenRecord, machine_id: str, action: str) -> Machine:
        """Stop, start or restart a machine of an app the caller may push to. Starting a
        machine not desired started (also by restart) makes it live: over the app's live
        cap it is LimitExceeded, as for deploys."""
        if action not in ACTIONS:
            raise ValueError(f"unknown machine action {action!r}")
        return await self.platform.run(self._change, caller, machine_id, action)

    def _change(self, caller: TokenRecord, machine_id: str, action: str) -> Machine:
        machine = self._visible(caller, machine_id)
        if PUSH not in self.policy.allowed(caller, machine.app_name):
            raise Forbidden(f"this token may not manage machines of app {machine.app_name}")
        running = machine.desired == "started" and machine.state in ("starting", "started")
        if action == "stop":
            self.machines.set_desired(machine.id, "stopped")
        elif action == "restart" or not running:
            try:
                self.machines.start(machine.id, bump=True, max_live=self.limits.per_app)
            except TooManyMachines as e:
                raise Invalid(f"app {machine.app_name}: {e}") from None
        who = caller.name or "token " + caller.id
        self.machines.add_event(machine.id, f"{action.capitalize()} requested by {who}")
        found = self.machines.get(machine.id)
        if found is None:  # deleted meanwhile (an idle machine of a busy app)
            raise NotFound("machine", machine.id)
        log.info("machine %s: %s by token %s", machine.id, action, caller.id)
        return found

    # -- agents ----------------------------------------------------------------------------------

    @staticmethod
    def _agent(caller: TokenRecord) -> None:
        """Agents use an admin token (every machine), an org token (its org's machines) or an
        agent token (its org's, or every machine for one made for every org): only an agent
        token receives machines' secrets (`services/secrets.py`)."""
        if caller.kind not in ("admin", "org", "agent"):
            raise Forbidden(f"a {caller.kind} token may not act as an agent")

    @staticmethod
    def _serves(caller: TokenRecord, org_id: int) -> bool:
        if caller.kind == "agent" and caller.org_id is None:
            return True
        return sees_org(caller, org_id)

    def _agent_machine(self, caller: TokenRecord, machine_id: str) -> Machine:
        self._agent(caller)
        machine = self.machines.get(machine_id)
        if machine is None or not self._serves(caller, machine.org_id):
            raise NotFound("machine", machine_id)
        return machine

    async def agent_machines(
        self, caller: TokenRecord, region: str | None, limit: int, cursor: str | None
    ) -> MachinePage:
        """A page of the region's machines desired started (an org token: its org's)."""
        self._agent(caller)
        region = DEFAULT_REGION if region is None else region
        if not REGION_RE.match(region):
            raise Invalid("region must be a region code such as iad, sin, syd")
        after = _cursor(cursor)
        org = None if caller.kind == "admin" else caller.org_id  # agent: None is every org
        return await self.platform.read(self._agent_machines, region, org, limit, after)

    def _agent_machines(
        self, region: str, org: int | None, limit: int, after: str | None
    ) -> MachinePage:
        if org is not None and self._foreign(after, lambda m: m.org_id == org):
            return MachinePage([], None)
        return _page(self.machines.in_region(region, org, limit=limit, after=after), limit)

    async def report_state(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], StateReport]
    ) -> Machine:
        """An agent's report of a machine's state; the release follows (`body` is asked for
        once the machine is found)."""
        return await self.platform.run(self._report_state, caller, machine_id, body)

    def _report_state(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], StateReport]
    ) -> Machine:
        machine = self._agent_machine(caller, machine_id)
        report = body()
        if report.state not in STATES or report.state == "created":
            raise Invalid("state must be one of starting, started, stopped, failed")
        if not _int32(report.exit_code, -INT32_MAX - 1):
            raise Invalid(f"exit_code must be a whole number from {-INT32_MAX - 1} to {INT32_MAX}")
        address = None if report.address is None else check_address(report.address)
        if address is not None and caller.kind not in ("admin", "agent"):
            # The proxy sends the app's requests to this address: a tenant who could name it
            # would aim the proxy at another org's machine or at the proxy's own host.
            raise Forbidden("only an agent or admin token reports a machine's address")
        self.machines.report_state(machine.id, report.state, report.exit_code, address)
        found = self.machines.get(machine.id)
        if found is None:  # deleted meanwhile as an idle record (create_for_release)
            raise NotFound("machine", machine.id)
        return found

    async def report_health(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], HealthReport]
    ) -> Machine:
        """An agent's report of a machine's health checks (`passing` or `critical`); the
        release follows. Conflict when the machine's release has no checks or it is neither
        starting nor started."""
        return await self.platform.run(self._report_health, caller, machine_id, body)

    def _report_health(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], HealthReport]
    ) -> Machine:
        machine = self._agent_machine(caller, machine_id)
        report = body()
        if report.status not in HEALTH or report.status == "starting":
            raise Invalid("status must be one of passing, critical")
        if report.message is not None and len(report.message) > MAX_HEALTH_MESSAGE:
            raise Invalid(f"message must be at most {MAX_HEALTH_MESSAGE} characters")
        try:
            changed = self.machines.report_health(machine.id, report.status, report.message)
        except HealthRefused as e:
            raise Conflict(str(e)) from None
        found = self.machines.get(machine.id)
        if changed is None or found is None:  # deleted meanwhile as an idle record
            raise NotFound("machine", machine.id)
        if changed:
            log.info("machine %s: health %s", machine.id, report.status)
        return found

    async def routes(self, caller: TokenRecord, limit: int | None = None) -> Routes:
        """The routes to the machines of apps with a service (an org-bound token: its org's
        apps only), at most `limit` machines (default MAX_ROUTES, read at each call)."""
        if caller.kind not in ("admin", "org", "agent", "proxy"):
            raise Forbidden(f"a {caller.kind} token may not read the routes")
        org = None if caller.kind == "admin" else caller.org_id  # agent, proxy: None is every org
        limit = MAX_ROUTES if limit is None else limit
        apps, truncated = await self.platform.read(self.machines.routes, org, limit)
        return Routes(apps, truncated)

    async def add_event(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], MachineEventInput]
    ) -> None:
        """An agent records a machine event (its message cut to MAX_EVENT characters)."""
        await self.platform.run(self._add_event, caller, machine_id, body)

    def _add_event(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], MachineEventInput]
    ) -> None:
        machine = self._agent_machine(caller, machine_id)
        event = body()
        if not event.message:
            raise Invalid("message is required")
        if not _int32(event.duration_ms, 0):
            raise Invalid(f"duration_ms must be a whole number from 0 to {INT32_MAX}")
        self.machines.add_event(machine.id, event.message[:MAX_EVENT], event.duration_ms)

    async def add_logs(
        self, caller: TokenRecord, machine_id: str, body: Callable[[], LogLines]
    ) -> None:
        """An agent appends a machine's log lines."""
        await self.platform.run(self._add_logs, caller, machine_id, body)

    def _add_logs(self, caller: TokenRecord, machine_id: str, body: Callable[[], LogLines]) -> None:
        machine = self._agent_machine(caller, machine_id)
        self.machines.add_logs(machine.id, body().lines)
