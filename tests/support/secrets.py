"""App secrets as tests drive them: a registry served in-process, a tenant (an org, an app and
its tokens), setting and unsetting values, deploying, and playing the region agent that reports
a machine starting and asks for its values."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, authed

KINDS = ("org", "deploy", "readonly", "agent")


class Hosted(Protocol):
    """A running registry on this host: its base URL, `host:port` and data dir."""

    @property
    def url(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...


@contextmanager
def running_registry(data_dir: Path) -> Iterator[InProcessRegistry]:
    """A registry served in-process on `data_dir`, stopped on the way out."""
    reg = InProcessRegistry(data_dir=data_dir)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Tenant:
    """An org with one app, the registry's admin secret and the org's tokens."""

    org: str
    app: str
    admin: str
    tokens: dict[str, str]  # kind -> secret: org, deploy (of the app), readonly, agent
    token_ids: dict[str, str]  # kind -> token id


def make_tenant(reg: Hosted, public: bool = False, kinds: Sequence[str] = KINDS) -> Tenant:
    """A new org and app in `reg`'s database, with a token of each of `kinds` (a deploy token is
    the app's, the others the org's)."""
    t = Tenancy(reg.data_dir)
    org, app = f"org-{uuid.uuid4().hex[:10]}", f"app-{uuid.uuid4().hex[:10]}"
    t.org(org)
    t.app(app, org, public=public)
    made = {kind: t.token(kind, org=org, app=app if kind == "deploy" else None) for kind in kinds}
    return Tenant(
        org,
        app,
        t.admin_secret(),
        {k: v[0] for k, v in made.items()},
        {k: v[1] for k, v in made.items()},
    )


def set_secrets(
    reg: Hosted, app: str, token: str, values: dict[str, str], **kw: Any
) -> requests.Response:
    """Set `values` on `app` as `token`; `kw` are further body fields (`stage=True`)."""
    return api(reg, "POST", f"/apps/{app}/secrets", token, json={"secrets": values, **kw})


def unset_secrets(
    reg: Hosted, app: str, token: str, names: list[str], **kw: Any
) -> requests.Response:
    """Unset `names` on `app` as `token`; `kw` are further body fields."""
    return api(reg, "POST", f"/apps/{app}/secrets/unset", token, json={"names": names, **kw})


def deploy(reg: Hosted, tenant: Tenant, tag: str = "v1") -> dict[str, Any]:
    """Push an image to the app and release it (its machines are created, desired started)."""
    push_image(reg.url, tenant.app, tag, session=authed(tenant.tokens["org"]))
    body = {"image": f"{reg.host}/{tenant.app}:{tag}"}
    resp = api(reg, "POST", f"/apps/{tenant.app}/releases", tenant.tokens["org"], json=body)
    return dict(answer(resp, 201))


def report_state(reg: Hosted, token: str, machine_id: str, state: str) -> None:
    """Report the machine in `state` as `token` (the agent), which must be accepted."""
    body = {"state": state}
    answer(api(reg, "POST", f"/agent/machines/{machine_id}/state", token, json=body), 200)


def machine_secrets(reg: Hosted, token: str, machine_id: str, generation: int) -> requests.Response:
    """Ask for the values of the machine's `generation` as `token` (the agent path)."""
    body = {"generation": generation}
    return api(reg, "POST", f"/agent/machines/{machine_id}/secrets", token, json=body)


def registry_token(reg: Hosted, secret: str, scope: str) -> str:
    """A registry token for `scope` from the token endpoint, as `secret` (what was granted,
    maybe nothing)."""
    resp = requests.get(
        f"{reg.url}/auth/token",
        params={"service": "skyreg", "scope": scope},
        auth=("x", secret),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["token"])
