"""App secrets against a hostile tenant and a hostile host user: routes around the agent-only
path, tokens minted or stretched beyond their kind, values echoed by refusals, limits raced, and
master key files that are not what they seem. A test of an attack that still succeeds is marked
xfail (strict) and names what breaks; the others show a defence holding. (The one that broke,
concurrent sets past the per-app total, is mended: the total is checked in the write.)"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.auth.envelope import (
    MAX_KEY_FILE_BYTES,
    MAX_VALUE_BYTES,
    MasterKey,
    MasterKeys,
    SecretKeyError,
)
from skyreg.services.secrets import MAX_TOTAL_BYTES
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed, cli_env
from tests.support.secrets import (
    Tenant,
    deploy,
    machine_secrets,
    make_tenant,
    registry_token,
    report_state,
    running_registry,
    set_secrets,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with running_registry(tmp_path_factory.mktemp("secretattacks") / "data") as reg:
        yield reg


def new_tenant(reg: InProcessRegistry) -> Tenant:
    """A tenant with an org token and an agent token only (tests check the org's token list)."""
    return make_tenant(reg, kinds=("org", "agent"))


def the_machine(reg: InProcessRegistry, o: Tenant) -> dict[str, Any]:
    found = answer(api(reg, "GET", f"/apps/{o.app}/machines", o.tokens["org"]), 200)["machines"]
    [machine] = [m for m in found if m["desired"] == "started"]
    return dict(machine)


def raw(reg: InProcessRegistry, method: str, target: str, token: str, body: Any = None) -> Any:
    """A request with `target` sent byte for byte (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request(
            method, target, body=None if body is None else json.dumps(body), headers=headers
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- the agent-only path -------------------------------------------------------------------------

TRICKS = (
    "/api/v1/agent/../{route}",
    "/api/v1/agent/%2e%2e/{route}",
    "/api/v1/agent/%2E%2E/{route}",
    "/api/v1/agent/..%2f{route}",
    "/api/v1/agent/%2e%2e%2f{route}",
    "/api/v1/agent/./../{route}",
    "/api/v1//agent/../{route}",
    "/api/v1/agent/%252e%252e/{route}",
    "/api/v1/agent/..%5c{route}",
    "/api/v1/agent/..;/{route}",
    "//api/v1/agent/../{route}",
    "/api/v1/agent/../{route}?x=/api/v1/agent/",
    "/api/v1/agent/../../v1/{route}",
)


def test_no_path_trick_takes_an_agent_token_outside_the_agent_api(
    server: InProcessRegistry,
) -> None:
    """aiohttp decodes %2e but does not resolve `..` in `request.path`: the prefix check and the
    router see the same path, so a dotted path that starts with /api/v1/agent/ reaches no route."""
    a = new_tenant(server)
    answer(
        set_secrets(
            server, a.app, a.tokens["org"], {"S": "hidden-" + uuid.uuid4().hex}, stage=True
        ),
        200,
    )
    targets = [
        ("GET", "apps", None),
        ("GET", "whoami", None),
        ("GET", "tokens", None),
        ("GET", f"apps/{a.app}/secrets", None),
        ("POST", "tokens", {"kind": "org", "org": a.org}),
        ("POST", f"apps/{a.app}/secrets", {"secrets": {"X": "y"}}),
        ("POST", "secrets/rotate-key", {}),
    ]
    for method, route, body in targets:
        for trick in TRICKS:
            status, content = raw(
                server, method, trick.format(route=route), a.tokens["agent"], body
            )
            assert status in (403, 404), (trick, route, status, content[:200])
    for target in ("/api/v1/agent/../../graphql", "/api/v1/agent/%2e%2e/%2e%2e/graphql"):
        status, content = raw(
            server, "POST", target, a.tokens["agent"], {"query": "{ __typename }"}
        )
        assert status in (403, 404), (target, status, content[:200])
    for target in ("/graphql", "/graphql/", "/graphql?/api/v1/agent/"):
        status, content = raw(
            server, "POST", target, a.tokens["agent"], {"query": "{ __typename }"}
        )
        assert status in (403, 404, 405), (target, status, content[:200])
    # Nothing was made or changed by any of them.
    listing = answer(api(server, "GET", f"/apps/{a.app}/secrets", a.tokens["org"]), 200)
    assert [s["name"] for s in listing["secrets"]] == ["S"]
    tokens = answer(api(server, "GET", "/tokens", a.tokens["org"]), 200)
    assert sorted(t["kind"] for t in tokens["tokens"]) == ["agent", "org"], tokens


def test_no_spelling_of_kind_lets_an_org_token_mint_an_agent_token(
    server: InProcessRegistry,
) -> None:
    a = new_tenant(server)
    spellings: list[Any] = [
        "Agent",
        "AGENT",
        "agent ",
        " agent",
        "agent\n",
        "\uff41gent",
        "agen\u0074",
    ]
    for kind in spellings:
        resp = api(server, "POST", "/tokens", a.tokens["org"], json={"kind": kind, "org": a.org})
        assert resp.status_code in (400, 403), (kind, resp.text)
    for body in (
        {"kind": ["agent"], "org": a.org},
        {"kind": "agent"},  # every org
        {"kind": "agent", "org": None},
        {"kind": "agent", "org": a.org, "app": a.app},
        {"kind": "org", "org": a.org, "kind ": "agent"},
    ):
        resp = api(server, "POST", "/tokens", a.tokens["org"], json=body)
        assert resp.status_code in (400, 403), (body, resp.text)
    # A JSON object with the key twice: the last one counts, and it is refused.
    dup = b'{"kind": "org", "org": "%s", "kind": "agent"}' % a.org.encode()
    resp = requests.post(
        f"{server.url}/api/v1/tokens",
        data=dup,
        headers={"Authorization": f"Bearer {a.tokens['org']}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code in (400, 403), resp.text
    tokens = answer(api(server, "GET", "/tokens", a.tokens["org"]), 200)
    assert sorted(t["kind"] for t in tokens["tokens"]) == ["agent", "org"], tokens


def test_an_every_org_agent_token_pulls_every_org_and_pushes_or_deletes_none(
    server: InProcessRegistry,
) -> None:
    victim = new_tenant(server)
    image = push_image(server.url, victim.app, "v1", session=authed(victim.tokens["org"]))
    every = answer(api(server, "POST", "/tokens", victim.admin, json={"kind": "agent"}), 201)
    agent = str(every["secret"])
    granted = registry_token(server, agent, f"repository:{victim.app}:pull,push,delete")
    headers = {"Authorization": f"Bearer {granted}"}
    got = requests.get(f"{server.url}/v2/{victim.app}/manifests/v1", headers=headers, timeout=30)
    assert got.status_code == 200, got.text  # it runs every org's machines
    for method, path in (
        ("POST", f"/v2/{victim.app}/blobs/uploads/"),
        ("POST", f"/v2/{victim.app}/evil/blobs/uploads/"),
        ("DELETE", f"/v2/{victim.app}/manifests/{image.digest}"),
        ("PUT", f"/v2/{victim.app}/manifests/evil"),
    ):
        for auth in ({"headers": headers}, {"auth": ("x", agent)}):
            resp = requests.request(method, server.url + path, timeout=30, **auth)  # type: ignore[arg-type]
            assert resp.status_code in (401, 403, 405), (method, path, resp.status_code)
    still = requests.get(f"{server.url}/v2/{victim.app}/manifests/v1", headers=headers, timeout=30)
    assert still.headers["Docker-Content-Digest"] == image.digest


# -- who receives a machine's values, and when ---------------------------------------------------


def test_values_go_only_to_the_agent_starting_that_generation(server: InProcessRegistry) -> None:
    a, b = new_tenant(server), new_tenant(server)
    value = "v-" + uuid.uuid4().hex
    answer(set_secrets(server, a.app, a.tokens["org"], {"S": value}, stage=True), 200)
    deploy(server, a)
    machine = the_machine(server, a)
    mid, gen = machine["id"], machine["generation"]

    def refused_without_value(resp: requests.Response, status: int) -> None:
        assert resp.status_code == status, (resp.status_code, resp.text)
        assert value not in resp.text

    # Not starting yet (created): refused, whichever generation.
    refused_without_value(machine_secrets(server, a.tokens["agent"], mid, gen), 403)
    report_state(server, a.tokens["agent"], mid, "starting")
    for guess in (gen - 1, gen + 1, 0, 2**31 - 1):
        if guess != gen:
            refused_without_value(machine_secrets(server, a.tokens["agent"], mid, guess), 403)
    # Another org's agent token and the tenant's own tokens: nothing (the other org: not found).
    refused_without_value(machine_secrets(server, b.tokens["agent"], mid, gen), 404)
    refused_without_value(machine_secrets(server, b.tokens["org"], mid, gen), 404)
    refused_without_value(machine_secrets(server, a.tokens["org"], mid, gen), 403)
    refused_without_value(machine_secrets(server, a.admin, mid, gen), 403)
    # Another org's agent cannot move the machine into a state that would serve it either.
    resp = api(
        server,
        "POST",
        f"/agent/machines/{mid}/state",
        b.tokens["agent"],
        json={"state": "starting"},
    )
    assert resp.status_code == 404, resp.text
    assert answer(machine_secrets(server, a.tokens["agent"], mid, gen), 200) == {
        "env": {"S": value}
    }
    # Replayed once the machine runs: refused.
    report_state(server, a.tokens["agent"], mid, "started")
    refused_without_value(machine_secrets(server, a.tokens["agent"], mid, gen), 403)
    # Desired stopped while the agent (or a tenant's org token playing agent) says starting.
    answer(api(server, "POST", f"/machines/{mid}/stop", a.tokens["org"]), 200)
    report_state(server, a.tokens["org"], mid, "starting")
    refused_without_value(machine_secrets(server, a.tokens["agent"], mid, gen), 403)
    # The refusals left no value in the machine's events.
    listed = api(server, "GET", f"/apps/{a.app}/machines", a.tokens["org"])
    assert value not in listed.text


def test_names_that_would_shadow_the_agents_variables_are_refused_in_any_case(
    server: InProcessRegistry,
) -> None:
    a = new_tenant(server)
    for name in (
        "skyreg_machine_id",
        "SKYREG_MACHINE_ID",
        "Skyreg_App",
        "sKyReG_REGION",
        "SKYREG_",
        "\uff33KYREG_X",  # fullwidth S
        "SKYREG\u200b_X",
        "PATH=/evil",
        "LD_PRELOAD\n",
        "",
    ):
        resp = set_secrets(server, a.app, a.tokens["org"], {name: "x"}, stage=True)
        assert resp.status_code == 400, (name, resp.text)
    assert (
        answer(api(server, "GET", f"/apps/{a.app}/secrets", a.tokens["org"]), 200)["secrets"] == []
    )


# -- values never echoed -------------------------------------------------------------------------


def test_refused_bodies_never_echo_a_value(server: InProcessRegistry) -> None:
    a = new_tenant(server)
    value = "sk_live_" + uuid.uuid4().hex
    bodies: list[Any] = [
        {"secrets": {"K": value + "\x00"}},
        {"secrets": {"K": "\ud800" + value}},
        {"secrets": {"K": value + "\udcff"}},
        {"secrets": {"K": {"nested": value}}},
        {"secrets": {"K": [value]}},
        {"secrets": {"K": "x"}, "stage": value},
        {"secrets": [value]},
        {"secrets": {"K": value * (MAX_VALUE_BYTES // len(value) + 1)}},
    ]
    for body in bodies:
        resp = api(server, "POST", f"/apps/{a.app}/secrets", a.tokens["org"], json=body)
        assert resp.status_code == 400, resp.text
        assert value not in resp.text and value[8:24] not in resp.text, resp.text
    broken = b'{"secrets": {"K": "' + value.encode() + b'\xff"}}'
    resp = requests.post(
        f"{server.url}/api/v1/apps/{a.app}/secrets",
        data=broken,
        headers={"Authorization": f"Bearer {a.tokens['org']}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 400 and value not in resp.text, resp.text
    assert value not in server.log()


def test_the_cli_never_prints_a_value_the_server_or_it_refuses(
    server: InProcessRegistry, tmp_path: Path
) -> None:
    """A value given as bytes that are not UTF-8 (argv decoded with surrogateescape) or with a
    NUL from standard input: neither the CLI nor the server's answer it prints shows it."""
    a = new_tenant(server)
    value = "sk_live_" + uuid.uuid4().hex
    env = {
        k.encode(): v.encode() for k, v in cli_env(tmp_path, server.url, a.tokens["org"]).items()
    }
    for argv, stdin, says in (
        ([b"K=" + value.encode() + b"\xff"], b"", b"surrogate"),
        ([b"-"], b"K=" + value.encode() + b"\x00x\n", b"NUL"),
        ([b"-"], b"K=" + value.encode() + b"\xed\xa0\x80\n", b"not UTF-8"),  # a lone surrogate
    ):
        done = subprocess.run(
            [sys.executable.encode(), b"-m", b"skyreg", b"secrets", b"set", a.app.encode(),
             b"--stage", *argv],
            env=env, input=stdin, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 1 and says in out, out[-600:]  # refused, not a usage error
        assert value.encode() not in out and value[8:24].encode() not in out, out[-600:]
    assert (
        answer(api(server, "GET", f"/apps/{a.app}/secrets", a.tokens["org"]), 200)["secrets"] == []
    )


# -- limits --------------------------------------------------------------------------------------


def test_concurrent_sets_cannot_exceed_the_apps_total(server: InProcessRegistry) -> None:
    a = new_tenant(server)
    big = "x" * MAX_VALUE_BYTES
    per_request = 15  # 960 KiB: each alone fits
    requests_at_once = 4
    barrier = threading.Barrier(requests_at_once)

    def one(i: int) -> int:
        values = {f"B{i}_{j}": big for j in range(per_request)}
        barrier.wait()
        return set_secrets(server, a.app, a.tokens["org"], values, stage=True).status_code

    with ThreadPoolExecutor(requests_at_once) as pool:
        statuses = list(pool.map(one, range(requests_at_once)))
    listed = answer(api(server, "GET", f"/apps/{a.app}/secrets", a.tokens["org"]), 200)["secrets"]
    total = sum(len(s["name"]) + MAX_VALUE_BYTES for s in listed)
    assert total <= MAX_TOTAL_BYTES, (statuses, len(listed), total)


# -- the master key file -------------------------------------------------------------------------


def _key_text() -> bytes:
    return MasterKey.generate().to_base64().encode() + b"\n"


def _refused(path: Path, says: str) -> str:
    started = time.monotonic()
    with pytest.raises(SecretKeyError) as e:
        MasterKeys.from_file(path)
    assert time.monotonic() - started < 5, "reading the key file hung"
    message = str(e.value)
    assert says in message, message
    return message


def test_key_files_that_are_not_what_they_seem_are_refused_without_hanging(tmp_path: Path) -> None:
    theirs = tmp_path / "attacker.key"
    theirs.write_bytes(_key_text())
    theirs.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(theirs)
    _refused(link, "symlink")
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    _refused(fifo, "not a regular file")  # O_NONBLOCK: no writer needed, no hang
    _refused(Path("/dev/zero"), "not a regular file")
    huge = tmp_path / "huge.key"
    with huge.open("wb") as f:  # sparse: 1 GiB claimed, nothing read
        f.truncate(1 << 30)
    huge.chmod(0o600)
    _refused(huge, "over")
    big = tmp_path / "big.key"
    big.write_bytes(_key_text() + b"#" * MAX_KEY_FILE_BYTES)
    big.chmod(0o600)
    _refused(big, "over")
    for mode in (0o640, 0o604, 0o620, 0o602):
        loose = tmp_path / f"loose-{mode:o}.key"
        loose.write_bytes(_key_text())
        loose.chmod(mode)
        _refused(loose, "chmod 600")
    secret = MasterKey.generate().to_base64()
    bad = tmp_path / "near.key"
    bad.write_bytes(secret[:-4].encode() + b"\n")
    bad.chmod(0o600)
    assert secret[:-4] not in _refused(bad, "line 1")  # a near-miss key is never echoed


def test_a_symlink_swapped_in_for_the_default_key_file_is_refused(tmp_path: Path) -> None:
    """An attacker who could replace `<data-dir>/secrets.key` with a link to a key they know
    gets an error, not a server that seals new data keys under their key."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    default = data / "secrets.key"
    first = MasterKeys.load(None, None, default)
    assert len(first) == 1 and (default.stat().st_mode & 0o777) == 0o600
    theirs = tmp_path / "known.key"
    theirs.write_bytes(_key_text())
    theirs.chmod(0o600)
    default.unlink()
    default.symlink_to(theirs)
    with pytest.raises(SecretKeyError, match="symlink"):
        MasterKeys.load(None, None, default)
    default.unlink()
    os.mkfifo(default, 0o600)
    with pytest.raises(SecretKeyError, match="not a regular file"):
        MasterKeys.load(None, None, default)


# -- a hostile host user -------------------------------------------------------------------------

NOBODY = 65534
_PEEK = r"""
secret=$1; shift
for path in "$@"; do
    if [ -d "$path" ]; then set -- "$path"/*; else set -- "$path"; fi
    for file in "$@"; do
        if grep -aFq -- "$secret" "$file" 2>/dev/null; then echo "$file"; fi
    done
done
"""


def _peek_as_nobody(secret: str, paths: list[str]) -> str:
    """Which of `paths` (a directory: its entries) show `secret` to a host user that is neither
    root nor the machine's uid."""
    done = subprocess.run(
        ["/bin/sh", "-c", _PEEK, "peek", secret, *paths],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    return done.stdout.strip()


@pytest.fixture
def traversable() -> Iterator[Path]:
    """A scratch directory every host user may traverse (pytest's own are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="skyreg-secret-attacks-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


needs_root_and_bwrap = pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/usr/bin/bwrap").exists()
    or not Path("/usr/bin/busybox").exists(),
    reason="needs root, bwrap and a static busybox",
)


@needs_root_and_bwrap
def test_another_host_user_finds_no_value_in_a_root_machines_processes(
    traversable: Path,
) -> None:
    """The agent hands values to bwrap through a memory file (mode 0777, owned by root): once
    bwrap runs, no /proc entry of bwrap or of the machine (cmdline, environ, fds, memory) lets
    another host user read them."""
    from skyreg.machines.runtime import ImageConfig, start_machine

    rootfs = traversable / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin/busybox").write_bytes(Path("/usr/bin/busybox").read_bytes())
    (rootfs / "bin/busybox").chmod(0o755)
    for applet in ("sh", "sleep", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    value = "v-" + uuid.uuid4().hex
    conf = ImageConfig.from_json(
        json.dumps({"config": {"Cmd": ["/bin/sh", "-c", "echo up; sleep 30"]}}).encode()
    )
    log = traversable / "machine.log"
    machine = start_machine(
        rootfs, conf, log_path=log, hostname="m", env={"SECRET_A": value, "LD_PRELOAD": value}
    )
    try:
        deadline = time.monotonic() + 20
        while b"up" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [machine._proc.pid, machine.pid]
        paths = [f"/proc/{p}/{what}" for p in pids for what in ("cmdline", "environ", "mem")]
        paths += [f"/proc/{p}/fd" for p in pids] + [str(log)]
        control = traversable / "control"
        control.write_text(value)
        control.chmod(0o644)
        assert _peek_as_nobody(value, [str(control)]) == str(control)  # the probe sees
        assert _peek_as_nobody(value, paths) == ""
        # Root sees it in the machine's environment: the probe would have found it.
        assert value.encode() in Path(f"/proc/{machine.pid}/environ").read_bytes()
        # Nor is the value in bwrap's own environment (LD_PRELOAD reached the machine only).
        assert Path(f"/proc/{machine._proc.pid}/environ").read_bytes() == b""
        assert Path(f"/proc/{machine._proc.pid}/fd").exists()
        fds = [os.readlink(f) for f in Path(f"/proc/{machine._proc.pid}/fd").iterdir()]
        assert not any("bwrap-args" in f for f in fds), fds  # bwrap closed the memory file
    finally:
        machine.stop(grace=1.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_another_host_user_cannot_read_the_key_file_or_the_database(traversable: Path) -> None:
    """The key file and the database sit in a 0700 data dir, even under a traversable parent."""
    reg = InProcessRegistry(data_dir=traversable / "data")
    reg.start()
    try:
        o = new_tenant(reg)
        answer(set_secrets(reg, o.app, o.tokens["org"], {"S": "x"}, stage=True), 200)
        key = (reg.data_dir / "secrets.key").read_text()
        line = next(x for x in key.splitlines() if x and not x.startswith("#"))
        paths = [str(reg.data_dir), str(reg.data_dir / "secrets.key")]
        paths += [str(p) for p in reg.data_dir.glob("*.db*")]
        control = traversable / "control"
        control.write_text(line)
        control.chmod(0o644)
        assert _peek_as_nobody(line, [str(traversable)]) == str(control)  # the probe sees
        assert _peek_as_nobody(line, paths) == ""
        assert _peek_as_nobody("SQLite format", paths) == ""  # nor the database
    finally:
        reg.stop()
