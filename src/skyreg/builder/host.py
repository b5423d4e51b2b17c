"""The builder host: registers with the server, claims its builds one at a time, builds each
with buildah and pushes the result to the app.

For a build it claimed, the builder fetches the context blob from the app's repository with
the build's own token (a `build` token of the app, revoked when the build ends), unpacks it
(`client/buildcontext.py`: bounded, nothing outside the context), opens the build secrets with
its private key (made at start, kept in memory) into 0600 files that `RUN --mount=type=secret`
reads, and runs `buildah bud` in the org's own storage directory (its build cache: never shared
between orgs). Log lines go to the server as they come (secret values replaced by
`[secret]`); an answer `stop` (cancelled, the client gone, past the deadline) stops buildah.
The image is pushed as `APP:<label>` (layers the registry has are skipped) and the result
reported. The build's working directory (context, secrets, credentials) is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from skyreg.builder.buildah import (
    BuildahSettings,
    BuildPaths,
    Redactor,
    StepClock,
    base_images,
    bud_command,
    dockerfile_problem,
    environment,
    failure_message,
    inspect_command,
    onbuild_triggers,
    pull_command,
    push_command,
    read_dockerfile,
    registry_host,
    storage_args,
    trigger_problem,
    write_credentials,
    write_policy,
)
from skyreg.client.aio import AsyncRegistryClient
from skyreg.client.api import call_api
from skyreg.client.buildcontext import ContextError, ContextLimits, unpack_context
from skyreg.client.sealing import SealError, new_private_key, public_key_b64, unseal
from skyreg.privatefs import private_dir
from skyreg.units import human_size

log = logging.getLogger("skyreg.builder")

POLL_INTERVAL = 0.5  # between claims that found nothing (each waits CLAIM_WAIT s for one)
CLAIM_WAIT = 10
LOG_FLUSH_INTERVAL = 0.5
MAX_LOG_BATCH_LINES = 500
MAX_LOG_BATCH_BYTES = 48 << 10  # the API takes bodies of 64 KiB
MAX_LINE = 16 << 10
STOP_GRACE = 5.0
TAIL_LINES = 40
DISK_CHECK_INTERVAL = 1.0  # seconds between free-space checks while buildah runs


class BuildFailed(Exception):
    """A build that ends `failed` (the message is what its client sees)."""


class BuildStopped(Exception):
    """The server said stop (cancelled, client gone, past the deadline)."""


@dataclass
class BuilderHost:
    server: str
    token: str
    region: str
    data_dir: Path
    name: str = ""
    settings: BuildahSettings = field(default_factory=BuildahSettings)
    poll_interval: float = POLL_INTERVAL
    max_build_seconds: float = 7200.0
    context_limits: ContextLimits = field(default_factory=ContextLimits)
    # Below this many free bytes on the data dir's disk a build is stopped; after a build the
    # least recently used orgs' caches are emptied until twice as much is free.
    min_free_bytes: int = 2 << 30
    builder_id: str | None = None
    _key: Any = None
    _session: aiohttp.ClientSession | None = None

    # -- HTTP -----------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await call_api(self.session, self.server, self.token, method, path, body)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then claim and build until `stop` is set (a build under way is stopped)."""
        private_dir(self.data_dir)
        private_dir(self.data_dir / "work")
        private_dir(self.data_dir / "orgs")
        await asyncio.to_thread(self._clear_work)
        self._key = new_private_key()
        timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                await self._register(stop)
                while not stop.is_set():
                    claimed = None
                    try:
                        claimed = await self._until_stop(
                            self._api(
                                "POST", f"/builders/{self.builder_id}/claim?wait={CLAIM_WAIT}"
                            ),
                            stop,
                        )
                    except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                        log.warning("polling %s failed: %s", self.server, e)
                        if "HTTP 404" in str(e):  # the server forgot us (a new database)
                            await self._register(stop)
                    if claimed and claimed.get("build"):
                        await self._build_until(claimed, stop)
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll_interval)
            finally:
                self._session = None

    @staticmethod
    async def _until_stop(work: Awaitable[Any], stop: asyncio.Event) -> Any:
        """`work`'s result, or None once `stop` is set first (`work` is cancelled: a claim
        waiting for a build does not hold up shutting down)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    async def _register(self, stop: asyncio.Event) -> None:
        body = {
            "region": self.region,
            "name": (self.name or socket.gethostname())[:100],
            "public_key": public_key_b64(self._key),
        }
        while not stop.is_set():
            try:
                answer = await self._api("POST", "/builders", body)
                self.builder_id = str(answer["id"])
                log.info("builder %s registered in region %s", self.builder_id, self.region)
                return
            except (aiohttp.ClientError, RuntimeError, TimeoutError, KeyError) as e:
                log.warning("registering with %s failed: %s", self.server, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    def _clear_work(self) -> None:
        """Working directories a killed builder left (they may hold secrets)."""
        for entry in (self.data_dir / "work").iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    async def _build_until(self, claimed: dict[str, Any], stop: asyncio.Event) -> None:
        build = claimed["build"]
        task = asyncio.create_task(self.build(claimed), name=f"build-{build['id']}")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            stopping.cancel()

    # -- one build ------------------------------------------------------------------------------

    async def build(self, claimed: dict[str, Any]) -> None:
        """Build, push and report one claimed build (every failure is reported, never raised)."""
        build = claimed["build"]
        build_id = str(build["id"])
        paths = BuildPaths(self.data_dir / "work" / build_id)
        clock = StepClock()
        status, digest, error = "failed", None, None
        try:
            await asyncio.to_thread(paths.prepare)
            secrets, context_line = await self._prepare(build, claimed, paths)
            redact = Redactor(secrets)
            storage = await asyncio.to_thread(self._org_storage, str(build["org"]))
            digest = await self._run(build, paths, storage, clock, redact, context_line)
            status = "succeeded"
        except BuildStopped as e:
            status, error = "cancelled", str(e)
        except BuildFailed as e:
            error = str(e)
        except asyncio.CancelledError:
            status, error = "failed", "the builder shut down during the build; run it again"
            await self._report(build_id, status, None, clock.finish(), error)
            await asyncio.to_thread(shutil.rmtree, paths.work, True)
            raise
        except Exception as e:  # a bug or the unexpected: report it, keep serving
            log.exception("build %s failed", build_id)
            error = f"the builder failed: {e}"[:2000]
        # Reported first: the client waits for the report, not for the cleanup (a builder that
        # dies in between clears its work directory when it starts again).
        await self._report(build_id, status, digest, clock.finish(), error)
        await asyncio.to_thread(shutil.rmtree, paths.work, True)
        await self._make_room()

    def _org_storage(self, org: str) -> Path:
        """The org's build storage, absolute (the signature policy names it), its time set to
        now (emptying caches for room goes least recently used first)."""
        storage = private_dir(self.data_dir / "orgs" / org).resolve()
        os.utime(storage)
        return storage

    def free_bytes(self) -> int:
        """Free bytes on the data dir's file system."""
        return shutil.disk_usage(self.data_dir).free

    async def _make_room(self) -> None:
        """Empty whole org caches, least recently used first, until twice `min_free_bytes` is
        free (a cache is rebuilt by the org's next build; nothing else is lost)."""
        if await asyncio.to_thread(self.free_bytes) >= 2 * self.min_free_bytes:
            return
        orgs = await asyncio.to_thread(
            lambda: sorted((self.data_dir / "orgs").iterdir(), key=lambda d: d.stat().st_mtime)
        )
        for storage in orgs:
            log.warning("disk nearly full: emptying the build cache of org %s", storage.name)
            proc = await asyncio.create_subprocess_exec(
                *storage_args(self.settings, storage),
                "rmi",
                "--all",
                "--force",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()
            await asyncio.to_thread(shutil.rmtree, storage, True)
            if await asyncio.to_thread(self.free_bytes) >= 2 * self.min_free_bytes:
                return

    async def _report(
        self,
        build_id: str,
        status: str,
        digest: str | None,
        steps: list[dict[str, object]],
        error: str | None,
    ) -> None:
        body: dict[str, Any] = {"status": status, "steps": steps[:1000]}
        if digest is not None:
            body["image_digest"] = digest
        if error is not None:
            body["error"] = error[:8000]
        for attempt in range(5):
            try:
                await self._api("POST", f"/builder/builds/{build_id}/result", body)
                log.info("build %s %s", build_id, status)
                return
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                if "HTTP 4" in str(e):
                    log.warning("result of build %s refused: %s", build_id, e)
                    return
                log.warning("reporting build %s failed (%s); retrying", build_id, e)
                await asyncio.sleep(min(10.0, 2.0**attempt))

    async def _prepare(
        self, build: dict[str, Any], claimed: dict[str, Any], paths: BuildPaths
    ) -> tuple[list[bytes], str]:
        """Fetch and unpack the context, open the secrets, write the credentials. Returns the
        secrets' values and a log line saying what fetching and unpacking the context took."""
        credential = str(claimed["credential"])
        started = time.monotonic()
        await self._fetch_context(build, credential, paths)
        fetched = time.monotonic()
        try:
            await asyncio.to_thread(
                unpack_context, paths.archive, paths.context, limits=self.context_limits
            )
        except ContextError as e:
            raise BuildFailed(f"the build context is refused: {e}") from None
        paths.archive.unlink()
        context_line = (
            f"[skyreg] build context: {human_size(int(build['context_size']))} fetched in "
            f"{fetched - started:.2f}s, unpacked in {time.monotonic() - fetched:.2f}s"
        )
        values: list[bytes] = []
        wanted = set(build["secrets"])
        for sid, sealed in sorted(claimed.get("sealed_secrets", {}).items()):
            if sid not in wanted:
                continue
            try:
                value = unseal(self._key, sealed)
            except SealError as e:
                raise BuildFailed(str(e)) from None
            fd = os.open(paths.secrets / sid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            values.append(value)
        missing = wanted - set(claimed.get("sealed_secrets", {}))
        if missing:
            raise BuildFailed(f"build secrets missing: {', '.join(sorted(missing))}")
        await asyncio.to_thread(write_credentials, paths, self.server, credential)
        return values, context_line

    async def _fetch_context(
        self, build: dict[str, Any], credential: str, paths: BuildPaths
    ) -> None:
        digest = str(build["context_digest"])
        limit = min(int(build["context_size"]), self.context_limits.max_bytes * 2)
        client = AsyncRegistryClient(self.server, self.session, password=credential)
        hasher = hashlib.sha256()
        size = 0
        async with client.blob(build["app"], digest, max_bytes=limit) as stream:
            if stream.status != 200:
                raise BuildFailed(
                    f"fetching the build context {digest} failed: HTTP {stream.status}"
                )
            fd = os.open(paths.archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                async for chunk in stream.chunks():
                    hasher.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
        if "sha256:" + hasher.hexdigest() != digest or size != int(build["context_size"]):
            raise BuildFailed(f"the build context does not match {digest}")

    async def _run(
        self,
        build: dict[str, Any],
        paths: BuildPaths,
        storage: Path,
        clock: StepClock,
        redact: Redactor,
        context_line: str,
    ) -> str:
        dockerfile = (paths.context / build["dockerfile"]).resolve()
        context = paths.context.resolve()
        if not dockerfile.is_relative_to(context) or not dockerfile.is_file():
            raise BuildFailed(f"no Dockerfile at {build['dockerfile']} in the build context")
        build_args = dict(build.get("build_args") or {})
        try:
            text = await asyncio.to_thread(read_dockerfile, dockerfile)
            problem = dockerfile_problem(text)
        except (OSError, ValueError) as e:
            text, problem = "", str(e)
        bases, unresolved = base_images(text, build_args)
        problem = problem or unresolved
        if problem:
            raise BuildFailed(f"the Dockerfile is refused: {problem}")
        await asyncio.to_thread(write_policy, paths, self.settings, storage)
        app = str(build["app"])
        tag = f"localhost/skyreg/{app}:latest"
        shipper = LogShipper(self, str(build["id"]), redact)
        await shipper.add(context_line)
        env = environment(paths)
        deadline = time.monotonic() + self.max_build_seconds
        for image, stage_platform in bases:
            await self._pull_base(
                image,
                stage_platform or build.get("platform"),
                paths,
                storage,
                env,
                shipper,
                deadline,
            )
        code, tail = await self._command(
            bud_command(
                self.settings,
                storage,
                paths,
                dockerfile=dockerfile,
                tag=tag,
                target=build.get("target"),
                platform=build.get("platform"),
                build_args=build_args,
                secret_ids=list(build.get("secrets") or []),
                no_cache=bool(build.get("no_cache")),
            ),
            env,
            shipper,
            clock,
            deadline,
        )
        if code != 0:
            await shipper.flush(final=True)
            raise BuildFailed(failure_message(tail, code))
        destination = f"{registry_host(self.server)}/{app}:{build['image_label']}"
        await shipper.add(f"[skyreg] pushing {destination}")
        code, tail = await self._command(
            push_command(self.settings, storage, paths, tag, destination),
            env,
            shipper,
            None,
            deadline,
        )
        await shipper.flush(final=True)
        if code != 0:
            raise BuildFailed("pushing the image failed:\n" + "\n".join(tail[-20:]))
        digest = (await asyncio.to_thread(paths.digestfile.read_text)).strip()
        await shipper.add(f"[skyreg] pushed {destination}@{digest}")
        await shipper.flush(final=True)
        return digest

    async def _pull_base(
        self,
        image: str,
        platform: str | None,
        paths: BuildPaths,
        storage: Path,
        env: dict[str, str],
        shipper: LogShipper,
        deadline: float,
    ) -> None:
        """Pull a base image (registries only) and refuse it when its ONBUILD triggers would do
        what a Dockerfile may not; the build then uses it without pulling again."""
        await shipper.add(f"[skyreg] pulling {image}")
        code, tail = await self._command(
            pull_command(self.settings, storage, paths, image, platform),
            env,
            shipper,
            None,
            deadline,
        )
        if code != 0:
            raise BuildFailed(f"pulling the base image {image} failed:\n" + "\n".join(tail[-10:]))
        proc = await asyncio.create_subprocess_exec(
            *inspect_command(self.settings, storage, image),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        problem = trigger_problem(onbuild_triggers(out) if proc.returncode == 0 else "?")
        if problem:
            raise BuildFailed(f"the base image {image} is refused: {problem}")

    async def _command(
        self,
        cmd: list[str],
        env: dict[str, str],
        shipper: LogShipper,
        clock: StepClock | None,
        deadline: float,
    ) -> tuple[int, list[str]]:
        """Run buildah, shipping its output; stopped when the server says so or at the deadline."""
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        checked = 0.0
        try:
            while True:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise BuildFailed("the build took longer than this builder allows")
                if now - checked >= DISK_CHECK_INTERVAL:  # a RUN step writing without end
                    checked = now
                    free = await asyncio.to_thread(self.free_bytes)
                    if free < self.min_free_bytes:
                        raise BuildFailed(
                            f"the builder's disk is nearly full ({human_size(free)} free, at "
                            f"least {human_size(self.min_free_bytes)} kept): the build was stopped"
                        )
                try:
                    raw = await asyncio.wait_for(
                        proc.stdout.readline(), min(remaining, LOG_FLUSH_INTERVAL)
                    )
                except TimeoutError:
                    await shipper.flush()
                    continue
                except ValueError:  # a line longer than the stream's limit
                    raw = await proc.stdout.read(MAX_LINE)
                if not raw:
                    break
                line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\n")
                if clock is not None:
                    clock.line(line)
                tail = ([*tail, shipper.redact(line)])[-TAIL_LINES:]
                await shipper.add(line)
            return await proc.wait(), tail
        finally:
            if proc.returncode is None:
                await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM buildah's process group, SIGKILL after STOP_GRACE."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class LogShipper:
    """Batches a build's log lines to the server; raises BuildStopped when it answers stop."""

    def __init__(self, host: BuilderHost, build_id: str, redact: Redactor) -> None:
        self.host = host
        self.build_id = build_id
        self.redact = redact
        self.lines: list[str] = []
        self.size = 0
        self.last = time.monotonic()

    async def add(self, line: str) -> None:
        line = self.redact(line).replace("\x00", "\ufffd")  # no database column keeps NUL
        self.lines.append(line)
        self.size += len(json.dumps(line))  # as it goes out (escapes can make it longer)
        if (
            len(self.lines) >= MAX_LOG_BATCH_LINES
            or self.size >= MAX_LOG_BATCH_BYTES
            or time.monotonic() - self.last >= LOG_FLUSH_INTERVAL
        ):
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        """Send what is batched (also with nothing batched: the answer says whether to stop)."""
        lines, self.lines, self.size = self.lines, [], 0
        self.last = time.monotonic()
        try:
            answer = await self.host._api(
                "POST", f"/builder/builds/{self.build_id}/logs", {"lines": lines}
            )
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
            log.warning("sending the log of build %s failed: %s", self.build_id, e)
            return
        if answer.get("stop") and not final:
            raise BuildStopped("the build was cancelled (or its client went away)")


def check_host(settings: BuildahSettings) -> str | None:
    """Why builds cannot run on this host, or None."""
    for binary in (settings.buildah, settings.runtime):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian: apt-get install buildah {settings.runtime})"
    if os.geteuid() != 0:
        return "the builder runs buildah as root (its RUN steps in their own namespaces)"
    return None
