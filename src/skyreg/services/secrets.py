"""App secrets: `skyreg secrets set|list|unset`, their delivery to starting machines, and the
rotation of the master key.

Who may do what:
- list (names, a keyed digest of each value, who set it and when; never values), set and unset:
  an admin token, an org token of the app's org, a deploy token of the app. Read-only tokens
  and deploy tokens of other apps get 403, other orgs' tokens 404. No token reads a value back.
- a machine's values: only an `agent` token (serving the machine's org, or every org), only for
  a machine the agent is starting (desired started, state `starting`, the generation it names).

At rest (`meta/secrets.py`, `auth/envelope.py`): each value sealed under its org's data key,
bound to its app and name; the data key wrapped by a master key that is not in the database
(a 0600 key file or `SKYREG_SECRETS_KEY`). A set or unset makes a new version of the app's
secrets and, unless staged or the app has no release yet, a release of the running image, so
the machines roll onto the new values.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from skyreg.auth.envelope import (
    MAX_VALUE_BYTES,
    MasterKeys,
    SecretKeyError,
    WrappedKey,
    new_data_key,
    open_value,
    rewrap,
    seal_value,
    unwrap_data_key,
    value_digest,
    wrap_data_key,
)
from skyreg.auth.policy import PUSH, AccessPolicy
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import App, PlatformMeta, Release, TokenRecord
from skyreg.meta.secrets import SealedChange, SecretMeta, StoredSecret, WrappedOrgKey
from skyreg.services.access import visible_app
from skyreg.services.errors import Forbidden, Invalid, LimitExceeded, NotFound, Unavailable
from skyreg.services.releases import ENV_NAME_RE, DeployRequest, ReleaseService

log = logging.getLogger("skyreg.services")

NAME_RE = ENV_NAME_RE  # a secret is an environment variable
RESERVED_PREFIX = "SKYREG_"  # the agent's own variables (SKYREG_MACHINE_ID, ...)
MAX_SECRETS = 100  # per app
MAX_TOTAL_BYTES = 1 << 20  # names and values of one app: a process's environment stays small
MAX_BATCH = 100
SEALING_OVERHEAD = 40  # bytes a sealed value adds (nonce and tag)
ROTATE_PAGE = 100


@dataclass(frozen=True)
class SecretsChanged:
    """The outcome of a set or unset."""

    app: App
    version: int
    names: list[str]  # the names it changed (empty: nothing changed)
    release: Release | None  # the release that rolls the machines (None: staged or no release)
    staged: bool


@dataclass(frozen=True)
class SecretsList:
    app: App
    version: int  # the current version (staged changes included)
    deployed_version: int | None  # the newest release's (None: no release yet)
    secrets: list[StoredSecret]


@dataclass(frozen=True)
class MachineEnvironment:
    """What a starting machine runs with besides its image's Env."""

    plain: dict[str, str]  # its release's variables
    secrets: dict[str, str]


@dataclass(frozen=True)
class Rotation:
    key_id: str  # the current master key
    rewrapped: int  # data keys wrapped anew by it
    total: int  # data keys in all


@dataclass
class SecretKeyRing:
    """The server's master keys, loaded at first use (on a database thread: it reads a file)
    and again on `reload` (a rotation, or a data key wrapped by a key this process has not
    seen: another node rotated)."""

    load: Callable[[], MasterKeys]
    _keys: MasterKeys | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self) -> MasterKeys:
        with self._lock:
            if self._keys is None:
                self._keys = self._loaded()
            return self._keys

    def reload(self) -> MasterKeys:
        with self._lock:
            self._keys = self._loaded()
            return self._keys

    def _loaded(self) -> MasterKeys:
        try:
            return self.load()
        except SecretKeyError as e:
            log.error("app secrets are unavailable: %s", e)
            raise Unavailable(f"app secrets are unavailable on this server: {e}") from None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Invalid(
            f"secret name {str(name)[:130]!r} must be letters, digits and _, not starting "
            "with a digit, at most 128 characters"
        )
    if name.upper().startswith(RESERVED_PREFIX):
        raise Invalid(f"secret name {name!r}: names starting with {RESERVED_PREFIX} are reserved")


def _check_value(name: str, value: str) -> bytes:
    if not isinstance(value, str) or "\x00" in value:
        raise Invalid(f"secret {name}: the value must be text without NUL characters")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"secret {name}: the value must be valid UTF-8 text") from None
    if len(data) > MAX_VALUE_BYTES:
        raise LimitExceeded(
            f"secret {name}: the value is larger than {MAX_VALUE_BYTES // 1024} KiB",
            MAX_VALUE_BYTES,
        )
    return data


def _context(app: App, name: str) -> str:
    """What a sealed value is bound to: another app's or name's row cannot take it."""
    return f"app {app.id} secret {name}"


@dataclass
class SecretService:
    secrets: SecretMeta
    platform: PlatformMeta
    machines: MachineMeta
    policy: AccessPolicy
    releases: ReleaseService
    keyring: SecretKeyRing

    # -- who -------------------------------------------------------------------------------------

    def _app_for(self, caller: TokenRecord, name: str, doing: str) -> App:
        app = visible_app(self.platform, caller, name)
        allowed = caller.kind in ("admin", "org") or (
            caller.kind == "deploy" and caller.app_id == app.id
        )
        if not allowed or PUSH not in self.policy.allowed(caller, app.name):
            raise Forbidden(f"a {caller.kind} token may not {doing} the secrets of app {app.name}")
        return app

    # -- keys ------------------------------------------------------------------------------------

    def _data_key(self, org_id: int, *, create: bool) -> bytes | None:
        """The org's data key in the clear (made and stored on first use with `create`)."""
        stored = self.secrets.org_key(org_id)
        if stored is None:
            if not create:
                return None
            keys = self.keyring.keys()
            fresh = new_data_key()
            wrapped = wrap_data_key(keys, str(org_id), fresh)
            stored = self.secrets.add_org_key(WrappedOrgKey(org_id, wrapped.key_id, wrapped.blob))
            if stored.wrapped == wrapped.blob:
                return fresh
        return self._unwrap(stored)

    def _unwrap(self, stored: WrappedOrgKey) -> bytes:
        keys = self.keyring.keys()
        if keys.by_id(stored.key_id) is None:
            keys = self.keyring.reload()  # another node may have rotated: read the keys again
        try:
            wrapped = WrappedKey(stored.key_id, stored.wrapped)
            return unwrap_data_key(keys, str(stored.org_id), wrapped)
        except SecretKeyError as e:
            log.error("org %d: %s", stored.org_id, e)
            raise Unavailable(f"app secrets are unavailable on this server: {e}") from None

    # -- list, set, unset ------------------------------------------------------------------------

    async def list_secrets(self, caller: TokenRecord, app_name: str) -> SecretsList:
        return await self.secrets.read(self._list, caller, app_name)

    def _list(self, caller: TokenRecord, app_name: str) -> SecretsList:
        app = self._app_for(caller, app_name, "list")
        newest = self.releases.releases.list_releases(app.id, 1)
        deployed = None
        if newest:
            deployed = self.secrets.release_version(newest[0].id)
        return SecretsList(
            app, self.secrets.version(app.id), deployed, self.secrets.current(app.id)
        )

    async def set_secrets(
        self,
        caller: TokenRecord,
        app_name: str,
        values: Callable[[], Mapping[str, str]],
        *,
        stage: Callable[[], bool],
    ) -> SecretsChanged:
        """Set (add or replace) secrets; `values` and `stage` are asked for once the caller may."""
        changed = await self.secrets.run(self._set, caller, app_name, values)
        return await self._roll(caller, changed, stage())

    def _set(
        self, caller: TokenRecord, app_name: str, values: Callable[[], Mapping[str, str]]
    ) -> tuple[App, tuple[int, list[str]] | None]:
        app = self._app_for(caller, app_name, "change")
        given = values()
        if not given:
            raise Invalid("give at least one secret as NAME=VALUE")
        if len(given) > MAX_BATCH:
            raise LimitExceeded(f"at most {MAX_BATCH} secrets at once", MAX_BATCH)
        plain: dict[str, bytes] = {}
        for name, value in given.items():
            _check_name(name)
            plain[name] = _check_value(name, value)
        data_key = self._data_key(app.org_id, create=True)
        assert data_key is not None
        sealed = {
            name: (seal_value(data_key, _context(app, name), value), value_digest(data_key, value))
            for name, value in plain.items()
        }
        try:
            result = self.secrets.change(
                app.id,
                SealedChange(sealed, ()),
                caller.id,
                caller.name,
                MAX_SECRETS,
                MAX_TOTAL_BYTES,
                SEALING_OVERHEAD,
            )
        except ValueError as e:  # the count or the total (both checked in the write)
            raise LimitExceeded(f"app {app.name}: {e}", MAX_SECRETS) from None
        log.info("app %s: secrets %s set by token %s", app.name, sorted(plain), caller.id)
        return app, result

    async def unset_secrets(
        self,
        caller: TokenRecord,
        app_name: str,
        names: Callable[[], Sequence[str]],
        *,
        stage: Callable[[], bool],
    ) -> SecretsChanged:
        changed = await self.secrets.run(self._unset, caller, app_name, names)
        return await self._roll(caller, changed, stage())

    def _unset(
        self, caller: TokenRecord, app_name: str, names: Callable[[], Sequence[str]]
    ) -> tuple[App, tuple[int, list[str]] | None]:
        app = self._app_for(caller, app_name, "change")
        given = list(names())
        if not given:
            raise Invalid("name at least one secret to unset")
        if len(given) > MAX_BATCH:
            raise LimitExceeded(f"at most {MAX_BATCH} secrets at once", MAX_BATCH)
        for name in given:
            _check_name(name)
        try:
            result = self.secrets.change(
                app.id,
                SealedChange({}, given),
                caller.id,
                caller.name,
                MAX_SECRETS,
                MAX_TOTAL_BYTES,
                SEALING_OVERHEAD,
            )
        except ValueError as e:  # only when an older limit let it grow: unset shrinks it
            raise LimitExceeded(f"app {app.name}: {e}", MAX_SECRETS) from None
        log.info("app %s: secrets %s unset by token %s", app.name, sorted(given), caller.id)
        return app, result

    async def _roll(
        self, caller: TokenRecord, changed: tuple[App, tuple[int, list[str]] | None], stage: bool
    ) -> SecretsChanged:
        app, result = changed
        if result is None:
            version = await self.secrets.read(self.secrets.version, app.id)
            return SecretsChanged(app, version, [], None, stage)
        version, names = result
        if stage:
            return SecretsChanged(app, version, names, None, True)
        newest = await self.releases.releases.read(self.releases.releases.list_releases, app.id, 1)
        if not newest:
            return SecretsChanged(app, version, names, None, True)
        last = newest[0]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        release = await self.releases.deploy(
            DeployRequest(
                app=app.name,
                image=f"{last.image_repository}@{last.image_digest}",
                token=caller,
                strategy="rolling",
                regions=list(last.regions),
                count=last.machine_count,
                description=f"Secrets changed: {shown}",
                reason="secrets",
                env=last.env,
            )
        )
        return SecretsChanged(app, version, names, release, False)

    # -- delivery --------------------------------------------------------------------------------

    async def machine_secrets(
        self, caller: TokenRecord, machine_id: str, generation: int
    ) -> MachineEnvironment:
        """The environment a starting machine runs with: its release's plain variables and its
        release's version of the secrets. On a database thread even on SQLite: it may read the
        key file and opens every value."""
        return await self.secrets.run(self._machine_secrets, caller, machine_id, generation)

    def _machine_secrets(
        self, caller: TokenRecord, machine_id: str, generation: int
    ) -> MachineEnvironment:
        if caller.kind not in ("admin", "org", "agent"):
            raise Forbidden(f"a {caller.kind} token may not act as an agent")
        machine = self.machines.get(machine_id)
        if machine is None or not (
            caller.kind == "admin"
            or caller.org_id == machine.org_id
            or (caller.kind == "agent" and caller.org_id is None)
        ):
            raise NotFound("machine", machine_id)
        found = self.secrets.for_machine(machine_id)
        if found is None:
            raise NotFound("machine", machine_id)
        if not found.secrets:  # any agent may start a machine without secrets
            return MachineEnvironment(found.env, {})
        if caller.kind != "agent":
            raise Forbidden(
                f"machine {machine_id} has secrets: only an agent token receives them (an admin "
                "makes one: skyreg tokens create --kind agent)"
            )
        if (
            machine.desired != "started"
            or machine.state != "starting"
            or machine.generation != generation
        ):
            raise Forbidden(
                f"machine {machine_id} is not starting (generation {generation}): its secrets "
                "are given only to the agent starting it"
            )
        data_key = self._data_key(found.org_id, create=False)
        if data_key is None:
            raise Unavailable(f"machine {machine_id}: its org has secrets but no data key")
        app = self.platform.get_app_by_id(found.app_id)
        assert app is not None
        values: dict[str, str] = {}
        for stored in found.secrets:
            try:
                plain = open_value(data_key, _context(app, stored.name), stored.sealed)
            except SecretKeyError as e:
                log.error("app %s secret %s: %s", app.name, stored.name, e)
                raise Unavailable(
                    f"secret {stored.name} of app {app.name} cannot be opened"
                ) from None
            values[stored.name] = plain.decode("utf-8")
        log.info(
            "machine %s: %d secrets given to agent token %s", machine_id, len(values), caller.id
        )
        return MachineEnvironment(found.env, values)

    # -- rotation --------------------------------------------------------------------------------

    async def rotate_key(self, caller: TokenRecord) -> Rotation:
        """Read the master keys again and wrap every org's data key with the newest (admin)."""
        if caller.kind != "admin":
            raise Forbidden("only an admin token rotates the master key")
        keys = await self.secrets.run(self.keyring.reload)
        rewrapped = total = 0
        after = 0
        while True:
            page = await self.secrets.read(self.secrets.org_keys_after, after, ROTATE_PAGE)
            if not page:
                break
            for stored in page:
                total += 1
                if await self.secrets.run(self._rewrap_one, keys, stored):
                    rewrapped += 1
            after = page[-1].org_id
        log.info(
            "master key %s: %d of %d data keys rewrapped", keys.current.key_id, rewrapped, total
        )
        return Rotation(keys.current.key_id, rewrapped, total)

    def _rewrap_one(self, keys: MasterKeys, stored: WrappedOrgKey) -> bool:
        while True:
            try:
                fresh = rewrap(keys, str(stored.org_id), WrappedKey(stored.key_id, stored.wrapped))
            except SecretKeyError as e:
                raise Unavailable(f"org {stored.org_id}: {e}") from None
            if fresh is None:
                return False
            if self.secrets.replace_org_key(stored, fresh.key_id, fresh.blob):
                return True
            again = self.secrets.org_key(stored.org_id)  # changed meanwhile: read it again
            if again is None:
                return False
            stored = again
