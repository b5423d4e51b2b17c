"""Following the server's routes: `GET /api/v1/agent/routes`, polled into a `RoutingTable`.

Every `poll` seconds `RouteSync` asks the server which machines serve each app and replaces each
app's backends in the table; apps the server no longer lists are removed (the proxy answers 404
for them). The answer is checked whole before anything changes: one that is not the routes
document (the shape `GET /api/v1/agent/routes` answers), or larger than `max_bytes`, is refused
and the table stays as it was, as it does when the server cannot be reached. The proxy keeps
serving from its last table meanwhile; a failed poll is logged, never fatal.

Region preference: a proxy serves its own region's machines of an app while at least one of
them is healthy and not draining (its draining machines stay in the table, so their requests in
flight are still counted); when none is, the nearest region's that has one (given the round
trips, `distance`), else every machine of the app, which leaves the other regions' healthy ones
for `pick`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp

from skyreg.client.api import API_PREFIX
from skyreg.proxy.table import Backend, RoutingTable

_log = logging.getLogger(__name__)

ROUTES_PATH: Final = "/agent/routes"
# The server lists at most 10000 machines; each is ~150 bytes of JSON. 16 MiB leaves room for
# long names and is still a bound on what one poll may make this process hold.
MAX_ANSWER: Final = 16 << 20
_READ: Final = 64 * 1024


class RoutesError(Exception):
    """The server's answer is not a routes document (or could not be had)."""


def parse_routes(doc: Any) -> tuple[dict[str, list[Backend]], bool]:
    """The backends of every app in a routes document, and whether the server truncated it;
    RoutesError naming the first thing that is not as the contract says."""
    if not isinstance(doc, dict) or not isinstance(doc.get("apps"), list):
        raise RoutesError("not an object with an `apps` list")
    truncated = doc.get("truncated", False)
    if not isinstance(truncated, bool):
        raise RoutesError("`truncated` is not a boolean")
    apps: dict[str, list[Backend]] = {}
    for entry in doc["apps"]:
        if not isinstance(entry, dict):
            raise RoutesError("an app is not an object")
        name = entry.get("app")
        if not isinstance(name, str) or not name:
            raise RoutesError("an app has no name")
        if name in apps:
            raise RoutesError(f"app {name!r} is listed twice")
        machines = entry.get("machines")
        if not isinstance(machines, list):
            raise RoutesError(f"app {name!r} has no `machines` list")
        apps[name] = [_backend(name, m) for m in machines]
    return apps, truncated


def _backend(app: str, m: Any) -> Backend:
    if not isinstance(m, dict):
        raise RoutesError(f"a machine of {app!r} is not an object")
    machine_id, region, address, port = (
        m.get("id"),
        m.get("region"),
        m.get("address"),
        m.get("port"),
    )
    healthy, draining = m.get("healthy"), m.get("draining")
    if not isinstance(machine_id, str) or not machine_id:
        raise RoutesError(f"a machine of {app!r} has no id")
    if not isinstance(region, str):
        raise RoutesError(f"machine {machine_id} has no region")
    if not isinstance(address, str):
        raise RoutesError(f"machine {machine_id} has no address")
    try:
        # An address only, never a name: the proxy would resolve it on every connect.
        host = str(ipaddress.ip_address(address))
    except ValueError:
        raise RoutesError(f"machine {machine_id}: {address!r} is not an IP address") from None
    # bool is an int: true is not port 1.
    if type(port) is not int or not 1 <= port <= 65535:
        raise RoutesError(f"machine {machine_id}: port {port!r} is not 1..65535")
    if not isinstance(healthy, bool) or not isinstance(draining, bool):
        raise RoutesError(f"machine {machine_id}: healthy and draining must be booleans")
    return Backend(machine_id, host, port, region, healthy=healthy, draining=draining)


def prefer_region(
    backends: list[Backend],
    region: str | None,
    distance: Callable[[str], float] | None = None,
) -> list[Backend]:
    """The backends a proxy in `region` routes to (None: no preference, all of them): its own
    region's while one of them serves; else, with `distance` (a region's round trip from this
    one), the nearest region's that has one serving; else every region's."""
    if region is None:
        return backends

    def serving(found: list[Backend]) -> bool:
        return any(b.healthy and not b.draining for b in found)

    own = [b for b in backends if b.region == region]
    if serving(own):
        return own
    if distance is not None:
        others = sorted({b.region for b in backends} - {region}, key=lambda r: (distance(r), r))
        for other in others:
            theirs = [b for b in backends if b.region == other]
            if serving(theirs):
                return theirs
    return backends


def _decode(body: bytes) -> tuple[dict[str, list[Backend]], bool]:
    try:
        doc = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise RoutesError(f"the answer is not JSON: {e}") from None
    return parse_routes(doc)


class RouteSync:
    """Keeps `table` following `server`'s routes (see the module's docstring)."""

    def __init__(
        self,
        table: RoutingTable,
        server: str,
        token: str,
        region: str | None,
        *,
        poll: float = 1.0,
        timeout: float = 10.0,
        max_bytes: int = MAX_ANSWER,
        distance: Callable[[str], float] | None = None,
    ) -> None:
        self.table = table
        self.distance = distance  # a region's round trip from this one (None: all alike)
        self.server = server.rstrip("/")
        self.region = region
        self.poll = poll
        self.max_bytes = max_bytes
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._last: bytes | None = None  # the last answer applied
        self.polls = 0  # answers applied
        self.failures = 0  # polls that changed nothing: unreachable, error status, malformed

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll` seconds until `stop` is set (the first poll at once)."""
        try:
            while not stop.is_set():
                await self.poll_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the HTTP session (the next poll opens another)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def poll_once(self) -> bool:
        """Fetch the routes and apply them; False (logged, table unchanged) when that failed."""
        try:
            body = await self._fetch()
            if body != self._last:  # most polls find the routes as they were: nothing to do
                # Up to max_bytes of JSON: decoded and checked off the proxy's event loop.
                apps, truncated = await asyncio.to_thread(_decode, body)
                self.apply(apps, truncated)
                self._last = body
        except (RoutesError, aiohttp.ClientError, TimeoutError) as e:
            self.failures += 1
            _log.warning("routes from %s refused, keeping the last table: %s", self.server, e)
            return False
        self.polls += 1
        return True

    def apply(self, apps: Mapping[str, list[Backend]], truncated: bool = False) -> None:
        """Make the table hold `apps` (each with this proxy's region preference). A truncated
        list removes no app: those past the cut may well still exist."""
        for name, backends in apps.items():
            self.table.replace(name, prefer_region(backends, self.region, self.distance))
        if truncated:
            _log.warning("the server truncated its routes: apps it did not list are kept")
            return
        for name in self.table.apps() - apps.keys():
            self.table.remove(name)

    async def _fetch(self) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # As skyreg.client.api.call_api asks, with a bound on what the answer may make us hold.
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        url = self.server + API_PREFIX + ROUTES_PATH
        async with self._session.get(url, headers=headers) as resp:
            if resp.status >= 400:
                text = (await resp.content.read(300)).decode(errors="replace")
                raise RoutesError(f"GET {ROUTES_PATH}: HTTP {resp.status} {text}")
            if resp.content_length is not None and resp.content_length > self.max_bytes:
                raise RoutesError(f"the answer is over {self.max_bytes} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_READ):
                body += chunk
                if len(body) > self.max_bytes:
                    raise RoutesError(f"the answer is over {self.max_bytes} bytes")
        return bytes(body)
