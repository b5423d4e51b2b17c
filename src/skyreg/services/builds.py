"""Builds: `skyreg deploy` in a directory with a Dockerfile, built by a builder host.

The client pushes its build context (a tar.gz) to the app as a blob, asks which builder will
build (`choose_builder`: one of the org's own builders, else a shared one, in this server's
region first, least busy first), seals each build secret to that builder's public key and
creates the build. The builder claims it, gets a short-lived `build` token of the app (pull the
org's apps and public ones, push the app; nothing on the management API) and the sealed secrets
(which leave the database in the same transaction), streams its log, and reports the result.
Only the builder that holds a build may report on it; only the org's callers see it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from skyreg.auth.policy import PUSH, AccessPolicy
from skyreg.auth.service import Authenticator
from skyreg.meta.builds import Build, Builder, BuildMeta, NewBuild
from skyreg.meta.platform import App, PlatformMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.names import TAG_RE
from skyreg.services.access import required, sees_org, visible_app
from skyreg.services.errors import Conflict, Forbidden, Invalid, LimitExceeded, NotFound
from skyreg.services.inputs import (
    BuildLogLines,
    BuildResult,
    CreateBuild,
    RegisterBuilder,
)

# `X as X`: re-exported for the modules that import them from here; defined in services/names.py,
# where the CLI checks a skyreg.toml against them without loading SQLAlchemy.
from skyreg.services.names import ARG_RE as ARG_RE
from skyreg.services.names import MAX_BUILD_ARG_VALUE as MAX_BUILD_ARG_VALUE
from skyreg.services.names import MAX_BUILD_ARGS as MAX_BUILD_ARGS
from skyreg.services.names import REGION_RE, deployment_tag
from skyreg.services.names import TARGET_RE as TARGET_RE

log = logging.getLogger("skyreg.services")

MAX_CONTEXT = 2 << 30  # bytes of a build context blob
MAX_SECRETS = 16
MAX_SEALED_SECRET = 40 << 10  # base64 characters of one sealed secret (30 KiB of secret)
MAX_PATH = 1024
MAX_LOG_BATCH = 1000  # lines per builder report
MAX_LOG_LINE = 16 << 10  # characters of one log line kept
MAX_STEPS = 1000
MAX_ERROR = 8192
MAX_STEP_SECONDS = 86400.0  # a reported step duration is cut to this (builds time out sooner)
LOG_WAIT_MAX = 20.0  # seconds a log read may wait for new lines
LOG_POLL = 0.1
CLAIM_WAIT_MAX = 20.0  # seconds a builder's claim may wait for a build
CLAIM_POLL = 0.1
SECRET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PLATFORM_RE = re.compile(r"^[a-z0-9]{1,16}/[a-z0-9]{1,16}(/[a-z0-9]{1,8})?\Z")
BUILDER_NAME_MAX = 100
MAX_LIVE_BUILDERS = 50  # live builders an org's tokens may have registered
MAX_ACTIVE_BUILDS = 100  # an org's builds queued or running at once
PUBLIC_KEY_BYTES = 32


def _printable(value: str) -> bool:
    return value.isprintable() and "\x00" not in value


def _step_seconds(value: float) -> float:
    """A step's duration as a builder reported it, made a finite number in [0, MAX_STEP_SECONDS]
    (JSON has no NaN or infinity: 1e999 decodes as inf and would be answered as null)."""
    seconds = float(value)
    if not math.isfinite(seconds):
        return 0.0
    return min(max(0.0, seconds), MAX_STEP_SECONDS)


def _clean_line(line: str) -> str:
    return line[:MAX_LOG_LINE].replace("\x00", "\ufffd").encode("utf-8", "replace").decode()


@dataclass(frozen=True)
class BuildView:
    """A build with the names its ids stand for."""

    build: Build
    app: str
    org: str


@dataclass(frozen=True)
class Claimed:
    """What a builder gets for a build it claimed."""

    view: BuildView
    credential: str  # the build token's secret
    sealed_secrets: dict[str, str]


@dataclass(frozen=True)
class LogRead:
    lines: list[tuple[int, str]]
    build: BuildView


@dataclass
class BuildService:
    """Builds over `BuildMeta`, the platform tables, the registry's links and the tokens."""

    builds: BuildMeta
    platform: PlatformMeta
    registry: RegistryMeta
    policy: AccessPolicy
    auth: Authenticator
    region: str = "local"  # this server's region: builders here go first

    # -- builders -------------------------------------------------------------------------------

    async def register_builder(self, caller: TokenRecord, body: RegisterBuilder) -> Builder:
        """A builder host announces itself: an admin token's serves every org, an org token's
        only its org."""
        if caller.kind not in ("admin", "org"):
            raise Forbidden(f"a {caller.kind} token may not run a builder")
        if not REGION_RE.match(body.region):
            raise Invalid("region must be a region code such as iad, sin, syd")
        if len(body.name) > BUILDER_NAME_MAX or not (body.name == "" or _printable(body.name)):
            raise Invalid(f"name must be printable text of at most {BUILDER_NAME_MAX} characters")
        try:
            key = base64.b64decode(body.public_key, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise Invalid("public_key must be base64 of a 32-byte X25519 public key")
        if caller.kind == "org" and caller.org_id is not None:
            live = await self.builds.read(self.builds.live_builders_of, caller.org_id)
            if live >= MAX_LIVE_BUILDERS:
                raise LimitExceeded(
                    f"this organization runs {live} builders already (the limit)",
                    MAX_LIVE_BUILDERS,
                )
        return await self.builds.run(
            self.builds.register_builder,
            "bld" + secrets.token_hex(8),
            name=body.name or body.region,
            region=body.region,
            org_id=None if caller.kind == "admin" else caller.org_id,
            public_key=base64.b64encode(key).decode(),
            token_id=caller.id,
        )

    async def choose_builder(self, caller: TokenRecord, app_name: str) -> Builder:
        """The builder a new build of the app would go to (its key seals the build's secrets)."""
        app = await self.platform.read(self._pushable_app, caller, app_name)
        return await self.builds.read(self._choose, app.org_id)

    def _choose(self, org_id: int) -> Builder:
        found = self.builds.builders_for(org_id)
        if not found:
            raise Conflict("no builder is running for this organization; start `skyreg builder`")
        busy = self.builds.queued_per_builder([b.id for b in found])
        return min(
            found,
            key=lambda b: (b.org_id is None, b.region != self.region, busy.get(b.id, 0)),
        )

    def _pushable_app(self, caller: TokenRecord | None, app_name: str) -> App:
        token = required(caller)
        app = visible_app(self.platform, token, app_name)
        if PUSH not in self.policy.allowed(token, app.name):
            raise Forbidden(f"this token may not push to {app.name}")
        return app

    # -- builds ---------------------------------------------------------------------------------

    async def create_build(
        self, caller: TokenRecord | None, app_name: str, body: Callable[[], CreateBuild]
    ) -> BuildView:
        """Queue a build of the app (the caller must be able to push to it)."""
        return await self.builds.run(self._create, caller, app_name, body)

    def _create(
        self, caller: TokenRecord | None, app_name: str, body: Callable[[], CreateBuild]
    ) -> BuildView:
        app = self._pushable_app(caller, app_name)
        token = required(caller)
        request = body()
        digest = self._context_digest(request.context_digest)
        size = self.registry.blob_size(app.name, digest)
        if size is None:
            raise Invalid(f"the build context {digest} is not in {app.name}: push it first")
        if size > MAX_CONTEXT:
            raise Invalid(f"the build context is larger than {MAX_CONTEXT >> 30} GiB")
        self._check_request(request)
        active = self.builds.active_builds_of(app.org_id)
        if active >= MAX_ACTIVE_BUILDS:
            raise LimitExceeded(
                f"this organization has {active} builds queued or running (the limit); "
                "wait for some to end or cancel them",
                MAX_ACTIVE_BUILDS,
            )
        sealed = request.secrets or None
        if request.builder_id is not None:
            builder = self.builds.get_builder(request.builder_id)
            if (
                builder is None
                or not builder.live(datetime.now(UTC))
                or not (builder.org_id is None or builder.org_id == app.org_id)
            ):
                raise Conflict("that builder is not available; ask for one again")
        elif sealed:
            raise Invalid("secrets are sealed to a builder: builder_id is required")
        else:
            builder = self._choose(app.org_id)
        build = self.builds.create_build(
            NewBuild(
                id="bu" + secrets.token_hex(8),
                org_id=app.org_id,
                app_id=app.id,
                created_by=token.id,
                builder_id=builder.id,
                region=builder.region,
                context_digest=digest,
                context_size=size,
                dockerfile=request.dockerfile,
                target=request.target,
                platform=request.platform,
                build_args=request.build_args,
                secret_ids=sorted(request.secrets),
                sealed_secrets=sealed,
                no_cache=request.no_cache,
                image_label=request.image_label or deployment_tag(),
                timeout=float(request.timeout),
            )
        )
        log.info("build %s of %s queued for builder %s", build.id, app.name, builder.id)
        return BuildView(build, app.name, app.org_name)

    @staticmethod
    def _context_digest(value: str) -> str:
        try:
            digest = Digest.parse(value)
        except RegistryError:
            raise Invalid("context_digest must be a digest such as sha256:<64 hex>") from None
        return str(digest)

    @staticmethod
    def _check_request(request: CreateBuild) -> None:
        path = request.dockerfile
        parts = path.split("/")
        if (
            not path
            or len(path) > MAX_PATH
            or not _printable(path)
            or path.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise Invalid("dockerfile must be a relative path inside the context, without ..")
        if request.target is not None and not TARGET_RE.match(request.target):
            raise Invalid("target must be a stage name")
        if request.platform is not None and not PLATFORM_RE.match(request.platform):
            raise Invalid("platform must be OS/ARCH[/VARIANT], such as linux/arm64")
        if len(request.build_args) > MAX_BUILD_ARGS:
            raise Invalid(f"at most {MAX_BUILD_ARGS} build arguments")
        for key, value in request.build_args.items():
            if not ARG_RE.match(key):
                raise Invalid(f"build argument names are [A-Za-z_][A-Za-z0-9_]*: {key[:40]!r}")
            if len(value) > MAX_BUILD_ARG_VALUE or "\x00" in value:
                raise Invalid(f"build argument {key}: at most {MAX_BUILD_ARG_VALUE} characters")
        if len(request.secrets) > MAX_SECRETS:
            raise Invalid(f"at most {MAX_SECRETS} build secrets")
        for key, value in request.secrets.items():
            if not SECRET_ID_RE.match(key):
                raise Invalid(f"secret ids are letters, digits, . _ -: {key[:40]!r}")
            if len(value) > MAX_SEALED_SECRET:
                raise Invalid(f"build secret {key} is larger than 30 KiB")
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise Invalid(f"build secret {key} must be base64 of a sealed box") from None
        if request.image_label is not None and not TAG_RE.match(request.image_label):
            raise Invalid("image_label must be a valid tag")
        if not 10 <= request.timeout <= 7200:
            raise Invalid("timeout is 10 to 7200 seconds")

    async def get_build(self, caller: TokenRecord | None, build_id: str) -> BuildView:
        return await self.builds.read(self._visible, caller, build_id)

    def _visible(self, caller: TokenRecord | None, build_id: str) -> BuildView:
        token = required(caller)
        build = self.builds.get_build(build_id) if len(build_id) <= 64 else None
        if build is None or not sees_org(token, build.org_id):
            raise NotFound("build", build_id)
        return self._view(build)

    def _view(self, build: Build) -> BuildView:
        app = self.platform.get_app_by_id(build.app_id)
        return BuildView(build, app.name if app else "", app.org_name if app else "")

    async def list_builds(
        self, caller: TokenRecord | None, app_name: str, limit: int
    ) -> list[BuildView]:
        def work() -> list[BuildView]:
            app = visible_app(self.platform, required(caller), app_name)
            return [
                BuildView(b, app.name, app.org_name) for b in self.builds.list_builds(app.id, limit)
            ]

        return await self.builds.read(work)

    async def read_logs(
        self, caller: TokenRecord | None, build_id: str, after: int, limit: int, wait: float
    ) -> LogRead:
        """Lines after `after`; with `wait`, waits (bounded) for a line or the build's end. A
        reader of an unfinished build counts as its client following it."""
        wait = min(max(wait, 0.0), LOG_WAIT_MAX)
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        seen = False
        while True:
            view = await self.builds.read(self._visible, caller, build_id)
            lines = await self.builds.read(self.builds.logs, build_id, after, limit)
            if not view.build.ended and not seen:
                # Once a read (LOG_WAIT_MAX < CLIENT_GONE): a write transaction every poll of
                # every follower would queue on the database's write lock.
                await self.builds.run(self.builds.client_seen, build_id)
                seen = True
            if lines or view.build.ended or loop.time() >= until:
                if view.build.ended and not lines:
                    return LogRead([], view)
                return LogRead(lines, view)
            await asyncio.sleep(min(LOG_POLL, max(0.0, until - loop.time())))

    async def cancel(self, caller: TokenRecord | None, build_id: str) -> BuildView:
        def work() -> BuildView:
            view = self._visible(caller, build_id)
            token = required(caller)
            if token.kind == "readonly":
                raise Forbidden("a readonly token may not cancel builds")
            if PUSH not in self.policy.allowed(token, view.app):
                # A deploy token of another app of the org sees the build, but may not stop it.
                raise Forbidden(f"this token may not push to {view.app}, nor cancel its builds")
            if view.build.ended:
                return view
            return self._view(self.builds.request_cancel(build_id))

        return await self.builds.run(work)

    # -- the builder's side ---------------------------------------------------------------------

    async def claim(
        self, caller: TokenRecord, builder_id: str, wait: float = 0.0
    ) -> Claimed | None:
        """The builder's poll: its next build (running now), with a fresh build token. With
        `wait` (at most CLAIM_WAIT_MAX s) the answer waits for a build to be queued, checked
        every CLAIM_POLL s with a read, so a build starts without a builder's polling delay."""
        if caller.kind not in ("admin", "org"):
            raise Forbidden(f"a {caller.kind} token may not run a builder")
        builder_id = builder_id[:64]
        loop = asyncio.get_running_loop()
        until = loop.time() + min(max(wait, 0.0), CLAIM_WAIT_MAX)
        build, known = await self.builds.run(self.builds.claim, builder_id, caller.id)
        if not known:
            raise NotFound("builder", builder_id)
        while build is None and loop.time() < until:
            await asyncio.sleep(min(CLAIM_POLL, max(0.0, until - loop.time())))
            if await self.builds.read(self.builds.has_queued, builder_id):
                build, known = await self.builds.run(self.builds.claim, builder_id, caller.id)
        if build is None:
            return None

        def mint() -> Claimed:
            assert build is not None
            ttl = max(60.0, (build.deadline - datetime.now(UTC)).total_seconds() + 120)
            credential, record = self.auth.create_token(
                "build",
                name=f"build {build.id}",
                org_id=build.org_id,
                app_id=build.app_id,
                expires_in=timedelta(seconds=ttl),
            )
            self.builds.set_credential(build.id, record.id)
            return Claimed(self._view(build), credential, build.sealed_secrets or {})

        return await self.builds.run(mint)

    def _held(self, caller: TokenRecord, build_id: str) -> Build:
        """A build of a builder this token registered (else NotFound, like a missing one)."""
        build = self.builds.get_build(build_id) if len(build_id) <= 64 else None
        builder = None if build is None else self.builds.get_builder(build.builder_id)
        if build is None or builder is None or builder.token_id != caller.id:
            raise NotFound("build", build_id)
        return build

    async def builder_logs(self, caller: TokenRecord, build_id: str, body: BuildLogLines) -> bool:
        """A builder appends log lines; True: it should stop the build."""
        if len(body.lines) > MAX_LOG_BATCH:
            raise Invalid(f"at most {MAX_LOG_BATCH} lines per report")
        lines = [_clean_line(line) for line in body.lines]

        def work() -> bool:
            self._held(caller, build_id)
            return self.builds.append_logs(build_id, lines)

        return await self.builds.run(work)

    async def builder_result(
        self, caller: TokenRecord, build_id: str, body: BuildResult
    ) -> BuildView:
        """A builder reports how a build ended; the build's token is revoked."""
        if body.status not in ("succeeded", "failed", "cancelled"):
            raise Invalid("status must be succeeded, failed or cancelled")
        if len(body.steps) > MAX_STEPS:
            raise Invalid(f"at most {MAX_STEPS} steps")
        digest = None
        if body.image_digest is not None:
            try:
                digest = str(Digest.parse(body.image_digest))
            except RegistryError:
                raise Invalid("image_digest must be a digest") from None
        if body.status == "succeeded" and digest is None:
            raise Invalid("a succeeded build has an image_digest")
        steps = [
            {
                "step": s.step,
                "instruction": _clean_line(s.instruction)[:1000],
                "seconds": _step_seconds(s.seconds),
                "cached": s.cached,
            }
            for s in body.steps
        ]
        error = None if body.error is None else _clean_line(body.error)[:MAX_ERROR]

        def work() -> BuildView:
            build = self._held(caller, build_id)
            done = self.builds.finish(
                build_id, body.status, image_digest=digest, steps=steps, error=error
            )
            if build.credential_id:
                self.platform.revoke_token(build.credential_id)
            if done is None:
                raise Conflict(f"build {build_id} is not running (it is {build.status})")
            return self._view(done)

        return await self.builds.run(work)

    async def expire(self) -> None:
        """End builds that cannot go on and revoke their tokens (the `build_expiry` worker)."""

        def work() -> list[str]:
            ended = self.builds.expire()
            for _build_id, credential in ended:
                if credential:
                    self.platform.revoke_token(credential)
            return [build_id for build_id, _ in ended]

        for build_id in await self.builds.run(work):
            log.info(
                "build %s ended: its deadline passed, or its builder or client went away", build_id
            )
