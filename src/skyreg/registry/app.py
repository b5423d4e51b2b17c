"""The OCI distribution API on an aiohttp application: routing below /v2/, errors as spec
JSON, upload expiry. `skyreg.server` makes the application and mounts the rest beside it."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.http import IDENTITY_KEY, identify, unauthorized
from skyreg.auth.policy import DELETE, PULL, PUSH
from skyreg.geo.errors import BlobNotInRegion, GeoRefused, RegionsUnavailable
from skyreg.meta.audit import AuditEntry, AuditMeta
from skyreg.meta.db import disk_full
from skyreg.meta.db import unreachable as database_unreachable
from skyreg.meta.errors import BlobSizeMismatch, ManifestInUse, MetaRefused, ReferenceMissing
from skyreg.oci.bounded import storable
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.oci.names import validate_name
from skyreg.registry import blobs, discovery, manifests
from skyreg.registry.context import REGISTRY_KEY, Registry
from skyreg.registry.forwarded import Network, forwarded_middleware
from skyreg.registry.routing import METHODS, Endpoint, match_route
from skyreg.store.base import StorageFull, StorageUnavailable
from skyreg.workers import PeriodicWorker

log = logging.getLogger("skyreg.registry")

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")

Handler = Callable[[web.Request, str, str], Awaitable[web.StreamResponse]]

_HANDLERS: dict[tuple[Endpoint, str], Handler] = {
    (Endpoint.CATALOG, "GET"): discovery.catalog,
    (Endpoint.TAGS, "GET"): discovery.list_tags,
    (Endpoint.REFERRERS, "GET"): discovery.referrers,
    (Endpoint.UPLOAD_START, "POST"): blobs.start_upload,
    (Endpoint.BLOB, "GET"): blobs.get_blob,
    (Endpoint.BLOB, "HEAD"): blobs.get_blob,
    (Endpoint.BLOB, "DELETE"): blobs.delete_blob,
    (Endpoint.MANIFEST, "GET"): manifests.get_manifest,
    (Endpoint.MANIFEST, "HEAD"): manifests.get_manifest,
    (Endpoint.MANIFEST, "PUT"): manifests.put_manifest,
    (Endpoint.MANIFEST, "DELETE"): manifests.delete_manifest,
}
for _method in ("GET", "HEAD", "PATCH", "PUT", "DELETE"):
    _HANDLERS[(Endpoint.UPLOAD, _method)] = blobs.upload_session
for _endpoint in (Endpoint.CATALOG, Endpoint.TAGS, Endpoint.REFERRERS):
    _HANDLERS[(_endpoint, "HEAD")] = _HANDLERS[(_endpoint, "GET")]


# Every query parameter a handler reads, and the code refusing a value no database stores.
_QUERY_CODES = {
    "last": ErrorCode.TAG_INVALID,  # NAME_INVALID on the catalog
    "artifactType": ErrorCode.MANIFEST_INVALID,
    "tag": ErrorCode.TAG_INVALID,
    "from": ErrorCode.NAME_INVALID,
    "mount": ErrorCode.DIGEST_INVALID,
    "digest": ErrorCode.DIGEST_INVALID,
    "n": ErrorCode.PAGINATION_NUMBER_INVALID,
}


def _refuse_unstorable_query(request: web.Request, endpoint: Endpoint) -> None:
    """400 for a query parameter holding NUL or a lone surrogate, before any handler compares
    it with a column (PostgreSQL refuses such text; no driver encodes a lone surrogate)."""
    for key, value in request.query.items():
        code = _QUERY_CODES.get(key)
        if code is None or storable(value):
            continue
        if key == "last" and endpoint is Endpoint.CATALOG:
            code = ErrorCode.NAME_INVALID
        raise RegistryError(code, f"{key} must not contain NUL or a lone surrogate")


def _error_response(err: RegistryError, method: str) -> web.Response:
    body = b"" if method == "HEAD" else err.body()
    resp = web.Response(status=err.status, body=body, headers=err.headers)
    resp.content_type = "application/json"
    return resp


def _refusal_answer(error: MetaRefused | GeoRefused) -> RegistryError:
    """The one table giving meta/'s and geo/'s domain errors their wire shape."""
    message = str(error)
    match error:
        case ReferenceMissing():
            return RegistryError(
                ErrorCode.MANIFEST_BLOB_UNKNOWN, message, {"digests": list(error.missing)}
            )
        case BlobSizeMismatch():
            return RegistryError(ErrorCode.MANIFEST_INVALID, message)
        case ManifestInUse():
            detail = {"digest": error.digest, "referenced_by": error.referenced_by}
            return RegistryError(ErrorCode.DENIED, message, detail, status=409)
        case BlobNotInRegion():
            return RegistryError(ErrorCode.BLOB_UNKNOWN, message, {"digest": error.digest})
        case RegionsUnavailable():
            return RegistryError(ErrorCode.UNAVAILABLE, message, {"digest": error.digest})
    raise TypeError(f"no answer for {type(error).__name__}")  # a new refusal needs its row


def _out_of_space(error: BaseException) -> bool:
    """A write refused for lack of space: by the blob store, the database, or any file write."""
    return (
        isinstance(error, StorageFull)
        or (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT))
        or disk_full(error)
    )


# When a client should try again after a backend (blob store, database) was out of reach: about
# a restart's length. Each backend logs its outage itself, once (S3BlobStore, meta.db).
_RETRY_AFTER = "5"


def _unreachable_answer(error: BaseException) -> RegistryError | None:
    """503 UNAVAILABLE + Retry-After when `error` is a backend out of reach, else None."""
    if isinstance(error, StorageUnavailable):
        backend = "storage"
    elif database_unreachable(error):
        backend = "database"
    else:
        return None
    return RegistryError(
        ErrorCode.UNAVAILABLE,
        f"registry {backend} is unreachable: retry later",
        headers={"Retry-After": _RETRY_AFTER},
    )


class _StorageCondition:
    """Full storage is logged as a condition, when it starts and when it ends, not per request:
    this process saw a write fail for lack of space, and no write has succeeded since."""

    full = False

    @classmethod
    def failed(cls, error: BaseException) -> None:
        if not cls.full:
            cls.full = True
            log.warning("storage full: pushes answer 507 until space is freed (%s)", error)

    @classmethod
    def stored(cls) -> None:
        if cls.full:
            cls.full = False
            log.info("storage has space again: pushes succeed")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into the spec's JSON error body; never let a request crash."""
    try:
        resp = await handler(request)
    except RegistryError as err:
        resp = _error_response(err, request.method)
    except (MetaRefused, GeoRefused) as err:
        resp = _error_response(_refusal_answer(err), request.method)
    except web.HTTPRequestEntityTooLarge:
        resp = _error_response(
            RegistryError(ErrorCode.SIZE_INVALID, "request body too large", status=413),
            request.method,
        )
    except web.HTTPException:
        raise
    except RequestPayloadError as e:  # a body the client mis-encoded (say, "gzip" that is not)
        resp = _error_response(
            RegistryError(ErrorCode.UNSUPPORTED, f"unreadable request body: {e}"[:300], status=400),
            request.method,
        )
    except (ConnectionError, asyncio.CancelledError) as e:
        transport = request.transport
        if isinstance(e, asyncio.CancelledError) or transport is None or transport.is_closing():
            raise  # the client is gone: nothing to answer (GuardedRequestHandler.handle_error)
        # A connection of ours (S3, another region) broke while the client waits: a 500.
        log.exception("lost a connection in %s %s", request.method, request.path)
        resp = _error_response(RegistryError(ErrorCode.UNKNOWN), request.method)
    except Exception as e:
        unreachable = _unreachable_answer(e)
        if _out_of_space(e):
            _StorageCondition.failed(e)
            resp = _error_response(RegistryError(ErrorCode.STORAGE_FULL), request.method)
        elif unreachable is not None:
            resp = _error_response(unreachable, request.method)
        else:
            log.exception("unhandled error in %s %s", request.method, request.path)
            resp = _error_response(RegistryError(ErrorCode.UNKNOWN), request.method)
    else:
        # Bytes or a manifest stored (201), or a chunk appended (PATCH 202): space is back.
        # Opening an upload proves nothing (an empty file and a row may still fit).
        if resp.status == 201 or (resp.status == 202 and request.method == "PATCH"):
            _StorageCondition.stored()
    resp.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    return resp


_ACTION = {"GET": PULL, "HEAD": PULL, "POST": PUSH, "PATCH": PUSH, "PUT": PUSH, "DELETE": DELETE}
_SCOPE_ACTIONS = {PULL: "pull", PUSH: "pull,push", DELETE: "delete"}


async def _authorize(
    request: web.Request, reg: Registry, endpoint: Endpoint | None, name: str
) -> None:
    """Identify the caller and refuse what it may not do (before the handler looks anything
    up): token and app lookups, so on a database thread."""
    if reg.auth is not None:
        await reg.meta.read(_authorize_now, request, reg, endpoint, name)


def _authorize_now(
    request: web.Request, reg: Registry, endpoint: Endpoint | None, name: str
) -> None:
    auth = reg.auth
    if auth is None:
        return
    identity = identify(request, auth)
    request[IDENTITY_KEY] = identity
    if endpoint is None:  # GET /v2/: any valid credentials, and a challenge for none
        if identity.token is None and identity.via == "anonymous":
            raise unauthorized(request, auth, identity, "")
        return
    if endpoint is Endpoint.CATALOG:
        if not auth.may_list_catalog(identity):
            raise unauthorized(request, auth, identity, "registry:catalog:*")
        return
    action = _ACTION[request.method]
    if action not in auth.actions(identity, name):
        scope = f"repository:{name}:{_SCOPE_ACTIONS[action]}"
        raise unauthorized(
            request, auth, identity, scope, [{"Type": "repository", "Name": name, "Action": action}]
        )


async def _base(request: web.Request) -> web.StreamResponse:
    await _authorize(request, request.app[REGISTRY_KEY], None, "")
    return web.json_response({})


async def _dispatch(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    route = match_route(tail)
    if route is None:
        raise RegistryError(ErrorCode.NOT_FOUND, f"no endpoint at {request.path[:300]}")
    handler = _HANDLERS.get((route.endpoint, request.method))
    if handler is None:
        allowed = ", ".join(sorted(METHODS[route.endpoint]))
        raise RegistryError(
            ErrorCode.UNSUPPORTED,
            f"{request.method} is not supported here",
            headers={"Allow": allowed},
        )
    if route.endpoint is not Endpoint.CATALOG:
        validate_name(route.name)
    reg = request.app[REGISTRY_KEY]
    action = _AUDITED.get((route.endpoint, request.method))
    if reg.audit is None or action is None:
        await _authorize(request, reg, route.endpoint, route.name)
        _refuse_unstorable_query(request, route.endpoint)
        return await handler(request, route.name, route.reference)
    status = 500
    try:
        await _authorize(request, reg, route.endpoint, route.name)
        _refuse_unstorable_query(request, route.endpoint)
        resp = await handler(request, route.name, route.reference)
        status = resp.status
        return resp
    except RegistryError as e:
        status = e.status
        raise
    except MetaRefused:
        status = 400
        raise
    finally:
        await _audit(request, reg.audit, action, route.name, route.reference, status)


# Registry actions in the audit log: pushes and deletions (uploads are recorded by the push of
# the manifest that uses them; pulls are not audited).
_AUDITED = {
    (Endpoint.MANIFEST, "PUT"): "pushManifest",
    (Endpoint.MANIFEST, "DELETE"): "deleteManifest",
    (Endpoint.BLOB, "DELETE"): "deleteBlob",
}


async def _audit(
    request: web.Request, audit: AuditMeta, action: str, name: str, reference: str, status: int
) -> None:
    """Append a registry action's audit entry; a failure to is logged, never the client's."""
    identity = request.get(IDENTITY_KEY)
    token = identity.token if identity is not None else None
    auth = request.app[REGISTRY_KEY].auth
    if token is None and auth is not None and not auth.audit_anonymous(request.remote or ""):
        return
    separator = "@" if ":" in reference else ":"
    entry = AuditEntry(
        action=action,
        target=f"{name}{separator}{reference}",
        client=request.remote or "unknown",
        status=status,
        actor_id=token.id if token else None,
        actor_name=token.name if token else None,
        actor_kind=token.kind if token else None,
        actor_org_id=token.org_id if token else None,
        names={"repository": name},
    )
    try:
        await audit.run(audit.record, entry)
    except Exception as e:
        if database_unreachable(e) or disk_full(e):  # the outage is logged once, elsewhere
            log.debug("audit entry of %s %s not written: %s", request.method, request.path, e)
        else:
            log.exception("audit entry of %s %s not written", request.method, request.path)


def upload_expiry(reg: Registry, interval: float) -> PeriodicWorker:
    """The worker deleting uploads idle longer than the registry's upload TTL (and upload bytes
    with no session as old), every `interval` seconds."""
    return PeriodicWorker("upload_expiry", interval, lambda: _expire_uploads(reg), logger=log)


async def _expire_uploads(reg: Registry) -> None:
    cutoff = datetime.now(UTC) - timedelta(seconds=reg.upload_ttl)
    for upload_id in await reg.meta.read(reg.meta.stale_uploads, cutoff):
        # Never wait for an upload a request is using (a PATCH may trickle for as long as its
        # client keeps sending): it is not abandoned, and waiting would stall every expiry.
        if await reg.store.reclaim(upload_id) is None:
            continue
        await reg.meta.run(reg.meta.delete_upload, upload_id)
        log.info("expired abandoned upload %s", upload_id)
    # Bytes with no session left behind (a crash between the two steps above, or in the middle
    # of a monolithic upload) go once they are as old as an expired upload.
    for upload_id in await reg.store.idle_uploads(cutoff):
        if await reg.meta.read(reg.meta.upload_repository, upload_id) is None:
            if await reg.store.reclaim(upload_id) is None:
                continue
            log.info("removed orphaned upload bytes %s", upload_id)


CLIENT_MAX_SIZE = 8 * 1024 * 1024
"""The whole-body limit of an app serving the registry: blob bodies are streamed, never
buffered, so it only guards read() (manifests, JSON bodies)."""


def middlewares(trusted_proxies: tuple[Network, ...] = ()) -> list[Middleware]:
    """The middlewares of an application serving the registry (and whatever the server mounts
    beside it): errors as the spec's JSON and the API version header (`_errors`), after the
    client address from trusted proxies' X-Forwarded-* headers when there are any."""
    chain: list[Middleware] = [_errors]
    if trusted_proxies:  # first: every later step sees the client, not the proxy
        chain.insert(0, forwarded_middleware(trusted_proxies))
    return chain


def add_routes(app: web.Application, reg: Registry) -> None:
    """Serve the OCI distribution API over `reg` under /v2/ on `app` (made with
    `middlewares(reg.trusted_proxies)` and `CLIENT_MAX_SIZE`); the server runs `upload_expiry`
    beside it."""
    app[REGISTRY_KEY] = reg
    app.router.add_get("/v2/", _base)
    app.router.add_get("/v2", _base)
    app.router.add_route("*", "/v2/{tail:.*}", _dispatch)
