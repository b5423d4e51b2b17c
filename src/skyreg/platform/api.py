"""The management API under /api/v1: orgs, apps, access tokens and image listings, as JSON.

Callers authenticate with an access token (`Authorization: Bearer <secret>`, or Basic with the
secret as password). What a caller may see follows its token: an admin token sees everything, any
other token its own organization (and public apps). Resources of other organizations answer 404,
exactly as if they did not exist.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.http import client_of
from skyreg.auth.policy import PUSH
from skyreg.auth.service import Authenticator, AuthFailed, Throttled
from skyreg.clock import utc_iso
from skyreg.meta.db import unreachable as database_unreachable
from skyreg.meta.machines import STATES, Machine, TooManyMachines
from skyreg.meta.platform import AlreadyExists, App, ImageTag, Org, PlatformMeta, TokenRecord
from skyreg.oci.bounded import MAX_INT, JSONInputError, load_json, parse_int, storable
from skyreg.platform.names import (
    MAX_TOKEN_NAME,
    generate_app_name,
    is_dns_label,
    parse_expiry,
)
from skyreg.platform.releases import RELEASES_KEY, release_json
from skyreg.services.errors import Forbidden, NotFound, ServiceError
from skyreg.services.releases import (
    DEFAULT_REGION,
    IMAGE_REQUIRED,
    LABEL_INVALID,
    REGION_RE,
    REGIONS_INVALID,
    STRATEGY_INVALID,
    DeployLimits,
    DeployRequest,
    ReleaseService,
    count_invalid,
)

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

log = logging.getLogger("skyreg.platform")

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PATCH", "PUT"})  # requests whose body `_endpoint` reads
_GENERATE_ATTEMPTS = 20
MAX_RELEASES = 1000
CREATABLE_KINDS = ("org", "deploy", "readonly")

API_AUTH_KEY = web.AppKey("management_authenticator", Authenticator)

# Handlers are plain functions: they query the database, so they run on a database thread.
Handler = Callable[["Call"], web.StreamResponse]
RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A failure rendered as `{"error": {"code": ..., "message": ...}}` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message}}
        return web.json_response(body, status=self.status, headers=self.headers)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def query_int(
    request: web.Request, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT
) -> int:
    """The integer query parameter `name` (`default` when absent); 400 unless in the bounds."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return parse_int(raw, minimum=minimum, maximum=maximum)
    except ValueError as e:
        raise bad_request(f"{name} {e}") from None


def not_found(kind: str, name: str) -> ApiError:
    """The same answer for a resource that does not exist and one the caller may not see."""
    return ApiError(404, "not_found", f"{kind} {name[:100]!r} not found")


_UNAUTHENTICATED = ApiError(
    401,
    "unauthorized",
    "authentication required: send an access token as `Authorization: Bearer <token>`",
    headers={"WWW-Authenticate": 'Bearer realm="skyreg"'},
)


# -- JSON shapes --------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else utc_iso(value)


def org_json(org: Org) -> dict[str, Any]:
    return {"name": org.name, "created_at": _time(org.created_at)}


def app_json(app: App) -> dict[str, Any]:
    return {
        "name": app.name,
        "org": app.org_name,
        "public": app.public,
        "created_at": _time(app.created_at),
    }


def token_json(token: TokenRecord) -> dict[str, Any]:
    """A token as listings show it: never its secret (which is not stored anyway)."""
    return {
        "id": token.id,
        "name": token.name,
        "kind": token.kind,
        "org": token.org_name,
        "app": token.app_name,
        "created_at": _time(token.created_at),
        "expires_at": _time(token.expires_at),
        "revoked_at": _time(token.revoked_at),
        "active": token.active(),
    }


def image_json(image: ImageTag) -> dict[str, Any]:
    return {
        "repository": image.repository,
        "tag": image.tag,
        "digest": image.digest,
        "media_type": image.media_type,
        "size": image.size,
        "pushed_at": _time(image.pushed_at),
    }


# -- requests -----------------------------------------------------------------------------------


class Call:
    """One API request: the caller's token (None: anonymous) and helpers to read the request."""

    def __init__(self, request: web.Request, auth: Authenticator) -> None:
        self.request = request
        self.auth = auth
        self.platform: PlatformMeta = auth.platform
        self.token: TokenRecord | None = None
        self.client = client_of(request)  # the transport is the event loop's: read it there
        self._raw: bytes | None = None
        self._body_error: ApiError | RequestPayloadError | None = None

    def identify(self) -> None:
        """Look up the token of the Authorization header; 401 when wrong, 429 when throttled.
        Queries: call it on a database thread."""
        header = self.request.headers.get("Authorization")
        if not header:
            return

        try:
            self.token = self.auth.limited(self.client, lambda: self.auth.access_token(header))
        except Throttled as e:
            raise ApiError(
                429,
                "too_many_requests",
                "too many failed authentication attempts; retry later",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except AuthFailed:
            raise ApiError(
                401,
                "unauthorized",
                "invalid, expired or revoked token",
                headers={"WWW-Authenticate": 'Bearer realm="skyreg",error="invalid_token"'},
            ) from None

    def caller(self) -> TokenRecord:
        """The caller's token; 401 for anonymous callers."""
        if self.token is None:
            raise _UNAUTHENTICATED
        return self.token

    @property
    def is_admin(self) -> bool:
        return self.token is not None and self.token.kind == "admin"

    async def read_body(self) -> None:
        """Read the request body (at most MAX_BODY bytes) on the event loop, before the handler
        runs on a database thread. A body too large or unreadable is kept and raised by `body`,
        so the checks a handler makes before it reads its body (401 for an anonymous caller,
        403, 404) still answer first."""
        try:
            self._raw = await self._read()
        except (ApiError, RequestPayloadError) as e:
            self._body_error = e

    async def _read(self) -> bytes:
        if self.request.content_length is not None and self.request.content_length > MAX_BODY:
            raise ApiError(413, "too_large", f"request body larger than {MAX_BODY} bytes")
        raw = b""
        while chunk := await self.request.content.read(MAX_BODY + 1 - len(raw)):
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ApiError(413, "too_large", f"request body larger than {MAX_BODY} bytes")
        return raw

    def body(self) -> dict[str, Any]:
        """The JSON object in the request body ({} for an empty body), as `read_body` read it."""
        if self._body_error is not None:
            raise self._body_error
        raw = self._raw
        if raw is None:
            raise RuntimeError(f"the body of a {self.request.method} request is not read")
        if not raw.strip():
            return {}
        try:
            doc = load_json(raw, max_bytes=MAX_BODY)
        except JSONInputError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise bad_request("the request body must be a JSON object")
        return doc

    # -- visibility -----------------------------------------------------------------------------

    def org_named(self, name: object) -> Org:
        """An org the caller belongs to (admin: any); 404 otherwise."""
        if not isinstance(name, str):
            raise bad_request("org must be a string")
        token = self.caller()
        org = self.platform.get_org(name)
        if org is None or (token.kind != "admin" and token.org_id != org.id):
            raise not_found("organization", name)
        return org

    def org_param(self, value: object) -> Org | None:
        """The org a request names, else the caller's own (None for an admin naming none)."""
        if value is not None:
            return self.org_named(value)
        token = self.caller()
        if token.org_name is None:
            return None
        return self.org_named(token.org_name)

    def app_named(self, name: str, *, public_ok: bool = False) -> App:
        """An app of the caller's org (admin: any; with `public_ok`, also any public app).

        Anonymous callers get 401 unless the app is public (and `public_ok`); callers of another
        org get 404, the same as for an app that does not exist.
        """
        app = self.platform.get_app(name)
        if app is not None and public_ok and app.public:
            return app
        token = self.caller()
        if app is None or (token.kind != "admin" and token.org_id != app.org_id):
            raise not_found("app", name)
        return app

    def may_manage(self, org_id: int) -> bool:
        """Whether the caller may create and change apps and tokens of an org."""
        token = self.caller()
        return token.kind == "admin" or (token.kind == "org" and token.org_id == org_id)


def _json(doc: object, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, headers={"Cache-Control": "no-store"})


# -- handlers -----------------------------------------------------------------------------------


_OPENAPI: bytes | None = None


def openapi_document() -> bytes:
    """The OpenAPI 3.1 description of this API (shipped next to this module)."""
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = resources.files("skyreg.platform").joinpath("openapi.json").read_bytes()
    return _OPENAPI


def get_openapi(call: Call) -> web.StreamResponse:
    return web.Response(body=openapi_document(), content_type="application/json")


def whoami(call: Call) -> web.StreamResponse:
    token = call.caller()
    return _json(token_json(token))


def list_orgs(call: Call) -> web.StreamResponse:
    token = call.caller()
    if call.is_admin:
        orgs = call.platform.list_orgs()
    else:
        orgs = [] if token.org_id is None else call.platform.list_orgs(token.org_id)
    return _json({"orgs": [org_json(o) for o in orgs]})


def create_org(call: Call) -> web.StreamResponse:
    call.caller()
    body = call.body()
    if not call.is_admin:
        raise forbidden("only an admin token may create organizations")
    name = body.get("name")
    if not is_dns_label(name):
        raise bad_request("name must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters")
    assert isinstance(name, str)
    try:
        org = call.platform.create_org(name)
    except AlreadyExists:
        raise ApiError(409, "conflict", f"organization {name!r} already exists") from None
    log.info("organization %s created by token %s", name, call.caller().id)
    return _json(org_json(org), status=201)


def list_apps(call: Call) -> web.StreamResponse:
    call.caller()
    org = call.org_param(call.request.query.get("org"))
    apps = call.platform.list_apps(None if org is None else org.id)
    return _json({"apps": [app_json(a) for a in apps]})


def create_app(call: Call) -> web.StreamResponse:
    token = call.caller()
    body = call.body()
    org = call.org_param(body.get("org"))
    if org is None:
        raise bad_request("org is required")
    if not call.may_manage(org.id):
        raise forbidden(f"a {token.kind} token may not create apps")
    public = body.get("public", False)
    if not isinstance(public, bool):
        raise bad_request("public must be true or false")
    name = body.get("name")
    generate = body.get("generate_name", False)
    if not isinstance(generate, bool):
        raise bad_request("generate_name must be true or false")
    if generate == (name is not None):
        raise bad_request("give either a name or generate_name: true")
    if generate:
        for _ in range(_GENERATE_ATTEMPTS):
            name = generate_app_name()
            try:
                call.platform.create_app(name, org.id, public=public)
                break
            except AlreadyExists:
                continue
        else:
            raise ApiError(409, "conflict", "could not generate an unused app name; try again")
    else:
        if not is_dns_label(name):
            raise bad_request("name must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters")
        assert isinstance(name, str)
        try:
            call.platform.create_app(name, org.id, public=public)
        except AlreadyExists:
            raise ApiError(409, "conflict", f"app name {name!r} is taken") from None
    assert isinstance(name, str)
    app = call.platform.get_app(name)
    assert app is not None
    log.info("app %s created in %s by token %s", name, org.name, token.id)
    return _json(app_json(app), status=201)


def get_app(call: Call) -> web.StreamResponse:
    app = call.app_named(call.request.match_info["app"], public_ok=True)
    return _json(_app_with_placement(app, call.request.app[RELEASES_KEY].geo))


def update_app(call: Call) -> web.StreamResponse:
    call.caller()
    body = call.body()
    app = call.app_named(call.request.match_info["app"], public_ok=True)
    if not call.may_manage(app.org_id):
        raise forbidden("only an admin or org token of the app's organization may change it")
    geo = call.request.app[RELEASES_KEY].geo
    unknown = set(body) - {"public", "regions", "replicate_ahead"}
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    if "public" in body and not isinstance(body["public"], bool):
        raise bad_request("public must be true or false")
    placement = _placement_change(geo, app.name, body)
    if "public" in body:
        call.platform.set_app_public(app.name, body["public"])
    if placement is not None and geo is not None:
        geo.meta.set_app_placement(app.name, *placement)
    updated = call.platform.get_app(app.name)
    assert updated is not None
    return _json(_app_with_placement(updated, geo))


def _placement_change(
    geo: GeoNode | None, app: str, body: dict[str, Any]
) -> tuple[list[str], bool] | None:
    """The new (regions, replicate_ahead) a PATCH asks for, validated; None: unchanged."""
    if "regions" not in body and "replicate_ahead" not in body:
        return None
    if geo is None:
        raise bad_request("this registry has one region: regions cannot be set")
    regions, ahead = geo.meta.app_placement(app) or ([], False)
    if "regions" in body:
        wanted = body["regions"]
        if not isinstance(wanted, list) or not all(isinstance(r, str) for r in wanted):
            raise bad_request("regions must be a list of region codes")
        absent = sorted(r for r in set(wanted) if not geo.regions.knows(r))
        if absent:
            raise bad_request(
                f"unknown region(s) {', '.join(absent)}; regions: {', '.join(geo.regions.codes)}"
            )
        regions = sorted(set(wanted))
    if "replicate_ahead" in body:
        if not isinstance(body["replicate_ahead"], bool):
            raise bad_request("replicate_ahead must be true or false")
        ahead = body["replicate_ahead"]
    return regions, ahead


def _app_with_placement(app: App, geo: GeoNode | None) -> dict[str, Any]:
    doc = app_json(app)
    if geo is not None:
        regions, ahead = geo.meta.app_placement(app.name) or ([], False)
        doc["regions"], doc["replicate_ahead"] = regions, ahead
    return doc


def list_images(call: Call) -> web.StreamResponse:
    app = call.app_named(call.request.match_info["app"], public_ok=True)
    images = call.platform.image_tags(app.name)
    return _json({"app": app.name, "images": [image_json(i) for i in images]})


def show_image(call: Call) -> web.StreamResponse:
    """One image of the app (`[repo:]tag` or digest): its blobs and the regions holding each."""
    app = call.app_named(call.request.match_info["app"], public_ok=True)
    service = call.request.app[RELEASES_KEY]
    reference = call.request.match_info["reference"]
    repository, by_digest, ref = app.name, False, reference
    if "@" in reference:  # APP@DIGEST
        repository, _, ref = reference.partition("@")
        by_digest = True
    elif reference.startswith(("sha256:", "sha512:")):  # DIGEST
        by_digest = True
    elif ":" in reference:  # APP:TAG
        repository, _, ref = reference.rpartition(":")
    if repository != app.name:
        raise not_found("image", reference[:200])
    stored = service.registry.get_manifest(repository, ref, by_digest=by_digest)
    if stored is None:
        raise not_found("image", reference[:200])
    doc: dict[str, Any] = {
        "repository": repository,
        "reference": ref,
        "digest": stored.digest,
        "media_type": stored.media_type,
    }
    geo = service.geo
    if geo is None:
        return _json(doc)
    blobs = geo.image_blobs(repository, stored.digest)
    copies = geo.meta.copies([d for d, _ in blobs])
    doc["blobs"] = [{"digest": d, "size": size, "regions": sorted(copies[d])} for d, size in blobs]
    doc["regions"] = {
        region: {
            "complete": all(region in copies[d] for d, _ in blobs),
            "bytes": sum(size for d, size in blobs if region in copies[d]),
        }
        for region in geo.regions.codes
    }
    doc["size"] = sum(size for _, size in blobs)
    return _json(doc)


def replication_status(call: Call) -> web.StreamResponse:
    """The replication queue: job counts and bytes per region and state, recent jobs."""
    token = call.caller()
    if token.kind != "admin":
        raise forbidden("only an admin token may see the replication queue")
    geo = call.request.app[RELEASES_KEY].geo
    if geo is None:
        return _json({"region": None, "regions": [], "jobs": [], "recent": []})
    doc = geo.status_json()
    doc["recent"] = [
        {
            "digest": j.digest,
            "region": j.region,
            "state": j.state,
            "attempts": j.attempts,
            "bytes": j.bytes_moved,
            "size": j.size,
            "source": j.source_region,
            "error": j.error,
            "updated_at": _time(j.updated_at),
        }
        for j in geo.meta.jobs(limit=50)
    ]
    return _json(doc)


def list_tokens(call: Call) -> web.StreamResponse:
    token = call.caller()
    if token.kind not in ("admin", "org"):
        raise forbidden(f"a {token.kind} token may not list tokens")
    org = call.org_param(call.request.query.get("org"))
    tokens = call.platform.list_tokens(None if org is None else org.id)
    return _json({"tokens": [token_json(t) for t in tokens]})


def create_token(call: Call) -> web.StreamResponse:
    caller = call.caller()
    if caller.kind not in ("admin", "org"):
        raise forbidden(f"a {caller.kind} token may not create tokens")
    body = call.body()
    kind = body.get("kind")
    if kind not in CREATABLE_KINDS:
        raise bad_request(
            "kind must be one of org, deploy, readonly (admin tokens are not created via the API)"
        )
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > MAX_TOKEN_NAME or not name.isprintable():
        raise bad_request(f"name must be printable text of at most {MAX_TOKEN_NAME} characters")
    try:
        expires_in = parse_expiry(body.get("expiry"))
    except ValueError as e:
        raise bad_request(str(e)) from None
    app: App | None = None
    if kind == "deploy":
        app_name = body.get("app")
        if not isinstance(app_name, str):
            raise bad_request("a deploy token needs an app")
        app = call.app_named(app_name)
        if body.get("org") is not None and body.get("org") != app.org_name:
            raise bad_request(f"app {app.name!r} is not in organization {body['org']!r}")
        org = call.org_named(app.org_name)
    else:
        if body.get("app") is not None:
            raise bad_request(f"a {kind} token is not tied to an app; leave app out")
        found = call.org_param(body.get("org"))
        if found is None:
            raise bad_request("org is required")
        org = found
    if not call.may_manage(org.id):
        raise forbidden("only an admin or org token of this organization may create its tokens")
    secret, record = call.auth.create_token(
        kind,
        name=name,
        org_id=org.id,
        app_id=None if app is None else app.id,
        expires_in=expires_in,
    )
    log.info("%s token %s created by token %s", kind, record.id, caller.id)
    return _json({**token_json(record), "secret": secret}, status=201)


def revoke_token(call: Call) -> web.StreamResponse:
    caller = call.caller()
    token_id = call.request.match_info["token_id"]
    target = call.platform.token_by_id(token_id)
    same_org = target is not None and caller.org_id is not None and caller.org_id == target.org_id
    if target is None or not (caller.kind == "admin" or caller.id == target.id or same_org):
        raise not_found("token", token_id)
    if not (caller.kind == "admin" or caller.id == target.id or caller.kind == "org"):
        raise forbidden(f"a {caller.kind} token may revoke only itself")
    if target.kind == "admin" and target.active():
        others = [t for t in call.platform.list_tokens() if t.kind == "admin" and t.active()]
        if len(others) <= 1:
            raise ApiError(409, "conflict", "refusing to revoke the last active admin token")
    call.platform.revoke_token(target.id)
    log.info("token %s revoked by token %s", target.id, caller.id)
    revoked = call.platform.token_by_id(target.id)
    assert revoked is not None
    return _json(token_json(revoked))


def list_releases(call: Call) -> web.StreamResponse:
    app = call.app_named(call.request.match_info["app"])
    limit = query_int(call.request, "limit", 25, 1, MAX_RELEASES)
    service = call.request.app[RELEASES_KEY]
    found = service.releases.list_releases(app.id, limit)
    return _json({"app": app.name, "releases": [release_json(r) for r in found]})


_RELEASE_FIELDS = {"image", "image_label", "regions", "count", "strategy", "description"}


def create_release(call: Call) -> web.StreamResponse:
    """Deploy: `ReleaseService.deploy` resolves the image, tags it into the app and records
    the release; this parses the body and renders the release or the refusal."""
    token = call.caller()
    body = call.body()
    service = call.request.app[RELEASES_KEY]
    try:
        release = service.deploy(_deploy_request(call, token, body, service.limits))
    except ServiceError as e:
        raise _refusal(e) from None
    return _json(release_json(release), 201)


def _deploy_request(
    call: Call, token: TokenRecord, body: dict[str, Any], limits: DeployLimits
) -> DeployRequest:
    """The body's fields as a DeployRequest; 400 for unknown fields and wrong JSON types (the
    service checks the values)."""
    unknown = set(body) - _RELEASE_FIELDS
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    image = body.get("image", "")
    if not isinstance(image, str):
        raise bad_request(IMAGE_REQUIRED)
    label = body.get("image_label")
    if label is not None and not isinstance(label, str):
        raise bad_request(LABEL_INVALID)
    strategy = body.get("strategy", "rolling")
    if not isinstance(strategy, str):
        raise bad_request(STRATEGY_INVALID)
    regions = body.get("regions", [])
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
        raise bad_request(REGIONS_INVALID)
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool):
        raise bad_request(count_invalid(limits))
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request("description must be a string")
    return DeployRequest(
        app=call.request.match_info["app"],
        image=image,
        token=token,
        label=label,
        strategy=strategy,
        regions=tuple(regions),
        count=count,
        description=description,
    )


def _refusal(error: ServiceError) -> ApiError:
    """A service's domain error as the API answers it."""
    if isinstance(error, NotFound):
        return not_found(error.kind, error.name)
    if isinstance(error, Forbidden):
        return forbidden(error.reason)
    return bad_request(error.reason)  # Invalid, LimitExceeded


# -- machines -----------------------------------------------------------------------------------

MAX_LOG_LINES = 1000
MAX_EVENT = 1000


def machine_json(machine: Machine) -> dict[str, Any]:
    return {
        "id": machine.id,
        "app": machine.app_name,
        "region": machine.region,
        "release_version": machine.release_version,
        "desired": machine.desired,
        "state": machine.state,
        "generation": machine.generation,
        "exit_code": machine.exit_code,
        "created_at": _time(machine.created_at),
        "updated_at": _time(machine.updated_at),
    }


def _agent_caller(call: Call) -> TokenRecord:
    """Agents use an admin token (every machine) or an org token (its org's machines)."""
    token = call.caller()
    if token.kind not in ("admin", "org"):
        raise forbidden(f"a {token.kind} token may not act as an agent")
    return token


def _agent_machine(call: Call) -> Machine:
    token = _agent_caller(call)
    machine_id = call.request.match_info["machine_id"]
    machine = call.request.app[RELEASES_KEY].machines.get(machine_id)
    if machine is None or (token.kind != "admin" and token.org_id != machine.org_id):
        raise not_found("machine", machine_id)
    return machine


MAX_MACHINE_PAGE = 1000
MACHINE_PAGE = 100  # default page of an app's machines (the agent's default page is the max)
MACHINE_ID_RE = re.compile(r"^[0-9a-f]{1,64}\Z")


def _machine_page(call: Call, default: int) -> tuple[int, str | None]:
    """`limit` (1 to MAX_MACHINE_PAGE) and `cursor` (the previous page's `next_cursor`)."""
    limit = query_int(call.request, "limit", default, 1, MAX_MACHINE_PAGE)
    cursor = call.request.query.get("cursor") or None
    if cursor is not None and not MACHINE_ID_RE.match(cursor):
        raise bad_request("cursor must be the next_cursor of a previous page")
    return limit, cursor


def _next_cursor(machines: list[Machine], limit: int) -> str | None:
    return machines[-1].id if len(machines) == limit else None


def agent_machines(call: Call) -> web.StreamResponse:
    token = _agent_caller(call)
    region = call.request.query.get("region", DEFAULT_REGION)
    if not REGION_RE.match(region):
        raise bad_request("region must be a region code such as iad, sin, syd")
    limit, cursor = _machine_page(call, MAX_MACHINE_PAGE)
    machines = call.request.app[RELEASES_KEY].machines.in_region(
        region, None if token.kind == "admin" else token.org_id, limit=limit, after=cursor
    )
    return _json(
        {
            "region": region,
            "machines": [
                {
                    **machine_json(m),
                    "image": {"repository": m.image_repository, "digest": m.image_digest},
                }
                for m in machines
            ],
            "next_cursor": _next_cursor(machines, limit),
        }
    )


def agent_state(call: Call) -> web.StreamResponse:
    machine = _agent_machine(call)
    body = call.body()
    state = body.get("state")
    if state not in STATES or state == "created":
        raise bad_request("state must be one of starting, started, stopped, failed")
    exit_code = body.get("exit_code")
    if exit_code is not None and not _int32(exit_code, minimum=-INT32_MAX - 1):
        raise bad_request(f"exit_code must be a whole number from {-INT32_MAX - 1} to {INT32_MAX}")
    machines = call.request.app[RELEASES_KEY].machines
    machines.report_state(machine.id, str(state), exit_code)
    found = machines.get(machine.id)
    if found is None:  # deleted meanwhile as an idle record (create_for_release)
        raise not_found("machine", machine.id)
    return _json(machine_json(found))


INT32_MAX = 2**31 - 1  # what an Integer column holds on every database


def _int32(value: object, *, minimum: int) -> bool:
    """Whether `value` is a JSON whole number (not a bool) from `minimum` to INT32_MAX."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= INT32_MAX


def agent_event(call: Call) -> web.StreamResponse:
    machine = _agent_machine(call)
    body = call.body()
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise bad_request("message is required")
    duration = body.get("duration_ms")
    if duration is not None and not _int32(duration, minimum=0):
        raise bad_request(f"duration_ms must be a whole number from 0 to {INT32_MAX}")
    call.request.app[RELEASES_KEY].machines.add_event(machine.id, message[:MAX_EVENT], duration)
    return _json({}, 201)


def agent_logs(call: Call) -> web.StreamResponse:
    machine = _agent_machine(call)
    body = call.body()
    lines = body.get("lines")
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise bad_request("lines must be a list of strings")
    call.request.app[RELEASES_KEY].machines.add_logs(machine.id, lines)
    return _json({}, 201)


def list_machines(call: Call) -> web.StreamResponse:
    app = call.app_named(call.request.match_info["app"])
    limit, cursor = _machine_page(call, MACHINE_PAGE)
    machines = call.request.app[RELEASES_KEY].machines
    page = machines.of_app(app.id, limit=limit, after=cursor)
    found = [
        {
            **machine_json(m),
            "events": [
                {"at": _time(e.at), "message": e.message, "duration_ms": e.duration_ms}
                for e in machines.events(m.id)
            ],
        }
        for m in page
    ]
    return _json({"app": app.name, "machines": found, "next_cursor": _next_cursor(page, limit)})


def _user_machine(call: Call) -> Machine:
    """A machine of an app the caller may deploy (push); another org's answers 404."""
    token = call.caller()
    machine_id = call.request.match_info["machine_id"]
    machine = call.request.app[RELEASES_KEY].machines.get(machine_id)
    if machine is None or (token.kind != "admin" and token.org_id != machine.org_id):
        raise not_found("machine", machine_id)
    if PUSH not in call.auth.policy.allowed(token, machine.app_name):
        raise forbidden(f"this token may not manage machines of app {machine.app_name}")
    return machine


def _change_machine(call: Call, action: str) -> web.StreamResponse:
    machine = _user_machine(call)
    service = call.request.app[RELEASES_KEY]
    machines = service.machines
    running = machine.desired == "started" and machine.state in ("starting", "started")
    if action == "stop":
        machines.set_desired(machine.id, "stopped")
    elif action == "restart" or not running:
        # A machine not desired started becomes live: the app's live cap applies, as to deploys.
        try:
            machines.start(machine.id, bump=True, max_live=service.limits.per_app)
        except TooManyMachines as e:
            raise bad_request(f"app {machine.app_name}: {e}") from None
    machines.add_event(
        machine.id,
        f"{action.capitalize()} requested by {call.caller().name or 'token ' + call.caller().id}",
    )
    found = machines.get(machine.id)
    if found is None:  # deleted meanwhile (an idle machine of a busy app)
        raise not_found("machine", machine.id)
    log.info("machine %s: %s by token %s", machine.id, action, call.caller().id)
    return _json(machine_json(found))


def stop_machine(call: Call) -> web.StreamResponse:
    return _change_machine(call, "stop")


def start_machine(call: Call) -> web.StreamResponse:
    return _change_machine(call, "start")


def restart_machine(call: Call) -> web.StreamResponse:
    return _change_machine(call, "restart")


def app_logs(call: Call) -> web.StreamResponse:
    app = call.app_named(call.request.match_info["app"])
    after = query_int(call.request, "after", 0)  # a log line id
    lines = call.request.app[RELEASES_KEY].machines.logs(app.id, after, MAX_LOG_LINES)
    return _json(
        {
            "app": app.name,
            "lines": [
                {
                    "id": ln.id,
                    "machine_id": ln.machine_id,
                    "region": ln.region,
                    "at": _time(ln.at),
                    "line": ln.line,
                }
                for ln in lines
            ],
            "last": lines[-1].id if lines else after,
        }
    )


# -- routing ------------------------------------------------------------------------------------

# Every path served, with its handlers by method (the OpenAPI document lists the same).
ROUTES: dict[str, dict[str, Handler]] = {
    "/openapi.json": {"GET": get_openapi},
    "/whoami": {"GET": whoami},
    "/orgs": {"GET": list_orgs, "POST": create_org},
    "/apps": {"GET": list_apps, "POST": create_app},
    "/apps/{app}": {"GET": get_app, "PATCH": update_app},
    "/apps/{app}/images": {"GET": list_images},
    "/apps/{app}/images/{reference}": {"GET": show_image},
    "/replication": {"GET": replication_status},
    "/apps/{app}/releases": {"GET": list_releases, "POST": create_release},
    "/apps/{app}/machines": {"GET": list_machines},
    "/apps/{app}/logs": {"GET": app_logs},
    "/machines/{machine_id}/stop": {"POST": stop_machine},
    "/machines/{machine_id}/start": {"POST": start_machine},
    "/machines/{machine_id}/restart": {"POST": restart_machine},
    "/agent/machines": {"GET": agent_machines},
    "/agent/machines/{machine_id}/state": {"POST": agent_state},
    "/agent/machines/{machine_id}/events": {"POST": agent_event},
    "/agent/machines/{machine_id}/logs": {"POST": agent_logs},
    "/tokens": {"GET": list_tokens, "POST": create_token},
    "/tokens/{token_id}": {"DELETE": revoke_token},
}
_ANONYMOUS_OK = {get_openapi}


def _refuse_unstorable_parameters(request: web.Request) -> None:
    """400 for a path or query parameter holding NUL or a lone surrogate, before any handler
    looks it up (PostgreSQL refuses such text; no driver encodes a lone surrogate). JSON bodies
    get the same check in `load_json`."""
    for where, params in (("path", request.match_info), ("query", request.query)):
        for key, value in params.items():
            if not (storable(key) and storable(value)):
                raise bad_request(
                    f"{where} parameter {key[:40]!r} must not contain NUL or a lone surrogate"
                )


def _handle(call: Call, handler: Handler) -> web.StreamResponse:
    """Identify the caller and run the handler: on a database thread, in one hop."""
    if handler not in _ANONYMOUS_OK:
        call.identify()
    return handler(call)


def _endpoint(methods: dict[str, Handler]) -> RequestHandler:
    allow = ", ".join(sorted(methods))

    async def endpoint(request: web.Request) -> web.StreamResponse:
        handler = methods.get(request.method)
        if handler is None:
            return ApiError(
                405,
                "method_not_allowed",
                f"{request.method} is not supported here",
                headers={"Allow": allow},
            ).response()
        try:
            call = Call(request, request.app[API_AUTH_KEY])
            _refuse_unstorable_parameters(request)
            if request.method in _BODY_METHODS:
                await call.read_body()
            return await call.platform.run(_handle, call, handler)
        except ApiError as err:
            return err.response()
        except RequestPayloadError as e:  # a body the client mis-encoded (say, "gzip" that is not)
            return ApiError(400, "bad_request", f"unreadable request body: {e}"[:300]).response()
        except Exception as e:
            if database_unreachable(e):  # logged once by the engine, not per request
                return ApiError(
                    503,
                    "unavailable",
                    "registry database is unreachable: retry later",
                    headers={"Retry-After": "5"},
                ).response()
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(500, "internal", "internal server error").response()

    return endpoint


async def _no_endpoint(request: web.Request) -> web.StreamResponse:
    return ApiError(404, "not_found", f"no endpoint at {request.path[:200]}").response()


def add_management_routes(
    app: web.Application, auth: Authenticator, releases: ReleaseService
) -> None:
    """Mount the management API under /api/v1, and the GraphQL endpoint, on `app`."""
    from skyreg.platform.graphql import add_graphql

    app[API_AUTH_KEY] = auth
    app[RELEASES_KEY] = releases
    add_graphql(app, releases.releases.db)
    for path, methods in ROUTES.items():
        app.router.add_route("*", PREFIX + path, _endpoint(methods))
    app.router.add_route("*", PREFIX + "/{tail:.*}", _no_endpoint)
