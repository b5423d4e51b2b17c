"""The region agent: polls the server for its region's machines and makes them so.

Every `POLL_INTERVAL` the agent reads `GET /api/v1/agent/machines?region=R`. A machine desired
`started` that does not run here (or whose generation changed: a restart) is prepared (image
through the same server's `/v2/`, into the host-wide layer cache under `<data-dir>/cache`), given
a fresh rootfs copy (`<data-dir>/machines/<id>/rootfs`; writes vanish on restart) and started
with its log in `<data-dir>/machines/<id>/log`. The agent reports `starting`, then `started` once
the process has lived `EARLY_EXIT` seconds; an exit before that, a non-zero exit, or a failed
preparation is `failed`; a requested stop (SIGTERM, SIGKILL after `STOP_GRACE`) is `stopped`.
Events and new log lines are posted as they happen. A machine that exited on its own is not
started again until its generation changes. Shutting the agent down stops every machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from skyreg.client.api import call_api
from skyreg.machines.layercache import LayerCache
from skyreg.machines.prepare import RegistrySource, prepare_image
from skyreg.machines.rootfs import fresh_rootfs, release_rootfs, share_data_dir
from skyreg.machines.runtime import ImageConfig, RunningMachine, start_machine
from skyreg.machines.unpack import UnpackLimits
from skyreg.privatefs import private_dir

log = logging.getLogger("skyreg.agent")

POLL_INTERVAL = 0.5
EARLY_EXIT = 2.0  # seconds: exiting sooner than this after starting is a failure
STOP_GRACE = 5.0
MAX_LOG_BATCH = 500
MAX_LOG_LINE = 64 << 10  # bytes of one log line kept; longer lines are cut
PAGE_SIZE = 500  # machines per page of `agent/machines`
MAX_PAGES = 200  # pages one poll follows (100,000 machines) before it gives up
_MONITOR_INTERVAL = 0.2


@dataclass
class _Local:
    """A machine this agent is running (or preparing) for one generation."""

    id: str
    generation: int
    task: asyncio.Task[None] | None = None
    stop_requested: bool = False  # desired=stopped, a restart, or the agent shutting down


@dataclass
class Agent:
    server: str
    token: str
    region: str
    data_dir: Path
    poll_interval: float = POLL_INTERVAL
    page_size: int = PAGE_SIZE
    limits: UnpackLimits = field(default_factory=UnpackLimits)  # unpacking an image
    _local: dict[str, _Local] = field(default_factory=dict)
    # machine id → the generation that ran and exited on its own (not started again)
    _finished: dict[str, int] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None
    _cache: LayerCache | None = None

    # -- HTTP -----------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await call_api(self.session, self.server, self.token, method, path, body)

    async def _report(self, path: str, body: dict[str, Any]) -> None:
        """POST a report; failures are logged, never fatal (the next report catches up)."""
        try:
            await self._api("POST", path, body)
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
            log.warning("report %s failed: %s", path, e)

    async def _state(self, mid: str, state: str, exit_code: int | None = None) -> None:
        body: dict[str, Any] = {"state": state}
        if exit_code is not None:
            body["exit_code"] = exit_code
        await self._report(f"/agent/machines/{mid}/state", body)

    async def _event(self, mid: str, message: str, duration_ms: int | None = None) -> None:
        body: dict[str, Any] = {"message": message}
        if duration_ms is not None:
            body["duration_ms"] = duration_ms
        await self._report(f"/agent/machines/{mid}/events", body)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and reconcile until `stop` is set; then stop every machine."""
        # Root's alone on the host; machines/ (and machines/<id>) are 0711 for the machines'
        # users, who reach them only through share_data_dir's view (see rootfs.py). An older
        # data dir is tightened here; its top levels suffice to make everything below private.
        private_dir(self.data_dir)
        private_dir(self.data_dir / "cache")
        private_dir(self.data_dir / "machines", mode=0o711)
        if await asyncio.to_thread(share_data_dir, self.data_dir, ("cache", "machines")):
            log.info("machine users reach their rootfs through this agent's mount namespace")
        self._cache = LayerCache(self.data_dir / "cache")
        timeout = aiohttp.ClientTimeout(total=300, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                while not stop.is_set():
                    try:
                        self._reconcile(await self.fetch_wanted())
                    except (aiohttp.ClientError, RuntimeError, TimeoutError, KeyError) as e:
                        log.warning("polling %s failed: %s", self.server, e)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll_interval)
            finally:
                await self.shutdown()
                self._session = None

    async def fetch_wanted(self) -> list[dict[str, Any]]:
        """Every machine the server wants running in this region, following the list's pages
        (all of them before reconciling: a machine missing from the answer would be stopped)."""
        machines: list[dict[str, Any]] = []
        query = {"region": self.region, "limit": str(self.page_size)}
        for _ in range(MAX_PAGES):
            page = await self._api("GET", "/agent/machines?" + urllib.parse.urlencode(query))
            machines += page["machines"]
            cursor = page.get("next_cursor")
            if not cursor:
                return machines
            if cursor == query.get("cursor"):
                raise RuntimeError(f"agent/machines: the cursor {cursor} did not advance")
            query["cursor"] = str(cursor)
        raise RuntimeError(f"agent/machines: more than {MAX_PAGES} pages")

    def _reconcile(self, machines: list[dict[str, Any]]) -> None:
        wanted = {str(m["id"]): m for m in machines}
        for mid, local in list(self._local.items()):
            if local.task is not None and local.task.done():
                del self._local[mid]
                continue
            m = wanted.get(mid)
            if m is None or m["desired"] != "started" or m["generation"] != local.generation:
                local.stop_requested = True
        for mid, m in wanted.items():
            if m["desired"] != "started" or mid in self._local:
                continue
            if self._finished.get(mid) == m["generation"]:
                continue
            local = _Local(mid, int(m["generation"]))
            local.task = asyncio.create_task(self._lifecycle(local, m), name=f"machine-{mid}")
            self._local[mid] = local

    async def shutdown(self) -> None:
        """Stop every machine this agent runs and wait for their final reports."""
        for local in self._local.values():
            local.stop_requested = True
        tasks = [t for local in self._local.values() if (t := local.task) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE + 20)
        self._local.clear()

    # -- one machine ----------------------------------------------------------------------------

    async def _lifecycle(self, local: _Local, m: dict[str, Any]) -> None:
        try:
            await self._run_machine(local, m)
        except Exception as e:  # a bug or an unexpected failure: report, never crash the loop
            log.exception("machine %s failed", local.id)
            await self._event(local.id, f"Machine failed: {e}"[:1000])
            await self._state(local.id, "failed")
            self._finished[local.id] = local.generation

    async def _run_machine(self, local: _Local, m: dict[str, Any]) -> None:
        mid = local.id
        home = self.data_dir / "machines" / mid
        await self._state(mid, "starting")
        await self._event(mid, "Pulling container image")
        began = time.monotonic()
        assert self._cache is not None
        source = RegistrySource(self.server, self.token, self.session)
        try:
            # Also proves the app's repository may read every blob: a failure names the blob.
            image = await prepare_image(
                source,
                self._cache,
                m["image"]["repository"],
                m["image"]["digest"],
                limits=self.limits,
            )
            config = ImageConfig.from_json(image.config)
        except Exception as e:
            log.warning("machine %s: cannot prepare the image: %s", mid, e)
            await self._event(mid, f"Failed to prepare image: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        secs = time.monotonic() - began
        await self._event(mid, f"Successfully prepared image ({secs:.2f}s)", int(secs * 1000))
        if local.stop_requested:
            await self._state(mid, "stopped")
            return
        log_path = home / "log"
        rootfs, method = await asyncio.to_thread(fresh_rootfs, image.rootfs, home)
        log.debug("machine %s: rootfs by %s", mid, method)
        offset = log_path.stat().st_size if log_path.exists() else 0
        try:
            plain, secrets = await self._environment(local)
        except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
            await asyncio.to_thread(release_rootfs, home)
            await self._event(mid, f"Failed to get the machine's secrets: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        await self._event(mid, "Starting machine")
        env = {
            **plain,  # the release's [env]
            **secrets,
            "SKYREG_MACHINE_ID": mid,
            "SKYREG_APP": str(m["app"]),
            "SKYREG_REGION": self.region,
        }
        del secrets
        try:
            machine = await asyncio.to_thread(
                start_machine, rootfs, config, log_path=log_path, hostname=mid, env=env
            )
        except Exception as e:
            await asyncio.to_thread(release_rootfs, home)
            await self._event(mid, f"Failed to start machine: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        try:
            await self._monitor(local, machine, log_path, offset)
        finally:
            await asyncio.to_thread(release_rootfs, home)

    async def _environment(self, local: _Local) -> tuple[dict[str, str], dict[str, str]]:
        """The machine's release variables and secrets, asked for as it starts (never written
        anywhere: they go to bwrap through a memory file, `machines/runtime.py`)."""
        answer = await self._api(
            "POST", f"/agent/machines/{local.id}/secrets", {"generation": local.generation}
        )
        if not isinstance(answer, dict):
            raise ValueError("the server's answer holds no map of names to values")
        return _names_to_values(answer.get("release_env", {})), _names_to_values(answer.get("env"))

    async def _monitor(
        self, local: _Local, machine: RunningMachine, log_path: Path, offset: int
    ) -> None:
        mid = local.id
        started_at = time.monotonic()
        reported_started = False
        tail = LogTail(log_path, offset)
        while machine.running:
            if local.stop_requested:
                await asyncio.to_thread(machine.stop, STOP_GRACE)
                break
            if not reported_started and time.monotonic() - started_at >= EARLY_EXIT:
                await self._state(mid, "started")
                reported_started = True
            await self._ship(mid, tail)
            await asyncio.sleep(_MONITOR_INTERVAL)
        code = await asyncio.to_thread(machine.stop, STOP_GRACE)  # reaps; idempotent
        await self._ship(mid, tail, final=True)
        if local.stop_requested:
            await self._event(mid, f"Machine stopped (exit code {code})")
            await self._state(mid, "stopped", code)
            return
        early = time.monotonic() - started_at < EARLY_EXIT
        failed = code != 0 or early
        why = "exited early" if early and code == 0 else f"exited with code {code}"
        await self._event(mid, f"Machine {why}")
        await self._state(mid, "failed" if failed else "stopped", code)
        self._finished[mid] = local.generation

    async def _ship(self, mid: str, tail: LogTail, *, final: bool = False) -> None:
        lines = tail.read(final=final)
        for i in range(0, len(lines), MAX_LOG_BATCH):
            await self._report(
                f"/agent/machines/{mid}/logs", {"lines": lines[i : i + MAX_LOG_BATCH]}
            )


class LogTail:
    """New complete lines of a log file since `offset` (a partial last line waits)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.partial = b""

    def read(self, *, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(4 << 20)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        if (final or len(self.partial) > MAX_LOG_LINE) and self.partial:
            complete.append(self.partial)  # a machine that never ends its line is not buffered
            self.partial = b""
        # NUL is no text a database column keeps: shown as U+FFFD, like undecodable bytes.
        return [
            line[:MAX_LOG_LINE].decode("utf-8", errors="replace").replace("\x00", "\ufffd")
            for line in complete
        ]


def check_host() -> str | None:
    """Why machines cannot run on this host, or None."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if os.name != "posix":
        return "machines need Linux"
    return None


def _names_to_values(found: object) -> dict[str, str]:
    """A map of variable names to values from the server's answer; ValueError otherwise."""
    if not isinstance(found, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        raise ValueError("the server's answer holds no map of names to values")
    return dict(found)
