"""Dockerfile builds through the management API (`/apps/{app}/builds`, `/builds/{id}`,
`/builders...`), against a registry served in-process. The test plays the builder host itself
over HTTP (registers, claims, sends logs, reports the result): that is the API under test."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from skyreg.client.sealing import new_private_key, public_key_b64, seal, unseal
from skyreg.meta import schema
from skyreg.meta.builds import BUILDER_GONE, CLIENT_GONE
from tests.support.buildapi import (
    DIGEST,
    build_row,
    claim,
    create_build,
    expire_builds,
    make_tenant,
    push_context,
    register_builder,
    registry_token,
    send_logs,
    send_result,
    set_back,
    succeed,
)
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import push_image, sha256
from tests.support.platform import answer, api, authed, refused


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("builds") / "data") as reg:
        yield reg


def test_builder_registers_and_is_chosen(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    org = tenant.tokens["org"]
    refused(api(server, "GET", f"/apps/{tenant.app}/builder", org), 409, "conflict")
    builder = register_builder(server, org)
    chosen = answer(api(server, "GET", f"/apps/{tenant.app}/builder", org), 200)
    assert chosen["id"] == builder.id and chosen["org"] == tenant.org
    assert chosen["public_key"] == public_key_b64(builder.key)
    # A deploy token may push to its app: it may ask too; a readonly token may not.
    deploy = tenant.tokens["deploy"]
    assert (
        answer(api(server, "GET", f"/apps/{tenant.app}/builder", deploy), 200)["id"] == builder.id
    )
    refused(
        api(server, "GET", f"/apps/{tenant.app}/builder", tenant.tokens["readonly"]),
        403,
        "forbidden",
    )
    # Only admin and org tokens run builders; keys must be X25519 public keys.
    body = {"region": "local", "public_key": public_key_b64(new_private_key())}
    refused(api(server, "POST", "/builders", deploy, json=body), 403, "forbidden")
    bad = {"region": "local", "public_key": "c2hvcnQ="}
    assert "32-byte" in refused(api(server, "POST", "/builders", org, json=bad), 400, "bad_request")


def test_create_needs_the_context_in_the_app(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    path = f"/apps/{tenant.app}/builds"
    # A digest no one pushed, and one pushed to another app, are both refused.
    missing = {"context_digest": sha256(b"never pushed " + os.urandom(8)), "builder_id": builder.id}
    message = refused(
        api(server, "POST", path, tenant.tokens["org"], json=missing), 400, "bad_request"
    )
    assert "push it first" in message
    other = make_tenant(server)
    elsewhere = push_context(server, other)
    body = {"context_digest": elsewhere, "builder_id": builder.id}
    refused(api(server, "POST", path, tenant.tokens["org"], json=body), 400, "bad_request")
    assert answer(api(server, "GET", path, tenant.tokens["org"]), 200)["builds"] == []

    build = create_build(
        server,
        tenant,
        builder,
        dockerfile="docker/Dockerfile.prod",
        build_args={"VERSION": "1.2"},
        platform="linux/arm64",
        target="app",
    )
    assert build["status"] == "queued" and build["builder"] == builder.id
    assert build["app"] == tenant.app and build["org"] == tenant.org
    assert build["dockerfile"] == "docker/Dockerfile.prod" and build["build_args"] == {
        "VERSION": "1.2"
    }
    assert build["image_label"].startswith("deployment-") and build["image_digest"] is None
    assert build["context_size"] > 0
    # The deploy token may build its app; the build shows in the list and by id.
    second = create_build(server, tenant, builder, token=tenant.tokens["deploy"])
    listed = answer(api(server, "GET", path, tenant.tokens["readonly"]), 200)["builds"]
    assert [b["id"] for b in listed] == [second["id"], build["id"]]
    assert (
        answer(api(server, "GET", path + "?limit=1", tenant.tokens["org"]), 200)["builds"][0]["id"]
        == second["id"]
    )
    shown = answer(api(server, "GET", f"/builds/{build['id']}", tenant.tokens["readonly"]), 200)
    assert shown == build


def test_claim_hands_over_the_build_its_token_and_secrets_once(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    assert claim(server, builder) == {"build": None, "credential": None, "sealed_secrets": {}}
    sealed = {"npmrc": seal(public_key_b64(builder.key), b"//registry/:_authToken=s3cret")}
    build = create_build(server, tenant, builder, secrets=sealed)
    assert build["secrets"] == ["npmrc"]
    assert build_row(server, build["id"])["sealed_secrets"] is not None

    got = claim(server, builder)
    assert got["build"]["id"] == build["id"] and got["build"]["status"] == "running"
    assert got["build"]["started_at"] is not None
    assert unseal(builder.key, got["sealed_secrets"]["npmrc"]) == b"//registry/:_authToken=s3cret"
    credential = got["credential"]
    assert credential
    row = build_row(server, build["id"])
    assert row["sealed_secrets"] is None and row["status"] == "running"
    assert row["credential_id"] is not None
    assert claim(server, builder)["build"] is None  # claimed once

    # The build token pulls and pushes the app on /v2/, but not the management API.
    session = authed(credential)
    image = push_image(server.url, tenant.app, "built", session=session)
    pulled = session.get(f"{server.url}/v2/{tenant.app}/manifests/built", timeout=30)
    assert pulled.status_code == 200 and sha256(pulled.content) == image.digest
    assert (
        registry_token(server, credential, f"repository:{tenant.app}:pull,push").status_code == 200
    )
    message = refused(api(server, "GET", "/whoami", credential), 403, "forbidden")
    assert "registry only" in message
    gql = requests.post(
        server.url + "/graphql",
        json={"query": "{ whoami { id } }"},
        headers={"Authorization": f"Bearer {credential}"},
        timeout=30,
    )
    assert gql.status_code == 403, gql.text

    done = succeed(server, builder, build["id"], image.digest)
    assert done["status"] == "succeeded" and done["image_digest"] == image.digest
    assert done["image_ref"] == f"{tenant.app}@{image.digest}"
    assert [s["seconds"] for s in done["steps"]] == [0.5, 12.25]
    assert done["finished_at"] is not None
    # The credential is revoked with the result.
    assert registry_token(server, credential, f"repository:{tenant.app}:pull").status_code == 401
    assert (
        session.get(f"{server.url}/v2/{tenant.app}/manifests/built", timeout=30).status_code == 401
    )


def test_logs_append_and_read_back_in_order(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    build = create_build(server, tenant, builder)
    logs = f"/builds/{build['id']}/logs"
    token = tenant.tokens["readonly"]
    queued = answer(api(server, "GET", logs, token), 200)
    assert queued["lines"] == [] and queued["status"] == "queued" and not queued["ended"]
    claim(server, builder)
    assert answer(send_logs(server, builder, build["id"], ["step 1", "step 2"]), 200) == {
        "stop": False
    }
    # A NUL is refused with the whole batch (it is not JSON the API takes); nothing is kept.
    refused(send_logs(server, builder, build["id"], ["step 3\x00nul"]), 400, "bad_request")
    assert answer(send_logs(server, builder, build["id"], ["step 3 \u00e9\u2603"]), 200) == {
        "stop": False
    }
    read = answer(api(server, "GET", logs, token), 200)
    assert [(ln["seq"], ln["line"]) for ln in read["lines"]] == [
        (1, "step 1"),
        (2, "step 2"),
        (3, "step 3 \u00e9\u2603"),
    ]
    assert read["next"] == 3 and read["status"] == "running"
    after = answer(api(server, "GET", logs + "?after=1&limit=1", token), 200)
    assert [ln["seq"] for ln in after["lines"]] == [2] and after["next"] == 2
    assert answer(api(server, "GET", logs + "?after=3", token), 200)["lines"] == []
    refused(api(server, "GET", logs + "?wait=21", token), 400, "bad_request")

    # `wait` returns when a line arrives (not at the end of the wait).
    def later() -> None:
        time.sleep(0.5)
        send_logs(server, builder, build["id"], ["step 4"])

    sender = threading.Thread(target=later)
    started = time.monotonic()
    sender.start()
    try:
        waited = answer(api(server, "GET", logs + "?after=3&wait=15", token), 200)
    finally:
        sender.join(30)
    took = time.monotonic() - started
    assert [ln["line"] for ln in waited["lines"]] == ["step 4"]
    assert 0.4 < took < 10, took
    # With nothing new, `wait` waits (bounded), then answers with no lines.
    started = time.monotonic()
    assert answer(api(server, "GET", logs + "?after=4&wait=1", token), 200)["lines"] == []
    assert 0.9 < time.monotonic() - started < 10

    succeed(server, builder, build["id"])
    ended = answer(api(server, "GET", logs + "?after=4&wait=15", token), 200)
    assert ended["ended"] and ended["status"] == "succeeded" and ended["image_digest"] == DIGEST
    # The builder's token may not append to an ended build (it is told to stop).
    assert answer(send_logs(server, builder, build["id"], ["late"]), 200) == {"stop": True}
    assert answer(api(server, "GET", logs, token), 200)["next"] == 4


def test_cancel_queued_and_running(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    org = tenant.tokens["org"]
    queued = create_build(server, tenant, builder)
    refused(
        api(server, "POST", f"/builds/{queued['id']}/cancel", tenant.tokens["readonly"]),
        403,
        "forbidden",
    )
    cancelled = answer(api(server, "POST", f"/builds/{queued['id']}/cancel", org), 200)
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert claim(server, builder)["build"] is None  # nothing left to claim
    # Cancelling an ended build changes nothing.
    again = answer(api(server, "POST", f"/builds/{queued['id']}/cancel", org), 200)
    assert again == cancelled

    running = create_build(server, tenant, builder)
    got = claim(server, builder)
    assert got["build"]["id"] == running["id"]
    assert answer(send_logs(server, builder, running["id"], ["working"]), 200) == {"stop": False}
    deploy = tenant.tokens["deploy"]
    asked = answer(api(server, "POST", f"/builds/{running['id']}/cancel", deploy), 200)
    assert asked["status"] == "running"  # its builder stops it
    assert answer(send_logs(server, builder, running["id"], ["still working"]), 200) == {
        "stop": True
    }
    ended = answer(
        send_result(server, builder, running["id"], status="cancelled", error="cancelled"), 200
    )
    assert ended["status"] == "cancelled"
    assert (
        registry_token(server, got["credential"], f"repository:{tenant.app}:pull").status_code
        == 401
    )


def test_expiry_cancels_unfollowed_builds_and_fails_silent_builders(
    server: InProcessRegistry,
) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    followed = create_build(server, tenant, builder)
    forgotten = create_build(server, tenant, builder)
    past = datetime.now(UTC) - timedelta(seconds=CLIENT_GONE + 5)
    set_back(server, schema.builds, forgotten["id"], client_seen_at=past)
    expire_builds(server)
    token = tenant.tokens["readonly"]
    gone = answer(api(server, "GET", f"/builds/{forgotten['id']}", token), 200)
    assert gone["status"] == "cancelled" and "client stopped following" in gone["error"]
    assert answer(api(server, "GET", f"/builds/{followed['id']}", token), 200)["status"] == "queued"

    got = claim(server, builder)
    assert got["build"]["id"] == followed["id"]
    silent = datetime.now(UTC) - timedelta(seconds=BUILDER_GONE + 5)
    set_back(server, schema.builders, builder.id, last_seen=silent)
    expire_builds(server)
    failed = answer(api(server, "GET", f"/builds/{followed['id']}", token), 200)
    assert failed["status"] == "failed" and "builder stopped answering" in failed["error"]
    assert (
        registry_token(server, got["credential"], f"repository:{tenant.app}:pull").status_code
        == 401
    )
    # The builder's late report is refused and changes nothing.
    refused(
        send_result(server, builder, followed["id"], status="succeeded", image_digest=DIGEST),
        409,
        "conflict",
    )
    assert answer(api(server, "GET", f"/builds/{followed['id']}", token), 200) == failed
