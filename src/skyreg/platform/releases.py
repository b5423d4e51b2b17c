"""Releases over HTTP: the app key of the `ReleaseService`.

Deploying itself is `skyreg.services.releases` (the API's routes: `platform/api/releases.py`);
`DeployLimits` and `deployment_tag` are re-exported for the commands and the server
configuration that name them here.
"""

from __future__ import annotations

from aiohttp import web

from skyreg.services.names import deployment_tag
from skyreg.services.releases import DeployLimits, ReleaseService

__all__ = ["RELEASES_KEY", "DeployLimits", "deployment_tag"]

RELEASES_KEY = web.AppKey("releases", ReleaseService)
