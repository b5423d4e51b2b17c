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

Lazy start (`lazy`, on by default; root agents with FUSE only): a machine whose image is not
unpacked here yet starts over a FUSE mount of the image's layer indexes (`machines/lazystart.py`)
while the whole image is pulled and unpacked in the background; later starts use the unpacked
tree. An image that cannot be mounted (no index, a layer without one, a bad index) is pulled
whole as before, the reason in the agent's log; its machine's events are today's.

With a `network` (`skyreg agent --network`), every machine gets its own network namespace
(`machines/network.py`): attached before it starts (its address goes with the `starting`
report), bwrap started inside it, detached once the machine has stopped, whatever the path.
Without one, machines share the host's network and the address reported is 127.0.0.1.

A machine whose release has a service with checks is health-checked at that address while it
runs (`machines/health.py`); transitions go to `POST /agent/machines/{id}/health`. Stopping a
machine that has a service first drains it: an event, then `drain` seconds of running on (the
proxy sends it no new requests meanwhile), then SIGTERM. Shutting the agent down drains every
machine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from skyreg.client.api import ApiCallError, call_api
from skyreg.machines.health import HealthChecker, checks_from_service
from skyreg.machines.layercache import LayerCache
from skyreg.machines.lazystart import (
    LazyMounts,
    LazyUnavailable,
    clean_stale,
    host_problem,
    mount_key,
)
from skyreg.machines.network import HostNetwork, NetworkError, enter_command
from skyreg.machines.prepare import (
    PreparedImage,
    RegistrySource,
    ResolvedImage,
    fetch_config,
    pull_image,
    resolve_image,
)
from skyreg.machines.rootfs import fresh_rootfs, release_rootfs, share_data_dir
from skyreg.machines.runtime import (
    EnterCommand,
    ImageConfig,
    RunningMachine,
    UserIds,
    start_machine,
)
from skyreg.machines.unpack import UnpackLimits
from skyreg.privatefs import private_dir

log = logging.getLogger("skyreg.agent")

POLL_INTERVAL = 0.5
EARLY_EXIT = 2.0  # seconds: exiting sooner than this after starting is a failure
STOP_GRACE = 5.0
DRAIN = 2.0  # seconds a machine with a service runs on once its stop is requested
LOCAL_ADDRESS = "127.0.0.1"  # a machine's address on the host's own network
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
    network: HostNetwork | None = None  # None: machines share the host's network
    drain: float = DRAIN
    lazy: bool = True  # start machines from a lazy mount while their image arrives (issue 18)
    _local: dict[str, _Local] = field(default_factory=dict)
    # machine id → the generation that ran and exited on its own (not started again)
    _finished: dict[str, int] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None
    _cache: LayerCache | None = None
    _lazy: LazyMounts | None = None

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

    async def _health(self, mid: str, status: str, message: str | None) -> None:
        """Report a health transition. Raises for a failure worth retrying (the checker retries);
        a refusal (4xx: the machine is no longer starting or started) is only logged."""
        body: dict[str, Any] = {"status": status}
        if message:
            # The server refuses NUL in any string; the message quotes what a machine answered.
            body["message"] = message.replace("\x00", "\ufffd")
        try:
            await self._api("POST", f"/agent/machines/{mid}/health", body)
        except ApiCallError as e:
            if not e.refused:
                raise
            log.warning("health report of %s refused: %s", mid, e)

    async def _event(self, mid: str, message: str, duration_ms: int | None = None) -> None:
        body: dict[str, Any] = {"message": message}
        if duration_ms is not None:
            body["duration_ms"] = duration_ms
        await self._report(f"/agent/machines/{mid}/events", body)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and reconcile until `stop` is set; then stop every machine.

        With a network, it is set up first: a `NetworkError` (the agent cannot run) is raised.
        """
        if self.network is not None:
            await asyncio.to_thread(self.network.ensure)
        else:
            log.warning(
                "machines share this host's network (no --network): they reach its services, "
                "and the proxy reaches their ports at 127.0.0.1; not for tenants you do not trust"
            )
        # Root's alone on the host; machines/ (and machines/<id>) are 0711 for the machines'
        # users, who reach them only through share_data_dir's view (see rootfs.py). An older
        # data dir is tightened here; its top levels suffice to make everything below private.
        private_dir(self.data_dir)
        private_dir(self.data_dir / "cache")
        private_dir(self.data_dir / "machines", mode=0o711)
        private_dir(self.data_dir / "lazy")
        await asyncio.to_thread(clean_stale, self.data_dir / "lazy")
        if await asyncio.to_thread(share_data_dir, self.data_dir, ("cache", "machines", "lazy")):
            log.info("machine users reach their rootfs through this agent's mount namespace")
        self._cache = LayerCache(self.data_dir / "cache")
        problem = host_problem() if self.lazy else "off (--no-lazy)"
        if problem is None:
            self._lazy = LazyMounts(self.data_dir / "lazy", self._cache, self.limits)
        else:
            log.info("lazy start: %s; images are pulled whole before machines start", problem)
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
                if self._lazy is not None:  # after the machines over them stopped
                    await self._lazy.close()
                self._session = None
                if self.network is not None:
                    # Every machine stopped: the bridges, chains and rules go too (a restart
                    # makes them again), so a stopped agent leaves the host as it found it.
                    await asyncio.to_thread(self.network.teardown)

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
        if tasks:  # in parallel: each machine drains, then stops, in its own task
            await asyncio.wait(tasks, timeout=self.drain + STOP_GRACE + 20)
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
        source = RegistrySource(self.server, self.token, self.session)
        lazy: str | None = None  # the lazy mount this machine's rootfs lies over (its key)
        try:
            # Also proves the app's repository may read every blob: a failure names the blob.
            resolved = await resolve_image(source, m["image"]["repository"], m["image"]["digest"])
            image, rootfs, lazy = await self._prepare(mid, source, resolved, home)
            config = ImageConfig.from_json(image.config)
        except Exception as e:
            log.warning("machine %s: cannot prepare the image: %s", mid, e)
            await asyncio.to_thread(release_rootfs, home)
            if lazy is not None:
                assert self._lazy is not None
                await self._lazy.release(lazy)
            await self._event(mid, f"Failed to prepare image: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        try:
            secs = time.monotonic() - began
            if lazy is None:
                message = f"Successfully prepared image ({secs:.2f}s)"
            else:
                message = f"Prepared a lazy mount of the image ({secs:.2f}s); pulling it whole"
            await self._event(mid, message, int(secs * 1000))
            await self._run_prepared(local, m, config, rootfs, lazy=lazy is not None)
        finally:
            if lazy is not None:  # the overlay goes before the mount under it
                assert self._lazy is not None
                await asyncio.to_thread(release_rootfs, home)
                await self._lazy.release(lazy)

    async def _prepare(
        self, mid: str, source: RegistrySource, resolved: ResolvedImage, home: Path
    ) -> tuple[PreparedImage, Path, str | None]:
        """The image and a fresh rootfs over it: over its lazy mount when it can (and that
        mount's key, to release once the machine is done), else over its unpacked tree."""
        assert self._cache is not None
        image = await self._lazy_image(mid, source, resolved)
        if image is not None:
            try:
                rootfs, _ = await asyncio.to_thread(
                    fresh_rootfs, image.rootfs, home, allow_copy=False
                )
                return image, rootfs, mount_key(resolved)
            except OSError as e:
                assert self._lazy is not None
                await self._lazy.release(mount_key(resolved))
                self._no_lazy(mid, f"no overlay over its lazy mount: {e}")
        image = await pull_image(source, self._cache, resolved, limits=self.limits)
        rootfs, method = await asyncio.to_thread(fresh_rootfs, image.rootfs, home)
        log.debug("machine %s: rootfs by %s", mid, method)
        return image, rootfs, None

    async def _lazy_image(
        self, mid: str, source: RegistrySource, resolved: ResolvedImage
    ) -> PreparedImage | None:
        """The image as its lazy mount, when it is not unpacked here yet and can be mounted
        (its whole pull then runs in the background); None: pull it whole (the reason logged)."""
        assert self._cache is not None
        if self._lazy is None or self._cache.rootfs_path(resolved.manifest_digest).is_dir():
            return None
        cache = self._cache
        # The config comes while the indexes do: each is a round trip to a far region.
        config = asyncio.ensure_future(fetch_config(source, cache, resolved))
        try:
            mountpoint = await self._lazy.acquire(
                source,
                resolved,
                functools.partial(pull_image, source, cache, resolved, limits=self.limits),
            )
        except LazyUnavailable as e:
            await config  # the whole pull needs it too (and its error is the machine's)
            self._no_lazy(mid, str(e))
            return None
        except BaseException:
            config.cancel()
            with contextlib.suppress(BaseException):
                await config
            raise
        try:
            return PreparedImage(resolved.manifest_digest, await config, mountpoint)
        except BaseException:
            await self._lazy.release(mount_key(resolved))
            raise

    def _no_lazy(self, mid: str, why: str) -> None:
        # Only logged: for the machine's owner this is today's start, events and all.
        log.info("machine %s: no lazy start (%s): pulling the whole image", mid, why)

    async def _run_prepared(
        self,
        local: _Local,
        m: dict[str, Any],
        config: ImageConfig,
        rootfs: Path,
        *,
        lazy: bool,
    ) -> None:
        """Start the machine on its prepared rootfs and watch it until it stopped."""
        mid = local.id
        home = self.data_dir / "machines" / mid
        if local.stop_requested:
            await asyncio.to_thread(release_rootfs, home)
            await self._state(mid, "stopped")
            return
        log_path = home / "log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        try:
            plain, secrets = await self._environment(local)
        except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
            await asyncio.to_thread(release_rootfs, home)
            await self._event(mid, f"Failed to get the machine's secrets: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        env = {
            **plain,  # the release's [env]
            **secrets,
            "SKYREG_MACHINE_ID": mid,
            "SKYREG_APP": str(m["app"]),
            "SKYREG_REGION": self.region,
        }
        del secrets
        try:
            await self._start(local, m, config, rootfs, LogTail(log_path, offset), env, lazy=lazy)
        finally:  # after the machine stopped (or never started), whatever the path
            if self.network is not None:
                await asyncio.to_thread(self._detach, mid)

    def _detach(self, mid: str) -> None:
        assert self.network is not None
        try:
            self.network.detach(mid)
        except (NetworkError, OSError, subprocess.SubprocessError) as e:
            log.warning("machine %s: cannot detach it from the network: %s", mid, e)

    async def _attach(self, mid: str, m: dict[str, Any]) -> tuple[str, EnterCommand | None]:
        """The machine's address and how bwrap enters its network (NetworkError if it cannot)."""
        if self.network is None:
            return LOCAL_ADDRESS, None
        org = m.get("org")
        if not isinstance(org, str):
            raise NetworkError("the server names no org for the machine")
        att = await asyncio.to_thread(self.network.attach, mid, org)

        def enter(user: UserIds | None) -> list[str]:
            return enter_command(att, user=user)

        return str(att.address), enter

    async def _start(
        self,
        local: _Local,
        m: dict[str, Any],
        config: ImageConfig,
        rootfs: Path,
        tail: LogTail,
        env: dict[str, str],
        *,
        lazy: bool = False,
    ) -> None:
        """Attach, start and watch the machine until it stopped."""
        mid = local.id
        home = self.data_dir / "machines" / mid
        try:
            address, enter = await self._attach(mid, m)
        except (NetworkError, OSError, subprocess.SubprocessError) as e:
            await asyncio.to_thread(release_rootfs, home)
            await self._event(mid, f"Failed to attach the machine to the network: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        await self._report(
            f"/agent/machines/{mid}/state", {"state": "starting", "address": address}
        )
        await self._event(mid, "Starting machine")
        try:
            machine = await asyncio.to_thread(
                start_machine,
                rootfs,
                config,
                log_path=tail.path,
                hostname=mid,
                env=env,
                enter=enter,
            )
        except Exception as e:
            await asyncio.to_thread(release_rootfs, home)
            await self._event(mid, f"Failed to start machine: {e}"[:1000])
            await self._state(mid, "failed")
            self._finished[mid] = local.generation
            return
        if lazy:
            log.info("machine %s: started from a lazy mount", mid)
            await self._event(mid, "Started from a lazy mount")
        try:
            await self._monitor(local, m, machine, address, tail)
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
        self,
        local: _Local,
        m: dict[str, Any],
        machine: RunningMachine,
        address: str,
        tail: LogTail,
    ) -> None:
        mid = local.id
        started_at = time.monotonic()
        checker = await self._checker(mid, m, address, started_at)
        try:
            await self._watch(local, m, machine, tail, started_at)
        finally:
            if checker is not None:
                await checker.stop()

    async def _checker(
        self, mid: str, m: dict[str, Any], address: str, started_at: float
    ) -> HealthChecker | None:
        """The machine's running health checks, if its service has any."""
        try:
            checks = checks_from_service(m.get("service"))
        except ValueError as e:
            await self._event(mid, f"Health checks not run: {e}"[:1000])
            return None
        if not checks:
            return None
        checker = HealthChecker(
            address, checks, functools.partial(self._health, mid), started_at=started_at
        )
        await checker.start()
        return checker

    async def _watch(
        self,
        local: _Local,
        m: dict[str, Any],
        machine: RunningMachine,
        tail: LogTail,
        started_at: float,
    ) -> None:
        mid = local.id
        reported_started = False
        drain_until: float | None = None
        while machine.running:
            if local.stop_requested:
                if drain_until is None and m.get("service") is not None and self.drain > 0:
                    await self._event(mid, f"Draining for {self.drain:g}s")
                    drain_until = time.monotonic() + self.drain
                if drain_until is None or time.monotonic() >= drain_until:
                    await asyncio.to_thread(machine.stop, STOP_GRACE)
                    break
            elif not reported_started and time.monotonic() - started_at >= EARLY_EXIT:
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
