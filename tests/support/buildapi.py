"""Driving the builds API as a client and as a builder host over HTTP (tests of the API, its
attacks and `skyreg builds`)."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any

import requests
import sqlalchemy
from nacl.public import PrivateKey

from skyreg.auth.keys import KeyRing
from skyreg.auth.policy import AccessPolicy
from skyreg.auth.service import Authenticator
from skyreg.client.sealing import new_private_key, public_key_b64
from skyreg.meta import schema
from skyreg.meta.builds import BuildMeta
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.registry import open_database
from skyreg.services.builds import BuildService
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_blob
from tests.support.platform import Tenancy, answer, api, authed

DIGEST = "sha256:" + "ab" * 32


@dataclass
class Tenant:
    org: str
    app: str
    tokens: dict[str, str]  # kind -> secret: org, deploy, readonly


@dataclass
class BuilderHost:
    """A builder host as the test plays it: its id, the token that registered it, its key."""

    id: str
    token: str
    key: PrivateKey


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def make_tenant(server: InProcessRegistry) -> Tenant:
    """A new org with one private app and an org, a deploy and a readonly token."""
    t = Tenancy(server.data_dir)
    org, app = unique("org"), unique("app")
    t.org(org)
    t.app(app, org)
    tokens = {
        "org": t.token("org", org=org)[0],
        "deploy": t.token("deploy", org=org, app=app)[0],
        "readonly": t.token("readonly", org=org)[0],
    }
    return Tenant(org, app, tokens)


def register_builder(server: InProcessRegistry, token: str, region: str = "local") -> BuilderHost:
    key = new_private_key()
    body = {"region": region, "public_key": public_key_b64(key), "name": "test builder"}
    found = answer(api(server, "POST", "/builders", token, json=body), 201)
    assert found["public_key"] == public_key_b64(key)
    return BuilderHost(found["id"], token, key)


def push_context(server: InProcessRegistry, tenant: Tenant, data: bytes | None = None) -> str:
    """A build context blob pushed to the tenant's app; its digest."""
    blob = data if data is not None else b"context " + os.urandom(32)
    return push_blob(server.url, tenant.app, blob, authed(tenant.tokens["org"]))


def create_build(
    server: InProcessRegistry,
    tenant: Tenant,
    builder: BuilderHost,
    token: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A queued build of a new context, for `builder`."""
    body = {"context_digest": push_context(server, tenant), "builder_id": builder.id, **extra}
    path = f"/apps/{tenant.app}/builds"
    return dict(answer(api(server, "POST", path, token or tenant.tokens["org"], json=body), 201))


def claim(server: InProcessRegistry, builder: BuilderHost) -> dict[str, Any]:
    return dict(answer(api(server, "POST", f"/builders/{builder.id}/claim", builder.token), 200))


def send_logs(
    server: InProcessRegistry, builder: BuilderHost, build_id: str, lines: list[str]
) -> requests.Response:
    return api(
        server, "POST", f"/builder/builds/{build_id}/logs", builder.token, json={"lines": lines}
    )


def send_result(
    server: InProcessRegistry, builder: BuilderHost, build_id: str, **body: Any
) -> requests.Response:
    return api(server, "POST", f"/builder/builds/{build_id}/result", builder.token, json=body)


def succeed(
    server: InProcessRegistry, builder: BuilderHost, build_id: str, digest: str = DIGEST
) -> dict[str, Any]:
    steps = [
        {"step": 1, "instruction": "FROM alpine", "seconds": 0.5, "cached": True},
        {"step": 2, "instruction": "RUN make", "seconds": 12.25},
    ]
    resp = send_result(
        server, builder, build_id, status="succeeded", image_digest=digest, steps=steps
    )
    return dict(answer(resp, 200))


def build_row(server: InProcessRegistry, build_id: str) -> dict[str, Any]:
    """The build's row as the server's database holds it (every column)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{server.data_dir / 'skyreg.db'}")
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sqlalchemy.select(schema.builds).where(schema.builds.c.id == build_id)
            ).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def set_back(server: InProcessRegistry, table: sqlalchemy.Table, row_id: str, **cols: Any) -> None:
    """Set columns of one row (say a timestamp in the past) straight in the database."""
    engine = sqlalchemy.create_engine(f"sqlite:///{server.data_dir / 'skyreg.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.update(table).where(table.c.id == row_id).values(**cols))
    finally:
        engine.dispose()


def expire_builds(server: InProcessRegistry) -> None:
    """Run `BuildService.expire` (what the server's `build_expiry` worker runs every 10 s) now,
    over the server's database."""
    meta = open_database(None, server.data_dir)
    try:
        platform = PlatformMeta(meta.db)
        auth = Authenticator(
            platform, KeyRing(meta.engine, legacy_dir=server.data_dir / "keys"), service="skyreg"
        )
        service = BuildService(BuildMeta(meta.db), platform, meta, AccessPolicy(platform), auth)
        asyncio.run(service.expire())
    finally:
        meta.close()


def registry_token(server: InProcessRegistry, secret: str, scope: str) -> requests.Response:
    return requests.get(
        f"{server.url}/auth/token",
        params={"service": "skyreg", "scope": scope},
        auth=("x", secret),
        timeout=30,
    )


# -- the tests -----------------------------------------------------------------------------------
