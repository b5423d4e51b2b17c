"""Apps: listing, creating (by name or a generated one), showing and changing them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skyreg.meta.platform import AlreadyExists, App, PlatformMeta, TokenRecord
from skyreg.services.access import may_manage, org_or_own, visible_app
from skyreg.services.errors import Conflict, Forbidden, Invalid
from skyreg.services.inputs import UNSET, Body, CreateApp, UpdateApp, given
from skyreg.services.names import generate_app_name, is_dns_label
from skyreg.services.orgs import NAME_INVALID
from skyreg.services.releases import check_service

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

log = logging.getLogger("skyreg.services")

GENERATE_ATTEMPTS = 20


@dataclass(frozen=True)
class AppView:
    """An app and, in a multi-region registry, its placement (regions, replicate ahead)."""

    app: App
    placement: tuple[list[str], bool] | None = None


@dataclass
class AppService:
    """Apps over `PlatformMeta` (and the placement tables of a multi-region registry)."""

    platform: PlatformMeta
    geo: GeoNode | None = None

    async def list_apps(self, caller: TokenRecord, org: str | None) -> list[App]:
        """The apps of `org` (default: the caller's own; an admin naming none: every app)."""
        return await self.platform.read(self._list_apps, caller, org)

    def _list_apps(self, caller: TokenRecord, org_name: str | None) -> list[App]:
        org = org_or_own(self.platform, caller, org_name)
        return self.platform.list_apps(None if org is None else org.id)

    async def create_app(self, caller: TokenRecord, body: Body[CreateApp]) -> App:
        """A new app in `body.org` (default: the caller's) by an admin or an org token of
        that org; its name given or generated (adjective-noun-NNNN). Other token kinds are
        Forbidden whatever the body."""
        if caller.kind not in ("admin", "org"):
            raise Forbidden(f"a {caller.kind} token may not create apps")
        return await self.platform.run(self._create_app, caller, body)

    def _create_app(self, caller: TokenRecord, lazy: Body[CreateApp]) -> App:
        body = given(lazy)
        org = org_or_own(self.platform, caller, body.org)
        if org is None:
            raise Invalid("org is required")
        if not may_manage(caller, org.id):
            raise Forbidden(f"a {caller.kind} token may not create apps")
        name = body.name
        if body.generate_name == (name is not None):
            raise Invalid("give either a name or generate_name: true")
        if name is None:
            for _ in range(GENERATE_ATTEMPTS):
                name = generate_app_name()
                try:
                    self.platform.create_app(name, org.id, public=body.public)
                    break
                except AlreadyExists:
                    continue
            else:
                raise Conflict("could not generate an unused app name; try again")
        else:
            if not is_dns_label(name):
                raise Invalid(NAME_INVALID)
            try:
                self.platform.create_app(name, org.id, public=body.public)
            except AlreadyExists:
                raise Conflict(f"app name {name!r} is taken") from None
        app = self.platform.get_app(name)
        assert app is not None
        log.info("app %s created in %s by token %s", name, org.name, caller.id)
        return app

    async def get_app(self, caller: TokenRecord | None, name: str) -> AppView:
        """An app the caller sees (public apps: anyone), with its placement."""
        return await self.platform.read(self._get_app, caller, name)

    def _get_app(self, caller: TokenRecord | None, name: str) -> AppView:
        return self._view(visible_app(self.platform, caller, name, public_ok=True))

    def _view(self, app: App) -> AppView:
        if self.geo is None:
            return AppView(app)
        return AppView(app, self.geo.meta.app_placement(app.name) or ([], False))

    async def update_app(self, caller: TokenRecord, name: str, body: Body[UpdateApp]) -> AppView:
        """Change an app's public flag, placement and service (an admin, or an org token of
        its org; others get NotFound or Forbidden before the body is looked at)."""
        return await self.platform.run(self._update_app, caller, name, body)

    def _update_app(self, caller: TokenRecord, name: str, lazy: Body[UpdateApp]) -> AppView:
        app = visible_app(self.platform, caller, name, public_ok=True)
        if not may_manage(caller, app.org_id):
            raise Forbidden("only an admin or org token of the app's organization may change it")
        body = given(lazy)
        placement = self._placement_change(app.name, body)
        service = body.service
        checked = None if service is UNSET or service is None else check_service(service)
        if service is not UNSET:  # takes effect with the app's next release
            self.platform.set_app_service(app.name, checked)
        if body.public is not UNSET:
            self.platform.set_app_public(app.name, body.public)
        if placement is not None and self.geo is not None:
            self.geo.meta.set_app_placement(app.name, *placement)
        updated = self.platform.get_app(app.name)
        assert updated is not None
        return self._view(updated)

    def _placement_change(self, app: str, body: UpdateApp) -> tuple[list[str], bool] | None:
        """The new (regions, replicate_ahead) a change asks for, validated; None: unchanged."""
        if body.regions is UNSET and body.replicate_ahead is UNSET:
            return None
        geo = self.geo
        if geo is None:
            raise Invalid("this registry has one region: regions cannot be set")
        regions, ahead = geo.meta.app_placement(app) or ([], False)
        if body.regions is not UNSET:
            absent = sorted(r for r in set(body.regions) if not geo.regions.knows(r))
            if absent:
                known = ", ".join(geo.regions.codes)
                raise Invalid(f"unknown region(s) {', '.join(absent)}; regions: {known}")
            regions = sorted(set(body.regions))
        if body.replicate_ahead is not UNSET:
            ahead = body.replicate_ahead
        return regions, ahead
