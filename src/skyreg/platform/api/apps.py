"""`/apps` and `/apps/{app}`: list, create, show, change."""

from __future__ import annotations

from msgspec import UNSET

from skyreg.meta.platform import App as AppRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route
from skyreg.platform.api.tokens import ORG_PARAM
from skyreg.services.apps import AppView
from skyreg.services.inputs import CreateApp, UpdateApp


def app_model(app: AppRecord, placement: tuple[list[str], bool] | None = None) -> models.App:
    """An app as the API shows it (with its placement in a multi-region registry)."""
    regions, ahead = placement if placement is not None else (UNSET, UNSET)
    return models.App(
        name=app.name,
        org=app.org_name,
        public=app.public,
        created_at=models.time(app.created_at),
        regions=regions,
        replicate_ahead=ahead,
        service=models.service(app.service),
    )


def _view(view: AppView) -> models.App:
    return app_model(view.app, view.placement)


async def list_apps(call: Call) -> models.AppList:
    """The apps of an org."""
    apps = await call.services.apps.list_apps(call.caller(), call.query("org"))
    return models.AppList(apps=[app_model(a) for a in apps])


async def create_app(call: Call) -> models.App:
    """A new app."""
    caller = call.caller()
    return app_model(await call.services.apps.create_app(caller, call.lazy_body(CreateApp)))


async def get_app(call: Call) -> models.App:
    """An app (public apps: anyone)."""
    return _view(await call.services.apps.get_app(call.token, call.path("app")))


async def update_app(call: Call) -> models.App:
    """Change an app's public flag, placement or service."""
    caller = call.caller()
    body = call.lazy_body(UpdateApp)
    return _view(await call.services.apps.update_app(caller, call.path("app"), body))


ROUTES = [
    Route(
        "GET", "/apps", list_apps, "listApps", "List the apps of an organization",
        models.AppList, errors=(404,), query=(ORG_PARAM,), response_description="Apps",
    ),
    Route(
        "POST", "/apps", create_app, "createApp",
        "Create an app (admin, or an org token of the organization)", models.App, status=201,
        request=CreateApp, errors=(400, 403, 404, 409),
        description="App names are globally unique DNS labels. With `generate_name: true` the "
        "server picks a readable unused name (adjective-noun-NNNN).",
        response_description="Created",
    ),
    Route(
        "GET", "/apps/{app}", get_app, "getApp", "An app (public apps: anyone)", models.App,
        errors=(404,), security="optional", response_description="The app",
    ),
    Route(
        "PATCH", "/apps/{app}", update_app, "updateApp",
        "Change an app (admin, or an org token of its organization)", models.App,
        request=UpdateApp, errors=(400, 403, 404),
        description="`service` (null: none) takes effect with the app's next release.",
        response_description="The updated app",
    ),
]  # fmt: skip
