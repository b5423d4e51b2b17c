"""The plumbing of every /api/v1 endpoint: the route declaration (read by the router and by the
OpenAPI generator), the request (`Call`), answers and refusals.

An endpoint reads a POST/PATCH body (at most MAX_BODY bytes) on the event loop, keeping a
too-large or unreadable body's error for when the handler asks for the body (so 401, 403 and 404
still answer before 413/400), identifies the caller (`Database.read`: inline on SQLite, a
database thread on PostgreSQL), then awaits the handler, which calls one service method: its
queries run in one hop to a database thread. Service errors become `{"error": ...}` answers
in `refusal`, the one table of their statuses and codes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.envelope import MasterKeys
from skyreg.auth.service import Authenticator
from skyreg.meta.audit import AuditEntry, AuditMeta
from skyreg.meta.builds import BuildMeta
from skyreg.meta.db import disk_full
from skyreg.meta.db import unreachable as database_unreachable
from skyreg.meta.platform import TokenRecord
from skyreg.meta.quotas import QuotaMeta
from skyreg.meta.retention import RetentionMeta
from skyreg.meta.secrets import SecretMeta
from skyreg.meta.webhooks import WebhookMeta
from skyreg.oci.bounded import MAX_INT, JSONInputError, load_json, parse_int, storable
from skyreg.platform.http import MAX_BODY, ApiError, Identifier, read_body
from skyreg.services.access import AUTHENTICATION_REQUIRED
from skyreg.services.apps import AppService
from skyreg.services.builds import BuildService
from skyreg.services.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from skyreg.services.images import ImageService
from skyreg.services.inputs import Input
from skyreg.services.machines import MachineService
from skyreg.services.orgs import OrgService
from skyreg.services.prefetch import PrefetchService
from skyreg.services.quotas import QuotaService
from skyreg.services.releases import DEFAULT_REGION, ReleaseService
from skyreg.services.retention import RetentionService
from skyreg.services.scans import ScanService
from skyreg.services.secrets import SecretKeyRing, SecretService
from skyreg.services.tokens import TokenService
from skyreg.services.webhooks import WebhookService

log = logging.getLogger("skyreg.platform")

PREFIX = "/api/v1"
BODY_METHODS = frozenset({"POST", "PATCH", "PUT"})  # requests whose body the endpoint reads
AUDITED_METHODS = BODY_METHODS | {"DELETE"}  # calls that change something: audited

In = TypeVar("In", bound=Input)


@dataclass
class Services:
    """Everything the handlers call: one service per resource, over the process's stores."""

    auth: Authenticator
    orgs: OrgService
    apps: AppService
    tokens: TokenService
    images: ImageService
    machines: MachineService
    releases: ReleaseService
    retention: RetentionService
    quotas: QuotaService
    builds: BuildService
    secrets: SecretService
    prefetch: PrefetchService
    openapi: bytes = b""  # the generated document, encoded once
    audit: AuditMeta | None = None  # None: no audit log (set by `over`)
    webhooks: WebhookService = field(init=False)  # set by `over`
    webhook_allow_private: bool = False  # webhook targets on loopback/private addresses allowed
    scan_service: ScanService | None = None  # None: no registry in this process (no blobs)

    @property
    def scans(self) -> ScanService:
        if self.scan_service is None:
            raise Unavailable("image scans are not served here")
        return self.scan_service

    @classmethod
    def over(
        cls,
        auth: Authenticator,
        releases: ReleaseService,
        secret_keys: Callable[[], MasterKeys],
    ) -> Services:
        """The services over the stores `releases` holds (one `Database`); app secrets use the
        master keys `secret_keys` loads (`server/process.py` says from where)."""
        retention = RetentionMeta(releases.platform.db)
        # Untagged manifests wait the registry's review delay unless a policy says otherwise.
        retention.review_delay = releases.registry.gc.review_delay
        services = cls(
            auth=auth,
            orgs=OrgService(releases.platform),
            apps=AppService(releases.platform, releases.geo),
            tokens=TokenService(auth),
            images=ImageService(releases.platform, releases.registry, releases.geo),
            machines=MachineService(
                releases.machines, releases.platform, releases.policy, releases.limits
            ),
            releases=releases,
            retention=RetentionService(releases.platform, retention),
            quotas=QuotaService(releases.platform, QuotaMeta(releases.platform.db)),
            builds=BuildService(
                BuildMeta(releases.platform.db),
                releases.platform,
                releases.registry,
                releases.policy,
                auth,
                region=DEFAULT_REGION if releases.geo is None else releases.geo.region,
            ),
            prefetch=PrefetchService(releases.platform, releases.registry),
            secrets=SecretService(
                SecretMeta(releases.platform.db),
                releases.platform,
                releases.machines,
                releases.policy,
                releases,
                SecretKeyRing(secret_keys),
            ),
        )
        services.audit = AuditMeta(releases.platform.db)
        services.webhooks = WebhookService(WebhookMeta(releases.platform.db), releases.platform)
        return services


SERVICES_KEY = web.AppKey("management_services", Services)


def bad_request(message: str) -> ApiError:
    """400 bad_request."""
    return ApiError(400, "bad_request", message)


def not_found(kind: str, name: str) -> ApiError:
    """The same answer for a resource that does not exist and one the caller may not see."""
    return ApiError(404, "not_found", f"{kind} {name[:100]!r} not found")


UNAUTHENTICATED = ApiError(
    401,
    "unauthorized",
    AUTHENTICATION_REQUIRED,
    headers={"WWW-Authenticate": 'Bearer realm="skyreg"'},
)


def refusal(error: ServiceError) -> ApiError:
    """A service's domain error as the API answers it."""
    if isinstance(error, Unauthenticated):
        return UNAUTHENTICATED
    if isinstance(error, NotFound):
        return not_found(error.kind, error.name)
    if isinstance(error, Forbidden):
        return ApiError(403, "forbidden", error.reason)
    if isinstance(error, Conflict):
        return ApiError(409, "conflict", error.reason)
    if isinstance(error, Unavailable):
        return ApiError(503, "unavailable", error.reason)
    return bad_request(error.reason)  # Invalid, LimitExceeded


class Call:
    """One API request: the caller's token (None: anonymous), its body, its parameters."""

    def __init__(self, request: web.Request, services: Services) -> None:
        self.request = request
        self.services = services
        self.token: TokenRecord | None = None
        self._raw: bytes | None = None
        self._limit = MAX_BODY
        self._body_error: ApiError | RequestPayloadError | None = None
        self._doc: Any = None  # the body as `body` parsed it (kept for the audit entry)

    async def identify(self) -> None:
        """Look up the Authorization header's token; 401 when wrong, 429 when throttled."""
        identifier = Identifier(self.request, self.services.auth)
        self.token = await self.services.auth.platform.read(identifier.identify)

    def caller(self) -> TokenRecord:
        """The caller's token; 401 for anonymous callers."""
        if self.token is None:
            raise UNAUTHENTICATED
        return self.token

    def path(self, name: str) -> str:
        """A path parameter."""
        return self.request.match_info[name]

    def path_params(self) -> dict[str, str]:
        """Every path parameter (what the audit entry names)."""
        return dict(self.request.match_info)

    def target(self) -> str:
        """What the audit entry says was called."""
        return f"{self.request.method} {self.request.path}"

    def query(self, name: str) -> str | None:
        """A query parameter (None when absent)."""
        return self.request.query.get(name)

    def query_int(self, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT) -> int:
        """The integer query parameter `name` (`default` when absent); 400 unless in bounds."""
        raw = self.query(name)
        if raw is None:
            return default
        try:
            return parse_int(raw, minimum=minimum, maximum=maximum)
        except ValueError as e:
            raise bad_request(f"{name} {e}") from None

    async def read_body(self, limit: int = MAX_BODY) -> None:
        """Read the body (at most `limit` bytes) on the event loop; a too-large or unreadable
        one is kept and raised by `body`, after the handler's earlier checks."""
        self._limit = limit
        try:
            self._raw = await read_body(self.request, limit)
        except (ApiError, RequestPayloadError) as e:
            self._body_error = e

    def body(self, model: type[In]) -> In:
        """The request body decoded into `model` ({} for an empty body): 400 for bad JSON, a
        wrong JSON type or an unknown field (msgspec's message), 413 for a body too large."""
        if self._body_error is not None:
            raise self._body_error
        raw = self._raw
        if raw is None:
            raise RuntimeError(f"the body of a {self.request.method} request is not read")
        doc: Any = {}
        if raw.strip():
            try:
                doc = load_json(raw, max_bytes=self._limit)  # depth, NUL, surrogates bounded
            except JSONInputError as e:
                raise bad_request(f"the request body is not valid JSON: {e}") from None
        self._doc = doc
        if not isinstance(doc, dict):
            raise bad_request("the request body must be a JSON object")
        try:
            return msgspec.convert(doc, model)
        except msgspec.ValidationError as e:
            raise bad_request(str(e)[:300]) from None

    def parsed_body(self) -> Any:
        """The body as JSON, parsed once (by `body`, else here); None when it was not read or
        is not JSON."""
        if self._doc is None and self._raw is not None and self._raw.strip():
            try:
                self._doc = load_json(self._raw, max_bytes=self._limit)
            except JSONInputError:
                return None
        return self._doc

    def lazy_body(self, model: type[In]) -> Callable[[], In]:
        """`body`, for a service that asks for it once its earlier checks pass."""
        return lambda: self.body(model)


Reply = msgspec.Struct | bytes
Handler = Callable[[Call], Awaitable[Reply]]
Security = Literal["token", "optional", "none"]


@dataclass(frozen=True)
class Param:
    """A query parameter, as the document describes it (handlers parse it themselves)."""

    name: str
    schema: dict[str, Any]
    description: str | None = None


PATH_PARAMETERS = {
    "webhook_id": "Webhook id",
    "delivery_id": "Delivery id (of the webhook's deliveries)",
    "app": "App name",
    "org": "Organization name",
    "token_id": "Token id",
    "machine_id": "Machine id",
    "reference": "TAG, DIGEST, APP:TAG or APP@DIGEST of the app's repository",
    "build_id": "Build id",
    "builder_id": "Builder id (what `POST /builders` answered)",
}


@dataclass(frozen=True)
class Route:
    """One operation: what the router serves and the OpenAPI document says, in one place.

    `response` is the Struct of the `status` answer (None: any JSON object); `errors` the
    refusal statuses it may answer besides 401/429 (413 is added for a `request` body);
    `security`: "token" (required), "optional" (public resources answer anonymous callers),
    "none" (no identification at all).
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    response: type[msgspec.Struct] | None
    status: int = 200
    request: type[Input] | None = None
    errors: tuple[int, ...] = ()
    query: tuple[Param, ...] = ()
    security: Security = "token"
    description: str | None = None
    response_description: str = "OK"
    max_body: int = MAX_BODY  # bytes of a request body (more: 413)
    streams_body: bool = False  # the handler reads the body itself, after identifying the caller
    # Mutating calls leave an audit entry; not agents' and builders' own reports (machine
    # telemetry, many a second), marked `x-skyreg-audited: false` in the document.
    audited: bool = True


_HEADERS = {"Cache-Control": "no-store"}


def _answer(route: Route, reply: Reply) -> web.Response:
    if route.status == 204:  # No Content: the handler's reply is not sent
        return web.Response(status=204, headers=_HEADERS)
    if isinstance(reply, bytes):
        return web.Response(body=reply, content_type="application/json")
    return web.Response(
        body=msgspec.json.encode(reply),
        status=route.status,
        content_type="application/json",
        headers=_HEADERS,
    )


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


RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def endpoint(routes: dict[str, Route]) -> RequestHandler:
    """The aiohttp handler of one path: its routes by method (405 for others)."""
    allow = ", ".join(sorted(routes))

    async def serve(request: web.Request) -> web.StreamResponse:
        route = routes.get(request.method)
        if route is None:
            return ApiError(
                405,
                "method_not_allowed",
                f"{request.method} is not supported here",
                headers={"Allow": allow},
            ).response()
        call = Call(request, request.app[SERVICES_KEY])
        response = await _serve_call(route, call)
        if route.audited and request.method in AUDITED_METHODS:
            await audit_call(call, route, response.status)
        return response

    return serve


async def _serve_call(route: Route, call: Call) -> web.StreamResponse:
    request = call.request
    try:
        _refuse_unstorable_parameters(request)
        if request.method in BODY_METHODS and not route.streams_body:
            await call.read_body(route.max_body)
        if route.security != "none":
            await call.identify()
        return _answer(route, await route.handler(call))
    except ServiceError as e:
        return refusal(e).response()
    except ApiError as err:
        return err.response()
    except RequestPayloadError as e:  # a body the client mis-encoded (say, "gzip" that is not)
        return bad_request(f"unreadable request body: {e}"[:300]).response()
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


_PATH_NAMES = {
    "org": "org",
    "app": "app",
    "machine_id": "machine",
    "build_id": "build",
    "builder_id": "builder",
    "token_id": "token",
}
_CREATED_NAMES = {"createOrg": "org", "createApp": "app"}  # the body's `name` is what it made


def _audit_names(call: Call, route: Route) -> dict[str, str]:
    """What the call named, by kind: its path parameters and the body's `org`/`app`/`name`."""
    names = {
        _PATH_NAMES[key]: value for key, value in call.path_params().items() if key in _PATH_NAMES
    }
    doc = call.parsed_body()
    if isinstance(doc, dict):
        for key in ("org", "app"):
            if isinstance(doc.get(key), str) and key not in names:
                names[key] = doc[key][:200]
        created = _CREATED_NAMES.get(route.operation_id)
        if created and isinstance(doc.get("name"), str):
            names[created] = doc["name"][:200]
    return names


async def audit_call(call: Call, route: Route, status: int) -> None:
    """Append the call's audit entry; a failure to is logged, never the caller's problem (the
    action already happened)."""
    token = call.token
    if token is None and not call.services.auth.audit_anonymous(call.request.remote or ""):
        return
    entry = AuditEntry(
        action=route.operation_id,
        target=call.target(),
        client=call.request.remote or "unknown",
        status=status,
        actor_id=token.id if token else None,
        actor_name=token.name if token else None,
        actor_kind=token.kind if token else None,
        actor_org_id=token.org_id if token else None,
        names=_audit_names(call, route),
    )
    audit = call.services.audit
    if audit is None:
        return
    try:
        await audit.run(audit.record, entry)
    except Exception as e:
        request = call.request
        if database_unreachable(e) or disk_full(e):  # the outage is logged once, elsewhere
            log.debug("audit entry of %s %s not written: %s", request.method, request.path, e)
        else:
            log.exception("audit entry of %s %s not written", request.method, request.path)


async def no_endpoint(request: web.Request) -> web.StreamResponse:
    """404 for a path under /api/v1 that nothing serves."""
    return ApiError(404, "not_found", f"no endpoint at {request.path[:200]}").response()
