"""Setting up orgs, apps and tokens for tests, straight in a running registry's database."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import requests

from skyreg.auth.keys import KeyRing
from skyreg.auth.service import Authenticator
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.registry import open_database


class Served(Protocol):
    """A running registry, whatever runs it (its base URL)."""

    @property
    def url(self) -> str: ...


@dataclass
class Tenancy:
    """Direct access to a data dir's platform tables (the server shares the SQLite file)."""

    data_dir: Path

    def _auth(self) -> Authenticator:
        meta = open_database(None, self.data_dir)
        return Authenticator(
            PlatformMeta(meta.engine),
            KeyRing(meta.engine, legacy_dir=self.data_dir / "keys"),
            service="skyreg",
        )

    def org(self, name: str) -> int:
        auth = self._auth()
        try:
            return auth.platform.create_org(name).id
        finally:
            auth.platform.close()

    def app(self, name: str, org: str, public: bool = False) -> int:
        auth = self._auth()
        try:
            org_row = auth.platform.get_org(org)
            assert org_row is not None, org
            auth.platform.create_app(name, org_row.id, public=public)
            app = auth.platform.get_app(name)
            assert app is not None
            return app.id
        finally:
            auth.platform.close()

    def token(
        self,
        kind: str,
        org: str | None = None,
        app: str | None = None,
        expires_in: timedelta | None = None,
    ) -> tuple[str, str]:
        """(secret, token id) of a new token."""
        auth = self._auth()
        try:
            org_id = auth.platform.get_org(org).id if org else None  # type: ignore[union-attr]
            app_id = auth.platform.get_app(app).id if app else None  # type: ignore[union-attr]
            secret, record = auth.create_token(
                kind, org_id=org_id, app_id=app_id, expires_in=expires_in
            )
            return secret, record.id
        finally:
            auth.platform.close()

    def revoke(self, token_id: str) -> None:
        auth = self._auth()
        try:
            assert auth.platform.revoke_token(token_id)
        finally:
            auth.platform.close()

    def admin_secret(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()


def cli_env(workdir: Path, server: str, token: str) -> dict[str, str]:
    """The environment of a `skyreg` command talking to `server` with `token` (own config dir)."""
    return {
        **os.environ,
        "HOME": str(workdir),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "SKYREG_SERVER": server,
        "SKYREG_TOKEN": token,
        "COLUMNS": "250",
    }


def run_skyreg(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run `skyreg ARGS`; its stdout, or a failed assertion with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "skyreg", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def authed(secret: str) -> requests.Session:
    session = requests.Session()
    session.auth = ("x", secret)
    return session


# -- the management API, as tests call it --------------------------------------------------------

API = "/api/v1"


def api(server: Served, method: str, path: str, secret: str | None, **kw: Any) -> requests.Response:
    """`method` on `/api/v1<path>` of `server`, as `secret` (None: anonymous)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return requests.request(method, server.url + API + path, headers=headers, timeout=60, **kw)


def answer(resp: requests.Response, status: int) -> Any:
    """The JSON body of an answer that must have `status` (None for an empty one)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json() if resp.content else None


def refused(resp: requests.Response, status: int, code: str) -> str:
    """The message of a refusal that must have `status` and the error `code`."""
    body = answer(resp, status)
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])
