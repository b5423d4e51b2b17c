"""A skyreg served in-process (tests/support/inprocess.py) with authentication on, on each backing
(SQLite + filesystem, PostgreSQL + S3), for the module fixtures of the security tests that run
against both."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import requests

from tests.support.inprocess import InProcessRegistry, environment, serve_options
from tests.support.servers import scaleout_backing


def start_on_backing(
    request: pytest.FixtureRequest, stack: contextlib.ExitStack, data_dir: Path
) -> tuple[InProcessRegistry, str]:
    """Start a server with auth on, on the backing `request.param` names (one of BACKINGS);
    `stack` stops it and drops the backing. Returns the server and its admin token."""
    options: dict[str, object] = {}
    if request.param == "s3+postgresql":
        args, env = stack.enter_context(scaleout_backing(request))
        options = serve_options(args)
        stack.enter_context(environment(env))
    reg = InProcessRegistry(data_dir=data_dir, options=options)
    stack.callback(reg.stop)
    reg.start()
    return reg, (reg.data_dir / "admin-token").read_text().strip()


def create_org_and_app(http: requests.Session, url: str, org: str, app: str) -> None:
    """Create `org` and `app` in it through the management API (works on either database)."""
    for path, body in [("orgs", {"name": org}), ("apps", {"name": app, "org": org})]:
        resp = http.post(f"{url}/api/v1/{path}", json=body)
        assert resp.status_code == 201, resp.text
