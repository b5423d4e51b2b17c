"""App secrets through the management API (`/apps/{app}/secrets`, `/secrets/rotate-key`,
`/agent/machines/{id}/secrets`), against a registry served in-process over real HTTP. The test
plays the region agent itself (an agent token reports a machine starting, then asks for its
values): that is the API under test. No answer ever carries a value."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from skyreg.auth.envelope import MAX_VALUE_BYTES, prepend_new_key
from skyreg.services.secrets import MAX_BATCH, MAX_SECRETS
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import answer, api, refused
from tests.support.secrets import (
    Tenant,
    deploy,
    machine_secrets,
    make_tenant,
    report_state,
    running_registry,
    set_secrets,
    unset_secrets,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with running_registry(tmp_path_factory.mktemp("secrets") / "data") as reg:
        yield reg


def listed(server: InProcessRegistry, app: str, token: str) -> dict[str, Any]:
    resp = api(server, "GET", f"/apps/{app}/secrets", token)
    return dict(answer(resp, 200))


def by_name(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in found["secrets"]}


def machines_of(server: InProcessRegistry, tenant: Tenant, version: int) -> list[dict[str, Any]]:
    found = answer(api(server, "GET", f"/apps/{tenant.app}/machines", tenant.tokens["org"]), 200)
    return [m for m in found["machines"] if m["release_version"] == version]


# -- set, list, unset ----------------------------------------------------------------------------


def test_set_list_unset_without_a_release(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    org = tenant.tokens["org"]
    value = "postgres://u:" + uuid.uuid4().hex + "@db/x"
    texts: list[str] = []

    resp = set_secrets(server, tenant.app, org, {"DATABASE_URL": value})
    texts.append(resp.text)
    first = answer(resp, 200)
    assert first["staged"] is True and first["release"] is None  # no release: nothing to roll
    assert first["changed"] == ["DATABASE_URL"] and first["app"] == tenant.app
    version = first["version"]

    resp = api(server, "GET", f"/apps/{tenant.app}/secrets", org)
    texts.append(resp.text)
    shown = answer(resp, 200)
    assert shown["version"] == version and shown["deployed_version"] is None
    [secret] = shown["secrets"]
    assert secret["name"] == "DATABASE_URL" and secret["version"] == version
    assert secret["deployed"] is False
    assert secret["set_by"]["id"] == tenant.token_ids["org"]
    assert secret["digest"] and secret["set_at"]
    assert set(secret) == {"name", "digest", "version", "deployed", "set_by", "set_at"}

    # The same value again: same digest; another value: another digest.
    resp = set_secrets(server, tenant.app, tenant.tokens["deploy"], {"DATABASE_URL": value})
    texts.append(resp.text)
    answer(resp, 200)
    again = by_name(listed(server, tenant.app, org))["DATABASE_URL"]
    assert again["digest"] == secret["digest"]
    assert again["set_by"]["id"] == tenant.token_ids["deploy"]
    resp = set_secrets(server, tenant.app, org, {"DATABASE_URL": value + "!", "OTHER": "x"})
    texts.append(resp.text)
    changed = answer(resp, 200)
    assert changed["changed"] == ["DATABASE_URL", "OTHER"]
    now = by_name(listed(server, tenant.app, org))
    assert now["DATABASE_URL"]["digest"] != secret["digest"]
    assert now["DATABASE_URL"]["version"] == changed["version"] > version

    # Unset removes it; an absent name changes nothing (same version, nothing changed).
    resp = unset_secrets(server, tenant.app, org, ["DATABASE_URL"])
    texts.append(resp.text)
    gone = answer(resp, 200)
    assert gone["changed"] == ["DATABASE_URL"] and gone["staged"] is True
    after = listed(server, tenant.app, org)
    assert [s["name"] for s in after["secrets"]] == ["OTHER"]
    resp = unset_secrets(server, tenant.app, org, ["DATABASE_URL", "NEVER_SET"])
    texts.append(resp.text)
    nothing = answer(resp, 200)
    assert nothing["changed"] == [] and nothing["version"] == gone["version"]
    assert listed(server, tenant.app, org) == after
    for text in texts:
        assert value not in text


def test_set_after_a_deploy_rolls_the_machines_and_stage_waits(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    org = tenant.tokens["org"]
    first = deploy(server, tenant)
    value = "tok-" + uuid.uuid4().hex

    resp = set_secrets(server, tenant.app, tenant.tokens["deploy"], {"API_KEY": value})
    assert value not in resp.text
    rolled = answer(resp, 200)
    assert rolled["staged"] is False and rolled["changed"] == ["API_KEY"]
    release = rolled["release"]
    assert release["reason"] == "secrets" and "API_KEY" in release["description"]
    assert release["image_digest"] == first["image_digest"]
    assert release["version"] == first["version"] + 1
    assert machines_of(server, tenant, release["version"])  # the new release's machines exist
    shown = listed(server, tenant.app, org)
    assert shown["deployed_version"] == rolled["version"]
    assert by_name(shown)["API_KEY"]["deployed"] is True

    # Staged: no release; listed as not deployed until the next deploy.
    staged = answer(set_secrets(server, tenant.app, org, {"LATER": "v"}, stage=True), 200)
    assert staged["staged"] is True and staged["release"] is None
    releases = answer(api(server, "GET", f"/apps/{tenant.app}/releases", org), 200)["releases"]
    assert max(r["version"] for r in releases) == release["version"]
    secrets = by_name(listed(server, tenant.app, org))
    assert secrets["LATER"]["deployed"] is False and secrets["API_KEY"]["deployed"] is True
    nxt = deploy(server, tenant, "v2")
    assert nxt["version"] == release["version"] + 1
    shown = listed(server, tenant.app, org)
    assert shown["deployed_version"] == staged["version"]
    assert all(s["deployed"] for s in shown["secrets"])

    # Unset after a deploy rolls too.
    gone = answer(unset_secrets(server, tenant.app, org, ["LATER"]), 200)
    assert (
        gone["release"]["reason"] == "secrets" and gone["release"]["version"] == nxt["version"] + 1
    )


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("1ABC", "not starting with a digit"),
        ("A-B", "letters, digits and _"),
        ("A" * 129, "at most 128 characters"),
        ("SKYREG_X", "reserved"),
        ("skyreg_x", "reserved"),
        ("", "letters, digits and _"),
    ],
)
def test_bad_names_are_refused(server: InProcessRegistry, name: str, says: str) -> None:
    tenant = make_tenant(server)
    value = "v-" + uuid.uuid4().hex
    resp = set_secrets(server, tenant.app, tenant.tokens["org"], {"GOOD": "x", name: value})
    message = refused(resp, 400, "bad_request")
    assert says in message and value not in resp.text
    assert listed(server, tenant.app, tenant.tokens["org"])["secrets"] == []  # all or nothing
    refused(unset_secrets(server, tenant.app, tenant.tokens["org"], [name]), 400, "bad_request")


def test_a_value_with_nul_is_refused_without_echoing_it(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    value = "before\x00" + uuid.uuid4().hex
    resp = set_secrets(server, tenant.app, tenant.tokens["org"], {"WITH_NUL": value})
    message = refused(resp, 400, "bad_request")
    assert "NUL" in message
    assert value.split("\x00")[1] not in resp.text  # no part of the value comes back


def test_a_value_of_64_kib_is_accepted(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    resp = set_secrets(server, tenant.app, tenant.tokens["org"], {"BIG": "b" * MAX_VALUE_BYTES})
    assert answer(resp, 200)["changed"] == ["BIG"]


def test_a_value_over_64_kib_is_refused_by_name(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    value = uuid.uuid4().hex * (MAX_VALUE_BYTES // 32 + 1)
    resp = set_secrets(server, tenant.app, tenant.tokens["org"], {"HUGE": value})
    message = refused(resp, 400, "bad_request")
    assert "HUGE" in message and "64 KiB" in message
    assert value[:32] not in resp.text


def test_limits_on_count_and_size(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    org = tenant.tokens["org"]
    too_many = {f"N{i}": "x" for i in range(MAX_BATCH + 1)}
    message = refused(set_secrets(server, tenant.app, org, too_many), 400, "bad_request")
    assert "at most 100 secrets at once" in message
    message = refused(unset_secrets(server, tenant.app, org, list(too_many)), 400, "bad_request")
    assert "at most 100 secrets at once" in message
    full = {f"N{i}": "x" for i in range(MAX_SECRETS)}
    answer(set_secrets(server, tenant.app, org, full, stage=True), 200)
    message = refused(set_secrets(server, tenant.app, org, {"ONE_MORE": "x"}), 400, "bad_request")
    assert "at most 100 secrets" in message
    answer(set_secrets(server, tenant.app, org, {"N0": "replaced"}), 200)  # a replace still fits

    # More than 1 MiB in all, a body at a time (each under the 64 KiB body limit).
    other = make_tenant(server)
    chunk = 60_000
    for i in range((1 << 20) // chunk):
        value = f"{i:04d}" + uuid.uuid4().hex * (chunk // 32)
        answer(set_secrets(server, other.app, other.tokens["org"], {f"PART_{i}": value}), 200)
    last = "last-" + uuid.uuid4().hex * (chunk // 32)
    resp = set_secrets(server, other.app, other.tokens["org"], {"PART_LAST": last})
    assert "1024 KiB in all" in refused(resp, 400, "bad_request")
    assert last[:37] not in resp.text
    assert "PART_LAST" not in by_name(listed(server, other.app, other.tokens["org"]))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/secrets", {"secrets": {"A": "1"}, "stage": False, "extra": 1}),
        ("/secrets", {"values": {"A": "1"}}),
        ("/secrets", {"secrets": {"A": 1}}),
        ("/secrets", {"secrets": {}}),
        ("/secrets/unset", {"names": ["A"], "force": True}),
        ("/secrets/unset", {"names": []}),
    ],
)
def test_bodies_that_are_not_the_schema_are_refused(
    server: InProcessRegistry, path: str, body: dict[str, Any]
) -> None:
    tenant = make_tenant(server)
    resp = api(server, "POST", f"/apps/{tenant.app}{path}", tenant.tokens["org"], json=body)
    refused(resp, 400, "bad_request")
    assert listed(server, tenant.app, tenant.tokens["org"])["version"] == 0


# -- the agent path ------------------------------------------------------------------------------


def test_the_agent_starting_a_machine_gets_its_values(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    values = {
        "DATABASE_URL": "postgres://u:p@db:5432/x?sslmode=require",
        "MULTI_LINE": "line one\nline two=2\n",
        "UNICODE": "clé ☃ " + uuid.uuid4().hex,
        "EMPTY": "",
    }
    answer(set_secrets(server, tenant.app, tenant.tokens["org"], values, stage=True), 200)
    release = deploy(server, tenant)
    [machine] = machines_of(server, tenant, release["version"])
    mid, generation = machine["id"], machine["generation"]
    agent = tenant.tokens["agent"]

    # Not starting yet (created): refused.
    assert "not starting" in refused(
        machine_secrets(server, agent, mid, generation), 403, "forbidden"
    )
    report_state(server, agent, mid, "starting")
    got = machine_secrets(server, agent, mid, generation)
    assert answer(got, 200) == {"env": values}
    assert got.headers.get("Cache-Control") == "no-store"
    refused(machine_secrets(server, agent, mid, generation + 1), 403, "forbidden")
    # Only an agent token receives values, even the admin's and the org's are refused.
    for kind in ("admin", "org"):
        token = tenant.admin if kind == "admin" else tenant.tokens[kind]
        message = refused(machine_secrets(server, token, mid, generation), 403, "forbidden")
        assert "agent token" in message
    for kind in ("deploy", "readonly"):
        refused(machine_secrets(server, tenant.tokens[kind], mid, generation), 403, "forbidden")
    # Another org's agent: the machine does not exist for it.
    other = make_tenant(server)
    refused(machine_secrets(server, other.tokens["agent"], mid, generation), 404, "not_found")
    refused(machine_secrets(server, agent, "m" + "0" * 17, generation), 404, "not_found")
    # Started: too late.
    report_state(server, agent, mid, "started")
    refused(machine_secrets(server, agent, mid, generation), 403, "forbidden")


def test_a_machine_without_secrets_gets_an_empty_map(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    release = deploy(server, tenant)
    [machine] = machines_of(server, tenant, release["version"])
    mid, generation = machine["id"], machine["generation"]
    for token in (tenant.admin, tenant.tokens["org"], tenant.tokens["agent"]):
        assert answer(machine_secrets(server, token, mid, generation), 200) == {"env": {}}
    refused(machine_secrets(server, tenant.tokens["readonly"], mid, generation), 403, "forbidden")
    other = make_tenant(server)
    for kind in ("agent", "org"):
        refused(machine_secrets(server, other.tokens[kind], mid, generation), 404, "not_found")


def test_a_release_keeps_the_set_it_was_made_with(server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    org, agent = tenant.tokens["org"], tenant.tokens["agent"]
    answer(set_secrets(server, tenant.app, org, {"A": "one"}, stage=True), 200)
    first = deploy(server, tenant)
    answer(set_secrets(server, tenant.app, org, {"A": "two", "B": "b"}, stage=True), 200)
    # The first release's machine, started now, still gets the first set (staged: no roll).
    [machine] = machines_of(server, tenant, first["version"])
    report_state(server, agent, machine["id"], "starting")
    got = answer(machine_secrets(server, agent, machine["id"], machine["generation"]), 200)
    assert got == {"env": {"A": "one"}}


# -- the master key ------------------------------------------------------------------------------


def test_rotate_key_rewraps_every_org_and_the_old_key_can_go(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("rotate") / "data",
        options={"webhook_allow_private": True},
    )
    reg.start()
    try:
        with_secrets = [make_tenant(reg), make_tenant(reg)]
        without = make_tenant(reg)
        values = {t.app: {"TOKEN": uuid.uuid4().hex} for t in with_secrets}
        for t in with_secrets:
            answer(set_secrets(reg, t.app, t.tokens["org"], values[t.app], stage=True), 200)
        # A webhook's signing secret, sealed under the master key of its day.
        hooks = f"/orgs/{with_secrets[0].org}/webhooks"
        hook = {"url": "http://127.0.0.1:9/hook"}
        answer(api(reg, "POST", hooks, with_secrets[0].tokens["org"], json=hook), 201)
        for token in (without.tokens["org"], without.tokens["deploy"], without.tokens["agent"]):
            refused(api(reg, "POST", "/secrets/rotate-key", token), 403, "forbidden")

        key_file = reg.data_dir / "secrets.key"
        old_text = key_file.read_text()
        new = prepend_new_key(key_file)
        rotated = answer(api(reg, "POST", "/secrets/rotate-key", without.admin), 200)
        assert rotated == {
            "key_id": new.key_id, "rewrapped": 2, "total": 2, "webhooks_resealed": 1,
        }  # fmt: skip
        again = answer(api(reg, "POST", "/secrets/rotate-key", without.admin), 200)
        assert again == {"key_id": new.key_id, "rewrapped": 0, "total": 2, "webhooks_resealed": 0}
        # Set and list work under the new key, for an org with secrets and a new one.
        for t in (*with_secrets, without):
            answer(set_secrets(reg, t.app, t.tokens["org"], {"MORE": "m"}, stage=True), 200)
            assert "MORE" in by_name(listed(reg, t.app, t.tokens["org"]))

        # Drop the old key from the file: only the new line and the comments stay.
        kept = [line for line in old_text.splitlines() if line.startswith("#")]
        key_file.write_text("\n".join([new.to_base64(), *kept]) + "\n")
        assert old_text.strip().splitlines()[-1] not in key_file.read_text()
        # Nothing is left under the old key: the webhook's secret opens without it.
        assert answer(api(reg, "POST", "/secrets/rotate-key", without.admin), 200) == {
            "key_id": new.key_id,
            "rewrapped": 0,
            "total": 3,
            "webhooks_resealed": 0,
        }
        for t in with_secrets:  # the values still open, through the agent path
            release = deploy(reg, t)
            [machine] = machines_of(reg, t, release["version"])
            report_state(reg, t.tokens["agent"], machine["id"], "starting")
            resp = machine_secrets(reg, t.tokens["agent"], machine["id"], machine["generation"])
            assert answer(resp, 200) == {"env": {**values[t.app], "MORE": "m"}}
    finally:
        reg.stop()
