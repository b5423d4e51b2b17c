"""Hostile callers of the builds API: other orgs' tokens and builders, the build token out of its
lane, and every bound on what a build request, a log report and a result may hold. Each attack
gets a clear 4xx and changes nothing (the build, its log and the app's builds are as before)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from skyreg.client.sealing import public_key_b64, seal
from skyreg.meta import schema
from skyreg.meta.builds import BUILDER_GONE, MAX_LOG_BYTES, MAX_LOG_LINES, TRUNCATED
from skyreg.services.builds import (
    MAX_ACTIVE_BUILDS,
    MAX_BUILD_ARG_VALUE,
    MAX_BUILD_ARGS,
    MAX_LIVE_BUILDERS,
    MAX_LOG_BATCH,
    MAX_LOG_LINE,
    MAX_SECRETS,
)
from tests.support.buildapi import (
    DIGEST,
    BuilderHost,
    Tenant,
    build_row,
    claim,
    create_build,
    make_tenant,
    push_context,
    register_builder,
    send_logs,
    send_result,
    set_back,
    unique,
)
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.platform import Tenancy, answer, api, refused


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("buildattacks") / "data") as reg:
        yield reg


def snapshot(server: InProcessRegistry, tenant: Tenant, build_id: str) -> tuple[Any, ...]:
    """What an attack must not change: the build, every line of its log, the app's builds."""
    token = tenant.tokens["org"]
    build = answer(api(server, "GET", f"/builds/{build_id}", token), 200)
    log = answer(api(server, "GET", f"/builds/{build_id}/logs?limit=1000", token), 200)
    listed = answer(api(server, "GET", f"/apps/{tenant.app}/builds", token), 200)
    row = build_row(server, build_id)
    return build, log["lines"], [b["id"] for b in listed["builds"]], row["log_bytes"]


def test_other_orgs_see_nothing(server: InProcessRegistry) -> None:
    a, b = make_tenant(server), make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    before = snapshot(server, a, build["id"])
    missing = "bu0000000000000000"
    for token in (b.tokens["org"], b.tokens["deploy"], b.tokens["readonly"]):
        for path in (f"/builds/{build['id']}", f"/builds/{build['id']}/logs"):
            seen = refused(api(server, "GET", path, token), 404, "not_found")
            absent = refused(
                api(server, "GET", path.replace(build["id"], missing), token), 404, "not_found"
            )
            assert seen == absent.replace(missing, build["id"])  # nothing tells them apart
        refused(api(server, "GET", f"/builds/{build['id']}/logs?wait=2", token), 404, "not_found")
        refused(api(server, "POST", f"/builds/{build['id']}/cancel", token), 404, "not_found")
        refused(api(server, "GET", f"/apps/{a.app}/builds", token), 404, "not_found")
        refused(api(server, "GET", f"/apps/{a.app}/builder", token), 404, "not_found")
        body = {"context_digest": DIGEST, "builder_id": builder.id}
        refused(api(server, "POST", f"/apps/{a.app}/builds", token, json=body), 404, "not_found")
    refused(api(server, "GET", f"/builds/{'x' * 5000}", b.tokens["org"]), 404, "not_found")
    assert snapshot(server, a, build["id"]) == before


def test_other_builders_cannot_claim_or_report(server: InProcessRegistry) -> None:
    a, b = make_tenant(server), make_tenant(server)
    mine = register_builder(server, a.tokens["org"])
    theirs = register_builder(server, b.tokens["org"])
    # Org A may not send its build (and its secrets) to org B's builder.
    body = {"context_digest": push_context(server, a), "builder_id": theirs.id}
    refused(
        api(server, "POST", f"/apps/{a.app}/builds", a.tokens["org"], json=body), 409, "conflict"
    )
    build = create_build(server, a, mine)
    # B's builder polling A's builder id, and its own: nothing of A's.
    refused(api(server, "POST", f"/builders/{mine.id}/claim", theirs.token), 404, "not_found")
    assert claim(server, theirs)["build"] is None
    assert (
        answer(api(server, "GET", f"/builds/{build['id']}", a.tokens["org"]), 200)["status"]
        == "queued"
    )
    claim(server, mine)
    before = snapshot(server, a, build["id"])
    refused(send_logs(server, theirs, build["id"], ["forged line"]), 404, "not_found")
    result = {"status": "succeeded", "image_digest": DIGEST}
    refused(send_result(server, theirs, build["id"], **result), 404, "not_found")
    # Org A's other tokens did not register that builder either (nor may readonly ones act).
    for kind in ("deploy", "readonly"):
        other = BuilderHost(mine.id, a.tokens[kind], mine.key)
        refused(send_logs(server, other, build["id"], ["forged"]), 404, "not_found")
        refused(send_result(server, other, build["id"], **result), 404, "not_found")
        refused(api(server, "POST", f"/builders/{mine.id}/claim", a.tokens[kind]), 403, "forbidden")
    assert snapshot(server, a, build["id"]) == before


def test_a_builder_is_polled_only_with_the_token_that_registered_it(
    server: InProcessRegistry,
) -> None:
    a = make_tenant(server)
    second_org_token = Tenancy(server.data_dir).token("org", org=a.org)[0]
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    refused(
        api(server, "POST", f"/builders/{builder.id}/claim", second_org_token), 404, "not_found"
    )
    assert build_row(server, build["id"])["status"] == "queued"
    assert build_row(server, build["id"])["credential_id"] is None
    got = claim(server, builder)
    assert got["build"]["id"] == build["id"]
    # Another token of the same org may not report on it either.
    intruder = BuilderHost(builder.id, second_org_token, builder.key)
    refused(send_logs(server, intruder, build["id"], ["x"]), 404, "not_found")
    refused(send_result(server, intruder, build["id"], status="failed"), 404, "not_found")
    assert build_row(server, build["id"])["status"] == "running"


def test_the_build_token_is_for_the_registry_only(server: InProcessRegistry) -> None:
    a, b = make_tenant(server), make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    credential = claim(server, builder)["credential"]
    for method, path in (
        ("GET", "/whoami"),
        ("GET", f"/builds/{build['id']}"),
        ("GET", f"/apps/{a.app}/builds"),
        ("POST", f"/builds/{build['id']}/cancel"),
        ("POST", f"/builders/{builder.id}/claim"),
        ("POST", "/tokens"),
    ):
        refused(api(server, method, path, credential), 403, "forbidden")
    refused(
        send_result(
            server,
            BuilderHost(builder.id, credential, builder.key),
            build["id"],
            status="succeeded",
            image_digest=DIGEST,
        ),
        403,
        "forbidden",
    )
    gql = requests.post(
        server.url + "/graphql",
        json={"query": "{ whoami { id } }"},
        headers={"Authorization": f"Bearer {credential}"},
        timeout=30,
    )
    assert gql.status_code == 403, gql.text
    # On /v2/ it may not push to another org's app.
    pushed = requests.post(
        f"{server.url}/v2/{b.app}/blobs/uploads/", auth=("x", credential), timeout=30
    )
    assert pushed.status_code in (401, 403, 404), pushed.text
    assert build_row(server, build["id"])["status"] == "running"


def test_readonly_tokens_cannot_build(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    body = {"context_digest": push_context(server, a), "builder_id": builder.id}
    refused(
        api(server, "POST", f"/apps/{a.app}/builds", a.tokens["readonly"], json=body),
        403,
        "forbidden",
    )
    refused(
        api(
            server,
            "POST",
            "/builders",
            a.tokens["readonly"],
            json={"region": "local", "public_key": public_key_b64(builder.key)},
        ),
        403,
        "forbidden",
    )
    refused(api(server, "POST", f"/apps/{a.app}/builds", None, json=body), 401, "unauthorized")
    assert answer(api(server, "GET", f"/apps/{a.app}/builds", a.tokens["org"]), 200)["builds"] == []


def test_build_requests_are_bounded(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    context = push_context(server, a)
    sealed = seal(public_key_b64(builder.key), b"secret")
    bad: list[tuple[dict[str, Any], str | None]] = [
        ({"build_args": {f"A{i}": "x" for i in range(MAX_BUILD_ARGS + 1)}}, "build arguments"),
        ({"build_args": {"BIG": "x" * (MAX_BUILD_ARG_VALUE + 1)}}, "BIG"),
        ({"build_args": {"NOT-A-NAME": "x"}}, "names"),
        ({"build_args": {"1X": "x"}}, "names"),
        ({"secrets": {f"s{i}": sealed for i in range(MAX_SECRETS + 1)}}, "secrets"),
        ({"secrets": {"big": "A" * (41 << 10)}}, None),  # 413 or 400: either refuses
        ({"secrets": {"bad": "not base64!"}}, "base64"),
        ({"secrets": {"../etc": sealed}}, "secret ids"),
        ({"secrets": {"npm": sealed}, "builder_id": None}, "builder_id"),
        ({"dockerfile": "../Dockerfile"}, "dockerfile"),
        ({"dockerfile": "a/../../Dockerfile"}, "dockerfile"),
        ({"dockerfile": "/etc/passwd"}, "dockerfile"),
        ({"dockerfile": "./Dockerfile"}, "dockerfile"),
        ({"dockerfile": "a//Dockerfile"}, "dockerfile"),
        ({"dockerfile": ""}, "dockerfile"),
        ({"dockerfile": "Docker\nfile"}, "dockerfile"),
        ({"dockerfile": "d" * 2000}, "dockerfile"),
        ({"platform": "linux"}, "platform"),
        ({"platform": "linux/amd64/v8/x"}, "platform"),
        ({"platform": "Linux/AMD64"}, "platform"),
        ({"platform": "linux/amd64;rm"}, "platform"),
        ({"target": "--output=/"}, "target"),
        ({"image_label": "not a tag"}, "image_label"),
        ({"image_label": "x" * 200}, "image_label"),
        ({"timeout": 5}, "timeout"),
        ({"timeout": 10**9}, "timeout"),
        ({"context_digest": "sha256:xyz"}, "context_digest"),
        ({"context_digest": "../../etc"}, "context_digest"),
        ({"builder_id": "bld" + "0" * 16}, "builder"),
        ({"unknown_field": 1}, None),
    ]
    path = f"/apps/{a.app}/builds"
    for extra, words in bad:
        body = {"context_digest": context, "builder_id": builder.id, **extra}
        resp = api(server, "POST", path, a.tokens["org"], json=body)
        assert resp.status_code in (400, 409, 413), (extra.keys(), resp.status_code, resp.text)
        if words is not None:
            assert words in resp.json()["error"]["message"], (extra.keys(), resp.text)
    assert answer(api(server, "GET", path, a.tokens["org"]), 200)["builds"] == []
    # The bounds themselves are allowed.
    ok: dict[str, Any] = {
        "build_args": {f"A{i}": "x" * MAX_BUILD_ARG_VALUE for i in range(10)},
        "secrets": {f"s{i}": sealed for i in range(MAX_SECRETS)},
        "platform": "linux/arm64/v8",
    }
    assert create_build(server, a, builder, **ok)["secrets"] == sorted(ok["secrets"])


def test_log_reports_are_bounded(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    # Not running yet: a report changes nothing (and tells the builder to stop).
    assert answer(send_logs(server, builder, build["id"], ["early"]), 200) == {"stop": True}
    claim(server, builder)
    before = snapshot(server, a, build["id"])
    message = refused(
        send_logs(server, builder, build["id"], [""] * (MAX_LOG_BATCH + 1)), 400, "bad_request"
    )
    assert str(MAX_LOG_BATCH) in message
    too_big = send_logs(server, builder, build["id"], ["x" * (70 << 10)])
    assert too_big.status_code == 413, too_big.text
    bad_types = api(
        server,
        "POST",
        f"/builder/builds/{build['id']}/logs",
        builder.token,
        json={"lines": [1, {"a": 2}]},
    )
    assert bad_types.status_code == 400, bad_types.text
    assert snapshot(server, a, build["id"]) == before

    # A long line is cut to MAX_LOG_LINE characters.
    long = "é" * (MAX_LOG_LINE + 100)
    raw = json.dumps({"lines": [long[:20_000]]}, ensure_ascii=False).encode()
    resp = requests.post(
        f"{server.url}/api/v1/builder/builds/{build['id']}/logs",
        data=raw,
        headers={"Authorization": f"Bearer {builder.token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer(resp, 200) == {"stop": False}
    first = answer(api(server, "GET", f"/builds/{build['id']}/logs", a.tokens["org"]), 200)["lines"]
    assert [len(ln["line"]) for ln in first] == [MAX_LOG_LINE]

    # The log is bounded in bytes: past MAX_LOG_BYTES one line says so and later ones are dropped.
    chunk = ["b" * 4000] * 15  # ~60 KB a report, under the body limit
    sent = len(first[0]["line"].encode())
    for _ in range(MAX_LOG_BYTES // (4000 * 15) + 2):
        assert answer(send_logs(server, builder, build["id"], chunk), 200) == {"stop": False}
        sent += 4000 * 15
    row = build_row(server, build["id"])
    lines = row["log_lines"]
    assert lines < MAX_LOG_LINES, lines  # the last line's seq, not a marker
    token = a.tokens["org"]
    kept: list[dict[str, Any]] = []
    while True:
        page = answer(
            api(server, "GET", f"/builds/{build['id']}/logs?after={len(kept)}", token), 200
        )
        if not page["lines"]:
            break
        kept += page["lines"]
    assert [ln["seq"] for ln in kept] == list(range(1, lines + 1))
    assert kept[-1]["line"] == TRUNCATED and TRUNCATED not in [ln["line"] for ln in kept[:-1]]
    assert sum(len(ln["line"].encode()) for ln in kept[:-1]) <= MAX_LOG_BYTES < sent
    assert answer(send_logs(server, builder, build["id"], ["more"]), 200) == {"stop": False}
    assert build_row(server, build["id"])["log_lines"] == lines
    # A follower of the ended build learns that it has every line.
    answer(send_result(server, builder, build["id"], status="failed", error="x"), 200)
    end = answer(api(server, "GET", f"/builds/{build['id']}/logs?after={lines}&wait=5", token), 200)
    assert end["ended"] and end["lines"] == [] and end["next"] == lines


def test_log_line_count_is_bounded(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    claim(server, builder)
    for start in range(0, MAX_LOG_LINES + 2 * MAX_LOG_BATCH, MAX_LOG_BATCH):
        lines = [str(start + i) for i in range(MAX_LOG_BATCH)]
        assert answer(send_logs(server, builder, build["id"], lines), 200) == {"stop": False}
    row = build_row(server, build["id"])
    assert row["log_lines"] == MAX_LOG_LINES + 1
    end = answer(
        api(
            server, "GET", f"/builds/{build['id']}/logs?after={MAX_LOG_LINES - 1}", a.tokens["org"]
        ),
        200,
    )
    assert [(ln["seq"], ln["line"]) for ln in end["lines"]] == [
        (MAX_LOG_LINES, str(MAX_LOG_LINES - 1)),
        (MAX_LOG_LINES + 1, TRUNCATED),
    ]


def test_results_are_checked(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    queued = create_build(server, a, builder)
    # Not running (queued): 409, and the build stays queued.
    message = refused(
        send_result(server, builder, queued["id"], status="failed", error="x"), 409, "conflict"
    )
    assert "not running" in message
    assert build_row(server, queued["id"])["status"] == "queued"
    claim(server, builder)
    before = snapshot(server, a, queued["id"])
    bad: list[dict[str, Any]] = [
        {"status": "succeeded"},  # no digest
        {"status": "succeeded", "image_digest": "sha256:nothex"},
        {"status": "succeeded", "image_digest": "latest"},
        {"status": "succeeded", "image_digest": "sha256:" + "a" * 63},
        {"status": "running"},
        {"status": "queued"},
        {"status": "failed", "steps": [{"step": 1, "instruction": "x", "seconds": 1}] * 1001},
        {"status": "failed", "steps": [{"step": "one", "instruction": "x", "seconds": 1}]},
        {"status": "failed", "error": "e" * (70 << 10)},
    ]
    for body in bad:
        resp = send_result(server, builder, queued["id"], **body)
        assert resp.status_code in (400, 413), (body.keys(), resp.status_code, resp.text[:300])
    assert snapshot(server, a, queued["id"]) == before
    # Hostile numbers in steps are kept finite and not negative.
    raw = (
        '{"status": "failed", "error": "boom", "steps": ['
        '{"step": 1, "instruction": "RUN a", "seconds": 1e999},'
        '{"step": 2, "instruction": "RUN b", "seconds": -5}]}'
    )
    resp = requests.post(
        f"{server.url}/api/v1/builder/builds/{queued['id']}/result",
        data=raw,
        headers={"Authorization": f"Bearer {builder.token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code in (200, 400), resp.text
    shown = requests.get(
        f"{server.url}/api/v1/builds/{queued['id']}",
        headers={"Authorization": f"Bearer {a.tokens['org']}"},
        timeout=30,
    )
    assert shown.status_code == 200, shown.text
    doc = json.loads(shown.text, parse_constant=lambda c: pytest.fail(f"non-JSON number {c}"))
    for step in doc["steps"]:
        assert isinstance(step["seconds"], float) and 0 <= step["seconds"] < 1e9, doc["steps"]
    # Ended: a second result is refused and changes nothing.
    ended = snapshot(server, a, queued["id"])
    refused(
        send_result(server, builder, queued["id"], status="succeeded", image_digest=DIGEST),
        409,
        "conflict",
    )
    assert snapshot(server, a, queued["id"]) == ended


def test_deploy_tokens_of_other_apps_cannot_cancel(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    t = Tenancy(server.data_dir)
    other_app = unique("app")
    t.app(other_app, a.org)
    other_deploy = t.token("deploy", org=a.org, app=other_app)[0]
    builder = register_builder(server, a.tokens["org"])
    build = create_build(server, a, builder)
    before = snapshot(server, a, build["id"])
    message = refused(
        api(server, "POST", f"/builds/{build['id']}/cancel", other_deploy), 403, "forbidden"
    )
    assert a.app in message
    assert snapshot(server, a, build["id"]) == before
    done = answer(api(server, "POST", f"/builds/{build['id']}/cancel", a.tokens["deploy"]), 200)
    assert done["status"] == "cancelled"


def test_an_org_cannot_queue_builds_without_end(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builder = register_builder(server, a.tokens["org"])
    body = {"context_digest": push_context(server, a), "builder_id": builder.id}
    path = f"/apps/{a.app}/builds"
    made = [
        answer(api(server, "POST", path, a.tokens["org"], json=body), 201)["id"]
        for _ in range(MAX_ACTIVE_BUILDS)
    ]
    message = refused(api(server, "POST", path, a.tokens["org"], json=body), 400, "bad_request")
    assert "queued or running" in message
    assert (
        len(answer(api(server, "GET", path + "?limit=100", a.tokens["org"]), 200)["builds"])
        == MAX_ACTIVE_BUILDS
    )
    answer(api(server, "POST", f"/builds/{made[0]}/cancel", a.tokens["org"]), 200)
    answer(api(server, "POST", path, a.tokens["org"], json=body), 201)


def test_an_org_cannot_register_builders_without_end(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    builders = [register_builder(server, a.tokens["org"]) for _ in range(MAX_LIVE_BUILDERS)]
    body = {"region": "local", "public_key": public_key_b64(builders[0].key)}
    message = refused(
        api(server, "POST", "/builders", a.tokens["org"], json=body), 400, "bad_request"
    )
    assert "builders" in message
    # A builder that stopped polling no longer counts (a restarted host registers again).
    silent = datetime.now(UTC) - timedelta(seconds=BUILDER_GONE + 5)
    set_back(server, schema.builders, builders[0].id, last_seen=silent)
    answer(api(server, "POST", "/builders", a.tokens["org"], json=body), 201)
