"""The server's aiohttp application: the OCI API (`/v2/`), the token endpoint, the management
API and GraphQL, and `/metrics` (background workers, garbage collection, replication), under
the registry's middlewares."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from aiohttp import web

from skyreg.auth.http import AUTHENTICATOR_KEY, TOKEN_PATH, client_of, token_endpoint, too_many
from skyreg.auth.service import Authenticator, AuthFailed, Throttled
from skyreg.meta.audit import AuditMeta
from skyreg.meta.lazy import LayerIndexMeta
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.platform.api import add_management_routes
from skyreg.platform.api.base import SERVICES_KEY
from skyreg.platform.webhooks import WebhookSender
from skyreg.registry import CLIENT_MAX_SIZE, add_routes, middlewares
from skyreg.registry.context import Registry
from skyreg.registry.gc import Collector
from skyreg.services.gc import GcService
from skyreg.services.lazyindex import LazyIndexer
from skyreg.web import add_console
from skyreg.workers import PeriodicWorker

BUILD_EXPIRY_INTERVAL = 10.0  # seconds

if TYPE_CHECKING:
    from skyreg.auth.envelope import MasterKeys
    from skyreg.geo.node import GeoNode
    from skyreg.registry.pulls import PullTimes
    from skyreg.services.releases import ReleaseService
    from skyreg.services.scans import ScanService
    from skyreg.workers import Workers


log = logging.getLogger("skyreg.server")


def create_app(
    reg: Registry,
    releases: ReleaseService | None = None,
    *,
    workers: Workers | None = None,
    gc: Collector | None = None,
    gc_worker: bool = True,
    scan_worker: bool = True,
    lazy_index: bool = True,
    audit_days: int = 365,
    webhooks: WebhookSettings | None = None,
    secret_keys: Callable[[], MasterKeys],
) -> web.Application:
    """The application of one worker process over `reg`: the OCI API; with auth, the token
    endpoint and (given `releases`) the management API, whose /gc routes use the process's
    collector `gc` (`gc_worker`: whether `workers` runs it); `/metrics` (an admin token when
    auth is on) with this process's `workers`, garbage collection and, with a region,
    replication; with `lazy_index`, the scan worker also indexes layers for lazy pull.
    `secret_keys` loads the master keys of app secrets. The caller starts and
    stops `workers`. Every route
    answers errors through the registry's middleware (the token endpoint's and `/metrics`'
    answers too)."""
    app = web.Application(
        middlewares=middlewares(reg.trusted_proxies), client_max_size=CLIENT_MAX_SIZE
    )
    add_routes(app, reg)
    if reg.auth is not None:
        app[AUTHENTICATOR_KEY] = reg.auth
        app.router.add_get(TOKEN_PATH, token_endpoint)
        app.router.add_post(TOKEN_PATH, token_endpoint)
        if releases is not None:
            gc_service = None if gc is None else GcService(gc, worker=gc_worker)
            add_management_routes(app, reg.auth, releases, gc_service, secret_keys)
            console_expiry = add_console(app)
            if workers is not None:  # builds whose builder or client went away, and deadlines
                workers.add(
                    PeriodicWorker(
                        "build_expiry", BUILD_EXPIRY_INTERVAL, app[SERVICES_KEY].builds.expire
                    )
                )
                if scan_worker:  # pushed images: packages, files, SBOMs, vulnerabilities
                    scans = app[SERVICES_KEY].scans
                    if lazy_index:  # ... and seekable layer indexes for lazy pull
                        scans.lazy = LazyIndexer(
                            LayerIndexMeta(releases.platform.db),
                            scans.registry,
                            scans.store,
                            stored=scans.stored,
                            copy_ahead=None if reg.geo is None else reg.geo.copy_everywhere,
                        )
                    workers.add(scans.worker())
                audit = app[SERVICES_KEY].audit
                if audit is not None:  # entries past the retention go, hourly
                    workers.add(_audit_expiry(audit, timedelta(days=audit_days)))
                settings = webhooks or WebhookSettings()
                services = app[SERVICES_KEY]
                services.webhook_allow_private = settings.allow_private
                sender = WebhookSender(
                    services.webhooks.meta,
                    services.secrets.keyring.keys,
                    allow_private=settings.allow_private,
                    max_attempts=settings.max_attempts,
                    retry_base=settings.retry_base,
                )
                workers.add(sender.worker())
                workers.add(console_expiry)

                async def close_sender(_app: web.Application) -> None:
                    await sender.aclose()

                app.on_cleanup.append(close_sender)
    if reg.geo is not None:
        app.cleanup_ctx.append(reg.geo.run)
    if reg.geo is not None or workers is not None or gc is not None:
        geo = reg.geo

        async def metrics(request: web.Request) -> web.StreamResponse:
            if reg.auth is not None:
                await reg.meta.run(_require_admin, request, reg.auth)
            services = app.get(SERVICES_KEY)
            scans = None if services is None else services.scan_service
            return await _metrics_response(geo, workers, gc, reg.pulls, scans, reg.auth)

        app.router.add_get("/metrics", metrics)
    return app


@dataclass(frozen=True)
class WebhookSettings:
    """`serve --webhook-*`: targets allowed, attempts, first retry delay."""

    allow_private: bool = False
    max_attempts: int = 8
    retry_base: float = 5.0


def _audit_expiry(audit: AuditMeta, keep: timedelta) -> PeriodicWorker:
    """The worker deleting audit entries older than `keep`, hourly."""

    async def step() -> None:
        while await audit.run(audit.expire, keep):  # a batch at a time
            pass

    return PeriodicWorker("audit_expiry", 3600.0, step, logger=log)


async def _metrics_response(
    geo: GeoNode | None,
    workers: Workers | None,
    gc: Collector | None = None,
    pulls: PullTimes | None = None,
    scans: ScanService | None = None,
    auth: Authenticator | None = None,
) -> web.Response:
    text = await geo.meta.run(geo.metrics) if geo is not None else ""
    if workers is not None:
        text += workers.metrics()
    if gc is not None:
        text += await gc.metrics()
    if pulls is not None:
        text += pulls.metrics()
    if scans is not None:
        text += scans.metrics()
    if auth is not None:
        text += (
            "# HELP skyreg_audit_anonymous_dropped_total Audit entries of calls without a valid "
            "token not written: over the per-client bound.\n"
            "# TYPE skyreg_audit_anonymous_dropped_total counter\n"
            f"skyreg_audit_anonymous_dropped_total {auth.anonymous_audit_dropped}\n"
        )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _require_admin(request: web.Request, auth: Authenticator) -> None:
    """Metrics describe every tenant's traffic: only an admin access token reads them here, as
    Basic or as Bearer (a scraper's bearer token). Registry JWTs are not access tokens, whatever
    token they were made from."""
    header = request.headers.get("Authorization")
    if not header:
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "metrics need an admin token",
            headers={"WWW-Authenticate": 'Basic realm="skyreg metrics"'},
        )
    try:
        token = auth.limited(client_of(request), lambda: auth.access_token(header))
    except Throttled as e:
        raise too_many(e.retry_after) from None
    except AuthFailed:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "invalid, expired or revoked token") from None
    if token.kind != "admin":
        raise RegistryError(ErrorCode.DENIED, "metrics need an admin token")


def metrics_app(
    geo: GeoNode | None,
    workers: Workers | None = None,
    gc: Collector | None = None,
    pulls: PullTimes | None = None,
) -> web.Application:
    """`/metrics` alone, for `serve --metrics-address`: an address only the operator's scraper
    reaches, so no token is asked."""
    app = web.Application(middlewares=middlewares())

    async def metrics(_request: web.Request) -> web.StreamResponse:
        return await _metrics_response(geo, workers, gc, pulls)

    app.router.add_get("/metrics", metrics)
    return app
