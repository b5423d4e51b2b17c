"""Health checks of one machine, run by its agent: http (a GET) or tcp (a connect), each on its own
interval, folded into one status for the machine.

`starting` until the first time every check has passed (then `passing`); a check failing once
its grace period (counted from the machine's start) is over makes it `critical`, with a short
message naming the check and why; `passing` again once every check passes again. A failure
within the grace period changes nothing. The callback hears transitions only, one at a time, in
order; one that raises is retried (with backoff) until it succeeds or the status moves on.

Bounded: every probe has its check's timeout, an http probe reads at most `MAX_BODY` bytes of
the body (and aiohttp bounds the status line and headers), nothing is queued: a slow callback
is handed the latest status when it is ready for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

log = logging.getLogger("skyreg.health")

MAX_BODY = 64 << 10  # bytes of an http check's body read (and discarded)
FIRST_CHECK = 1.0  # seconds after the start, at most, before a check first runs
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0  # backoff of a callback that failed
MAX_CHECKS = 10

Status = str  # "starting" | "passing" | "critical"
OnChange = Callable[[str, str | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Check:
    """One check of a service, every field filled in (see the contract's Service)."""

    type: str  # "http" | "tcp"
    port: int
    path: str = "/"
    interval: float = 10.0
    timeout: float = 2.0
    grace_period: float = 5.0

    def describe(self) -> str:
        """`http :8080/healthz` or `tcp :8080`, for messages."""
        return f"http :{self.port}{self.path}" if self.type == "http" else f"tcp :{self.port}"


def _number(doc: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = doc.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"check {name} must be a number from {low:g} to {high:g}")
    return float(value)


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be a port number (1-65535)")
    return value


def checks_from_service(service: Mapping[str, Any] | None) -> list[Check]:
    """The checks of a service (`AgentMachine.service`), defaults filled in; none for None.

    ValueError for a service that does not follow the contract (the server validates it: this
    only keeps a bad answer from reaching a socket)."""
    if service is None:
        return []
    if not isinstance(service, Mapping):
        raise ValueError("service must be an object")
    internal = _port(service.get("internal_port"), "internal_port")
    raw = service.get("checks") or []
    if not isinstance(raw, list) or len(raw) > MAX_CHECKS:
        raise ValueError(f"checks must be a list of at most {MAX_CHECKS}")
    checks = []
    for doc in raw:
        if not isinstance(doc, Mapping) or doc.get("type") not in ("http", "tcp"):
            raise ValueError("a check must be an object with type http or tcp")
        port = doc.get("port")
        path = doc.get("path") or "/"
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
            raise ValueError("check path must start with / (at most 1024 characters)")
        if any(not 0x21 <= ord(c) <= 0x7E for c in path):
            raise ValueError("check path must be printable ASCII without spaces")
        interval = _number(doc, "interval", 10.0, 1, 3600)
        timeout = _number(doc, "timeout", 2.0, 0.1, 60)
        checks.append(
            Check(
                type=str(doc["type"]),
                port=internal if port is None else _port(port, "check port"),
                path=path if doc["type"] == "http" else "/",
                interval=interval,
                timeout=min(timeout, interval),
                grace_period=_number(doc, "grace_period", 5.0, 0, 3600),
            )
        )
    return checks


class HealthChecker:
    """Runs `checks` against `address` (an IPv4 or IPv6 literal) until `stop()`.

    `started_at` is the machine's start on `time.monotonic()`'s clock (default: now); grace
    periods count from it. `on_change(status, message)` is awaited on every transition
    (`message` names the failing check for `critical`, None otherwise).
    """

    def __init__(
        self,
        address: str,
        checks: Sequence[Check],
        on_change: OnChange,
        *,
        started_at: float | None = None,
    ) -> None:
        if not checks:
            raise ValueError("a HealthChecker needs at least one check")
        self.address = address
        self.checks = list(checks)
        self.on_change = on_change
        self.started_at = time.monotonic() if started_at is None else started_at
        self.status: Status = "starting"
        self.message: str | None = None
        self._results: list[tuple[bool, str] | None] = [None] * len(self.checks)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start the checks (the first of each within `FIRST_CHECK` seconds)."""
        if self._tasks:
            return
        # A new connection per probe: a check proves the machine accepts connections now.
        connector = aiohttp.TCPConnector(force_close=True, limit=len(self.checks))
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        for i, check in enumerate(self.checks):
            self._tasks.append(asyncio.create_task(self._loop(i, check), name=f"check-{i}"))
        self._tasks.append(asyncio.create_task(self._notify(), name="health-notify"))

    async def stop(self) -> None:
        """Stop every check (and a callback in progress). Safe to repeat."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- checks -----------------------------------------------------------------------------------

    async def _loop(self, i: int, check: Check) -> None:
        await asyncio.sleep(min(FIRST_CHECK, check.interval))
        while True:
            began = time.monotonic()
            self._results[i] = await self.probe(check)
            self._evaluate()
            await asyncio.sleep(max(0.0, began + check.interval - time.monotonic()))

    async def probe(self, check: Check) -> tuple[bool, str]:
        """Run `check` once: (passed, why not)."""
        try:
            async with asyncio.timeout(check.timeout):
                if check.type == "http":
                    return await self._http(check)
                return await self._tcp(check)
        except TimeoutError:
            return False, f"timed out after {check.timeout:g}s"
        except (OSError, aiohttp.ClientError) as e:
            return False, _reason(e)

    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    async def _http(self, check: Check) -> tuple[bool, str]:
        assert self._session is not None
        url = URL(f"http://{self._host()}:{check.port}{check.path}", encoded=True)
        async with self._session.get(
            url, allow_redirects=False, headers={"Host": "localhost"}
        ) as resp:
            read = 0  # the body is read (a server may wait for that) and dropped, to a bound
            while read < MAX_BODY and (
                chunk := await resp.content.read(min(MAX_BODY - read, 1 << 14))
            ):
                read += len(chunk)
            if 200 <= resp.status < 400:
                return True, ""
            return False, f"HTTP {resp.status}"

    async def _tcp(self, check: Check) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(self.address, check.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, ""

    # -- status -----------------------------------------------------------------------------------

    def _evaluate(self) -> None:
        results = self._results
        if all(r is not None and r[0] for r in results):
            status, message = "passing", None
        else:
            since = time.monotonic() - self.started_at
            failing = [
                f"{check.describe()}: {r[1]}"
                for check, r in zip(self.checks, results, strict=True)
                if r is not None and not r[0] and since >= check.grace_period
            ]
            if not failing:
                return  # still within a grace period: nothing changes
            status, message = "critical", "; ".join(failing)[:1000]
        if status != self.status:
            self.status, self.message = status, message
            self._changed.set()

    async def _notify(self) -> None:
        reported: Status = "starting"
        delay = _RETRY_FIRST
        while True:
            await self._changed.wait()
            self._changed.clear()
            status, message = self.status, self.message
            if status == reported:
                continue
            try:
                await self.on_change(status, message)
            except Exception as e:  # retried; the next transition may replace it
                log.warning("health report (%s) failed, retrying in %gs: %s", status, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                self._changed.set()
                continue
            reported, delay = status, _RETRY_FIRST


def _reason(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        e = e.os_error
    if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(e, OSError) and e.errno is not None:
        return f"cannot connect: {os.strerror(e.errno)}"
    if isinstance(e, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return f"bad response: {e}"[:200]
    return str(e)[:200] or type(e).__name__
