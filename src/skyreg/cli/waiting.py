"""Waiting for a release to finish (`skyreg deploy` without `--detach`), telling what happens.

A release is `complete` once every machine of it reports `started` (and, when the release's
service has health checks, its checks pass), `failed` as soon as one fails or its checks turn
critical; the server decides (`MachineMeta.reconcile_release`). A rolling release may hold
machines back (desired `waiting`) until the ones before them are ready. Meanwhile the region
agents post each machine's events (health changes among them) and log lines. This module polls
the management API (the app's releases, its machines with their latest events, its log lines),
prints every new event once, and returns the exit code a script can trust: 0 for complete, 1
for failed (with the failed machine's last health event and log lines), stopped or timed out
(naming the machines not ready).

Everything the server relays came from a tenant's machine: it is cut to a bounded length and
stripped of control characters before it reaches the terminal, and every loop is bounded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from skyreg.cli.client import Client, fail
from skyreg.cli.platform import _quote
from skyreg.services.names import parse_duration

POLL_INTERVAL = 0.5  # seconds between polls
LOG_TAIL = 20  # log lines of a failed machine shown
MACHINE_PAGE = 1000  # machines per page (the API's maximum)
MAX_MACHINE_PAGES = 50  # pages of the app's machines one poll follows
MAX_LOG_PAGES = 5  # pages of the app's log lines one poll reads (each up to 1000 lines)
FINAL_LOG_PAGES = 50  # pages read to catch up once the release has failed
RELEASE_WINDOW = 5  # newest releases asked for while ours is among them
MAX_RELEASE_WINDOW = 1000  # the API's maximum
MAX_SEEN_EVENTS = 200  # events remembered per machine (to print each once)
MAX_TEXT = 1000  # characters of one relayed event or log line printed
MAX_WAIT = 24 * 3600  # seconds --wait-timeout may ask for
WAIT_HINT = "use a duration such as 90s, 5m or 1h"
HEALTH_EVENT = "Health checks "  # the server's events: "Health checks passing" or
HEALTH_CRITICAL = "Health checks critical"  # "Health checks critical: <message>"

Echo = Callable[[str], None]


def parse_wait_timeout(value: str) -> float:
    """Seconds from `--wait-timeout` (e.g. 5m, 90s, 1h30m); ends the command when invalid."""
    try:
        seconds = parse_duration(value, "--wait-timeout", WAIT_HINT)
    except ValueError as e:
        fail(str(e))
    if seconds is None or seconds > MAX_WAIT:
        fail(f"--wait-timeout must be at most {MAX_WAIT // 3600}h")
    return float(seconds)


def _when(value: object) -> datetime:
    """An API time (RFC 3339) to order by; the far future when missing or malformed."""
    try:
        return datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)


def health_checks(release: dict[str, Any]) -> int:
    """How many health checks the release's service has (0: none, or no service)."""
    service = release.get("service")
    checks = service.get("checks") if isinstance(service, dict) else None
    return len(checks) if isinstance(checks, list) else 0


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """`text` safe for a terminal: control characters (escape sequences) as U+FFFD, cut to
    `limit` characters (the tail marked with an ellipsis)."""
    raw = str(text)
    cut = raw[:limit]
    safe = "".join(c if c.isprintable() or c == "\t" else "\ufffd" for c in cut)
    return safe + ("…" if len(raw) > limit else "")


@dataclass
class _Machine:
    """What the wait knows of one machine of the release."""

    id: str
    region: str
    state: str = "created"
    exit_code: int | None = None
    desired: str = "started"
    health: str | None = None  # starting, passing, critical; None: the release has no checks
    health_event: str | None = None  # the latest "Health checks ..." event printed
    events: list[str] = field(default_factory=list)  # messages printed, oldest first
    seen: deque[tuple[object, ...]] = field(default_factory=lambda: deque(maxlen=MAX_SEEN_EVENTS))
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL))

    @property
    def label(self) -> str:
        return f"machine {printable(self.id, 64)} [{printable(self.region, 32)}]"

    @property
    def critical(self) -> bool:
        """Its health checks failed (as the server says now, or as its latest health event
        said: a failed release's machines are stopped, which may clear their health)."""
        if self.health is not None:
            return self.health == "critical"
        return (self.health_event or "").startswith(HEALTH_CRITICAL)

    def ready(self, checks: int) -> bool:
        """Started, and passing its health checks when the release has some."""
        return self.state == "started" and (not checks or self.health == "passing")

    def status(self, checks: int) -> str:
        """`state`, its health and a rolling turn not come yet, for a list of the not ready."""
        parts = [printable(self.state, 32)]
        if checks:
            parts.append(f"health {printable(self.health or 'unknown', 32)}")
        if self.desired == "waiting":
            parts.append("waiting its turn")
        return ", ".join(parts)


@dataclass(frozen=True)
class WaitOutcome:
    """How a wait ended: the exit code, the release as last seen, and why (empty for success)."""

    code: int
    release: dict[str, Any]
    reason: str = ""


@dataclass
class ReleaseWatch:
    """Polls one release of `app` and prints what changed since the last poll."""

    api: Client
    app: str
    version: int
    echo: Echo
    checks: int = 0  # health checks of the release's service
    machines: dict[str, _Machine] = field(default_factory=dict)
    log_cursor: int = 0
    window: int = RELEASE_WINDOW

    @property
    def _app_path(self) -> str:
        return f"/apps/{_quote(self.app)}"

    # -- the release -----------------------------------------------------------------------------

    def release(self) -> dict[str, Any] | None:
        """The release as the server has it now (None: no longer among the newest 1000)."""
        while True:
            found = self.api("GET", f"{self._app_path}/releases", query={"limit": str(self.window)})
            releases = [r for r in found.get("releases", []) if isinstance(r, dict)]
            for r in releases:
                if r.get("version") == self.version:
                    return r
            newest = max((int(r.get("version", 0)) for r in releases), default=0)
            wanted = min(MAX_RELEASE_WINDOW, newest - self.version + 1)
            if newest <= self.version or wanted <= self.window:
                return None
            self.window = wanted  # newer deploys came: look further back (at most once a poll)

    # -- machines and their events ---------------------------------------------------------------

    def poll_machines(self) -> None:
        """Read the release's machines (every page of the app's, bounded) and print each new
        event and state change."""
        query: dict[str, str | None] = {"limit": str(MACHINE_PAGE)}
        for _ in range(MAX_MACHINE_PAGES):
            page = self.api("GET", f"{self._app_path}/machines", query=query)
            for m in page.get("machines", []):
                if isinstance(m, dict) and m.get("release_version") == self.version:
                    self._update(m)
            cursor = page.get("next_cursor")
            if not cursor or cursor == query.get("cursor"):
                return
            query["cursor"] = str(cursor)

    def _update(self, m: dict[str, Any]) -> None:
        """Print the machine's new events and its state change, in the order they happened
        (the agent reports `starting` before its first event)."""
        mid = str(m.get("id", ""))
        known = self.machines.get(mid)
        if known is None:
            known = self.machines[mid] = _Machine(mid, str(m.get("region", "?")))
        news: list[tuple[datetime, str]] = []
        for event in m.get("events", []):
            if not isinstance(event, dict):
                continue
            key = (event.get("at"), event.get("message"), event.get("duration_ms"))
            if key in known.seen:
                continue
            known.seen.append(key)
            message = printable(event.get("message", ""))
            known.events.append(message)
            del known.events[:-LOG_TAIL]
            if message.startswith(HEALTH_EVENT):
                known.health_event = message
            news.append((_when(event.get("at")), message))
        state = str(m.get("state", "?"))
        exit_code = m.get("exit_code")
        desired = str(m.get("desired", "started"))
        if known.desired == "waiting" and desired == "started":  # a rolling release's next
            news.append((_when(m.get("updated_at")), "its turn to start"))
        known.desired = desired
        health = m.get("health")
        known.health = health if isinstance(health, str) else None
        if state != known.state:
            known.state = state
            known.exit_code = exit_code if isinstance(exit_code, int) else None
            code = f" (exit code {known.exit_code})" if known.exit_code is not None else ""
            news.append((_when(m.get("updated_at")), f"state {printable(state, 32)}{code}"))
        for _, line in sorted(news, key=lambda item: item[0]):  # stable: ties keep their order
            self.echo(f"  {known.label}: {line}")

    # -- logs ------------------------------------------------------------------------------------

    def poll_logs(self, pages: int = MAX_LOG_PAGES) -> bool:
        """Read up to `pages` pages of the app's new log lines, keeping the last LOG_TAIL lines
        of each machine of the release. True once caught up with the server."""
        for _ in range(pages):
            found = self.api("GET", f"{self._app_path}/logs", query={"after": str(self.log_cursor)})
            lines = [ln for ln in found.get("lines", []) if isinstance(ln, dict)]
            for ln in lines:
                machine = self.machines.get(str(ln.get("machine_id")))
                if machine is not None:
                    machine.logs.append(printable(ln.get("line", ""), 4096))
            last = found.get("last")
            if not lines or not isinstance(last, int) or last <= self.log_cursor:
                return True
            self.log_cursor = last
        return False

    # -- endings ---------------------------------------------------------------------------------

    def failure(self) -> str:
        """Why the release failed: its failed machines (those whose health checks turned
        critical too), their last events (health event) and log lines."""
        failed = [m for m in self.machines.values() if m.state == "failed" or m.critical]
        if not failed:
            return f"release v{self.version} failed"
        if not self.poll_logs(FINAL_LOG_PAGES):
            self.echo("  (not every log line could be read)")
        out = [f"release v{self.version} failed:"]
        for m in failed:
            if m.state != "failed":
                last = f": {m.health_event}" if m.health_event else " (health critical)"
                out.append(f"  {m.label} failed its health checks{last}")
            else:
                code = f" with exit code {m.exit_code}" if m.exit_code is not None else ""
                last = f": {m.events[-1]}" if m.events else ""
                out.append(f"  {m.label} failed{code}{last}")
            if m.logs:
                out.append(f"  last {len(m.logs)} log lines of machine {printable(m.id, 64)}:")
                out += [f"    {line}" for line in m.logs]
            else:
                out.append(f"  machine {printable(m.id, 64)} wrote no log lines")
        return "\n".join(out)

    def not_ready(self) -> list[_Machine]:
        return [m for m in self.machines.values() if not m.ready(self.checks)]


def wait_release(
    api: Client, app: str, release: dict[str, Any], timeout: float, echo: Echo
) -> WaitOutcome:
    """Poll `release` (as the API answered a deploy) every POLL_INTERVAL seconds until it is
    complete (code 0), failed, stopped or `timeout` seconds have passed (code 1), printing each
    machine's new events and state changes through `echo`."""
    version = int(release["version"])
    checks = health_checks(release)
    watch = ReleaseWatch(api, app, version, echo, checks)
    deadline = time.monotonic() + max(0.0, timeout)
    current = release
    what = f"release v{version} of {printable(app, 64)}"
    if checks:
        plural = "s" if checks > 1 else ""
        what += f" to start and pass its {checks} health check{plural}"
    echo(f"Waiting for {what} (up to {timeout:g}s)...")
    while True:
        found = watch.release()
        if found is None:
            return WaitOutcome(1, current, f"release v{version} is no longer listed by the server")
        current = found
        watch.poll_machines()
        watch.poll_logs()
        status = current.get("status")
        if status == "complete":
            echo(f"Release v{version} of {printable(app, 64)} is complete.")
            return WaitOutcome(0, current)
        if status == "failed":
            return WaitOutcome(1, current, watch.failure())
        if watch.machines and all(m.desired == "stopped" for m in watch.machines.values()):
            # Failed since the release was read (its machines are stopped too), or stopped: an
            # immediate deploy after this one, or `skyreg machines stop`.
            current = watch.release() or current
            if current.get("status") == "failed":
                return WaitOutcome(1, current, watch.failure())
            return WaitOutcome(
                1, current, f"release v{version} was stopped before it completed ({status})"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = watch.not_ready()
            names = ", ".join(f"{m.label} ({m.status(checks)})" for m in waiting[:20])
            more = f" and {len(waiting) - 20} more" if len(waiting) > 20 else ""
            if not watch.machines:
                names = "no machine of the release was found"
            not_ready = "not ready" if checks else "not started"
            return WaitOutcome(
                1,
                current,
                f"release v{version} is still {printable(status, 32)} after {timeout:g}s; "
                f"{not_ready}: {names or 'none'}{more}",
            )
        time.sleep(min(POLL_INTERVAL, left))


def wait_for_release(
    api: Client, app: str, release: dict[str, Any], timeout: float, echo: Echo
) -> int:
    """`wait_release`, its reason (if it failed) printed as `error: ...` through `echo`;
    returns the exit code (0: the release is complete)."""
    outcome = wait_release(api, app, release, timeout, echo)
    if outcome.reason:
        echo(f"error: {outcome.reason}")
    return outcome.code
