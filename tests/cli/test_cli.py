"""The `skyreg` management commands against a server with auth on, served in-process. The commands
run in this process (tests/support/cli.py), and as real `python -m skyreg` subprocesses wherever
a behaviour needs the process: the config file it writes and reads, env vars, stdin, exit codes."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.cli import run_in_process
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_MANIFEST, push_sized_image, put_manifest
from tests.support.platform import authed
from tests.support.servers import ServedRegistry
from tests.support.waiting import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRegistry]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("cli") / "data")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Cli:
    """`skyreg` with its own HOME, XDG_CONFIG_HOME and DOCKER_CONFIG: run in this process
    (tests/support/cli.py), or as `python -m skyreg` where `process=True` (at least once for each
    behaviour a real process shows: the config file, env vars, stdin, exit codes)."""

    home: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.home / "xdg" / "skyreg" / "config.json"

    @property
    def docker_config(self) -> Path:
        return self.home / "docker" / "config.json"

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        input: str | None = None,
        process: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**self.env, **(env or {})}
        if not process:
            proc = run_in_process(args, full_env, input=input)
        else:
            proc = subprocess.run(
                [sys.executable, "-m", "skyreg", *args],
                env=full_env,
                capture_output=True,
                text=True,
                input=input,
                timeout=60,
            )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str, env: dict[str, str] | None = None, process: bool = False) -> str:
        proc = self.run(*args, env=env, process=process)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    def fails(self, *args: str, env: dict[str, str] | None = None, process: bool = False) -> str:
        proc = self.run(*args, env=env, process=process)
        assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: "), proc.stderr
        return proc.stderr


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYREG_", "DOCKER_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "xdg"),
        DOCKER_CONFIG=str(home / "docker"),
        COLUMNS="250",
        NO_COLOR="1",
    )
    return Cli(home, env)


def admin_file(server: ServedRegistry) -> Path:
    return server.data_dir / "admin-token"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def login_admin(cli: Cli, server: ServedRegistry) -> None:
    cli.ok("login", "--server", server.url, "--token-file", str(admin_file(server)))


def test_login_writes_a_private_config(cli: Cli, server: ServedRegistry) -> None:
    out = cli.ok(
        "login", "--server", server.url + "/", "--token-file", str(admin_file(server)), process=True
    )
    assert f"Logged in to {server.url} with admin token" in out
    doc = json.loads(cli.config.read_text())
    assert doc == {"server": server.url, "token": admin_file(server).read_text().strip()}
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert "admin token" in cli.ok("whoami")
    assert json.loads(cli.ok("whoami", "--json"))["kind"] == "admin"

    # The token may come on stdin, too.
    proc = cli.run(
        "login",
        "--server",
        server.url,
        "--token-file",
        "-",
        input=admin_file(server).read_text(),
        process=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_login_with_a_bad_token_fails_cleanly(cli: Cli, server: ServedRegistry) -> None:
    err = cli.fails("login", "--server", server.url, "--token", "skyreg_wrong", process=True)
    assert "invalid, expired or revoked token" in err
    assert not cli.config.exists()
    err = cli.fails("orgs", "list")
    assert "no server" in err


def test_unreachable_server_and_missing_things(cli: Cli, server: ServedRegistry) -> None:
    closed = free_port()  # nothing listens there
    err = cli.fails("orgs", "list", "--server", f"http://127.0.0.1:{closed}", "--token", "x")
    assert "cannot reach" in err
    login_admin(cli, server)
    assert "not found" in cli.fails("apps", "show", "no-such-app")
    assert "not found" in cli.fails("images", "list", "--app", "no-such-app")
    assert "--generate-name" in cli.fails("apps", "create", "--org", "x")
    assert "--app" in cli.fails("tokens", "create", "deploy")
    # A token saved for one server is never sent to another.
    err = cli.fails("orgs", "list", "--server", f"http://127.0.0.1:{closed}")
    assert "no token" in err


def test_orgs_apps_and_tokens(cli: Cli, server: ServedRegistry) -> None:
    login_admin(cli, server)
    org = unique("org")
    assert org in cli.ok("orgs", "create", org)
    assert org in cli.ok("orgs", "list")
    assert "already exists" in cli.fails("orgs", "create", org)

    app = unique("app")
    assert cli.ok("apps", "create", app, "--org", org).strip() == app
    proc = cli.run("apps", "create", "--generate-name", "--org", org, "--public")
    assert proc.returncode == 0, proc.stderr
    generated = proc.stdout.strip()
    assert re.fullmatch(r"[a-z]+-[a-z]+-[0-9]{4}", generated), proc.stdout
    assert "public" in proc.stderr
    assert "taken" in cli.fails("apps", "create", app, "--org", org)
    listing = cli.ok("apps", "list", "--org", org)
    assert app in listing and generated in listing
    shown = json.loads(cli.ok("apps", "show", generated, "--json"))
    assert shown == {**shown, "name": generated, "org": org, "public": True}
    assert "private" in cli.ok("apps", "update", generated, "--private")

    # An org token: the secret alone on stdout, the explanation on stderr.
    proc = cli.run("tokens", "create", "org", "--org", org, "--name", "org-admin")
    assert proc.returncode == 0, proc.stderr
    org_secret = proc.stdout.strip()
    assert proc.stdout == org_secret + "\n" and org_secret.startswith("skyreg_")
    assert "only time" in proc.stderr and org_secret not in proc.stderr

    # Env vars take over from the config file: act as the org token.
    as_org = {"SKYREG_SERVER": server.url, "SKYREG_TOKEN": org_secret}
    proc = cli.run(
        "tokens",
        "create",
        "deploy",
        "--app",
        app,
        "--expiry",
        "720h",
        "--name",
        "ci",
        env=as_org,
        process=True,
    )
    assert proc.returncode == 0, proc.stderr
    deploy_secret = proc.stdout.strip()
    assert "expires" in proc.stderr
    readonly_secret = cli.ok("tokens", "create", "readonly", env=as_org).strip()
    assert json.loads(cli.ok("whoami", "--json", env=as_org))["org"] == org
    assert cli.ok("orgs", "list", "--json", env=as_org).count('"name"') == 1

    listing = cli.ok("tokens", "list", env=as_org)
    for secret in (org_secret, deploy_secret, readonly_secret):
        assert secret not in listing
    assert "ci" in listing and "org-admin" in listing and "deploy" in listing
    tokens = json.loads(cli.ok("tokens", "list", "--json", "--org", org))
    ci = next(t for t in tokens if t["name"] == "ci")
    assert ci["kind"] == "deploy" and ci["app"] == app and ci["expires_at"]
    assert "forbidden" not in cli.ok("tokens", "list", "--org", org)
    assert "may not" in cli.fails("tokens", "list", "--token", deploy_secret)

    # Revoking works at once.
    assert ci["id"] in cli.ok("tokens", "revoke", ci["id"], env=as_org)
    revoked = next(
        t for t in json.loads(cli.ok("tokens", "list", "--json", env=as_org)) if t["id"] == ci["id"]
    )
    assert revoked["active"] is False
    assert "revoked" in cli.ok("tokens", "list", env=as_org)
    err = cli.fails("whoami", "--token", deploy_secret)
    assert "invalid, expired or revoked" in err and "401" in err


def test_images_list(cli: Cli, server: ServedRegistry) -> None:
    login_admin(cli, server)
    org, app = unique("org"), unique("app")
    cli.ok("orgs", "create", org)
    cli.ok("apps", "create", app, "--org", org)
    assert cli.ok("images", "list", "--app", app) == ""
    secret = admin_file(server).read_text().strip()
    digest, size = push_sized_image(authed(secret), server.url, app, "v1.2.3")
    push_sized_image(authed(secret), server.url, f"{app}/sidecar", "edge")
    out = cli.ok("images", "list", "--app", app)
    lines = out.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "PUSHED"]
    row = next(line for line in lines if "v1.2.3" in line)
    assert row.split()[0] == app
    assert digest[:19] in row and digest not in row
    assert f"{size / 1024:.1f} KiB" in row
    assert any(f"{app}/sidecar" in line and "edge" in line for line in lines)
    images = json.loads(cli.ok("images", "list", "--app", app, "--json"))
    assert {(i["repository"], i["tag"]) for i in images} == {
        (app, "v1.2.3"),
        (f"{app}/sidecar", "edge"),
    }


def test_images_list_follows_every_page(cli: Cli, server: ServedRegistry) -> None:
    """The API answers 1000 tags a page; the command lists them all."""
    login_admin(cli, server)
    org, app = unique("org"), unique("app")
    cli.ok("orgs", "create", org)
    cli.ok("apps", "create", app, "--org", org)
    session = authed(admin_file(server).read_text().strip())
    push_sized_image(session, server.url, app, "t0000")
    manifest = session.get(
        f"{server.url}/v2/{app}/manifests/t0000", headers={"Accept": OCI_MANIFEST}
    ).content
    for n in range(1, 1002):
        assert put_manifest(server.url, app, f"t{n:04d}", manifest, session=session).ok
    first = session.get(f"{server.url}/api/v1/apps/{app}/images").json()
    assert len(first["images"]) == 1000 and first["next_cursor"], "the API pages at 1000"
    images = json.loads(cli.ok("images", "list", "--app", app, "--json"))
    assert [i["tag"] for i in images] == [f"t{n:04d}" for n in range(1002)]


def test_auth_docker_keeps_other_entries(cli: Cli, server: ServedRegistry) -> None:
    cli.docker_config.parent.mkdir()
    existing: dict[str, Any] = {
        "auths": {"other.example:5000": {"auth": base64.b64encode(b"u:p").decode()}},
        "HttpHeaders": {"User-Agent": "test"},
    }
    cli.docker_config.write_text(json.dumps(existing))
    login_admin(cli, server)
    out = cli.ok("auth", "docker")
    assert server.host in out
    doc = json.loads(cli.docker_config.read_text())
    assert doc["HttpHeaders"] == existing["HttpHeaders"]
    assert doc["auths"]["other.example:5000"] == existing["auths"]["other.example:5000"]
    entry = doc["auths"][server.host]
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    assert user == "x" and password == admin_file(server).read_text().strip()
    assert stat.S_IMODE(cli.docker_config.stat().st_mode) == 0o600
    # What Docker would send works against the registry.
    r = requests.get(f"{server.url}/v2/", headers={"Authorization": f"Basic {entry['auth']}"})
    assert r.status_code == 200

    # Without DOCKER_CONFIG: ~/.docker/config.json, created.
    env = {k: v for k, v in cli.env.items() if k != "DOCKER_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "auth", "docker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    default = json.loads((cli.home / ".docker" / "config.json").read_text())
    assert list(default["auths"]) == [server.host]

    # A config it cannot parse is left alone.
    cli.docker_config.write_text("{broken")
    assert "left unchanged" in cli.fails("auth", "docker")
    assert cli.docker_config.read_text() == "{broken"
