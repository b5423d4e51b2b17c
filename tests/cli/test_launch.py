"""`skyreg launch`: creates the app, writes skyreg.toml (never over one without --force, never
through a symlink), then deploys it with `skyreg deploy`'s own code; a following `skyreg deploy`
with no flags uses the file. The command runs in this process against a real server; the end to
end test adds a real `skyreg builder` (buildah) and a real `skyreg agent` (bubblewrap).

Org `acme` owns app `base` (the base image of the projects); its org token launches.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.cli.appconfig import load_config
from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.builders import RunningBuilder, builder_registered, require_buildah
from tests.support.cli import skyreg_as
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.waiting import wait_for

GENERATED_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{4}\Z")


@dataclass
class Server:
    reg: InProcessRegistry
    admin: str
    acme: str  # an org token of acme
    home: Path

    def skyreg(self, *args: str) -> subprocess.CompletedProcess[str]:
        return skyreg_as(self.home, self.reg.url, self.acme, *args)

    def api(self, path: str, **kw: Any) -> Any:
        r = requests.get(f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), timeout=30, **kw)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def apps(self) -> list[str]:
        return sorted(a["name"] for a in self.api("/apps")["apps"])


def _start(reg: InProcessRegistry, stack: contextlib.ExitStack, work: Path) -> Server:
    """Start `reg` with org acme and its app base holding base:v1 (busybox)."""
    stack.callback(reg.stop)
    reg.start()
    t = Tenancy(reg.data_dir)
    t.org("acme")
    t.app("base", "acme")
    admin = t.admin_secret()
    layout = write_oci_layout(work / "base-layout", [("v1", build_image("base"))])
    push_image(layout, f"{reg.host}/base:v1", admin)
    acme, _ = t.token("org", org="acme")
    home = work / "home"
    home.mkdir()
    return Server(reg, admin, acme, home)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server alone: launches that deploy nothing (`--no-deploy`) or are refused."""
    work = tmp_path_factory.mktemp("launch")
    with contextlib.ExitStack() as stack:
        yield _start(InProcessRegistry(data_dir=work / "data"), stack, work)


def project(root: Path, dockerfile: str | None = "FROM base:v1\n") -> Path:
    root.mkdir(parents=True)
    if dockerfile is not None:
        (root / "Dockerfile").write_text(dockerfile)
    return root


def test_launch_without_deploy_creates_a_named_app_and_writes_its_config(
    server: Server, tmp_path: Path
) -> None:
    root = project(tmp_path / "named")
    args = ["--name", "named-app", "--region", "local", "--no-deploy"]
    done = server.skyreg("launch", str(root), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "named-app" in server.apps()
    config = load_config(root / "skyreg.toml")
    assert (config.app, config.primary_region) == ("named-app", "local")
    assert (config.build.dockerfile, config.build.image) == ("Dockerfile", None)
    assert config.warnings == [] and config.env == {}
    assert (root / "skyreg.toml").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in root.iterdir()) == ["Dockerfile", "skyreg.toml"]  # no temp file


def test_launching_twice_refuses_without_force_and_leaves_the_file(
    server: Server, tmp_path: Path
) -> None:
    root = project(tmp_path / "twice", dockerfile=None)
    first = server.skyreg("launch", str(root), "--image", "base:v1", "--no-deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    written = (root / "skyreg.toml").read_bytes()
    config = load_config(root / "skyreg.toml")
    assert config.app is not None and GENERATED_NAME.match(config.app), config.app
    assert config.build.image == "base:v1" and config.primary_region is None
    apps = server.apps()
    assert config.app in apps

    again = server.skyreg("launch", str(root), "--image", "base:v1", "--no-deploy")
    assert (again.returncode, again.stderr) == (
        1,
        "error: skyreg.toml exists: use --force to overwrite\n",
    )
    assert (root / "skyreg.toml").read_bytes() == written
    assert server.apps() == apps  # refused before creating anything

    forced = server.skyreg("launch", str(root), "--image", "base:v1", "--no-deploy", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_config(root / "skyreg.toml").app not in (None, config.app)


def test_force_replaces_a_symlink_and_never_writes_through_it(
    server: Server, tmp_path: Path
) -> None:
    root = project(tmp_path / "linked")
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours\n")
    (root / "skyreg.toml").symlink_to(victim)
    refused = server.skyreg("launch", str(root), "--no-deploy")
    assert refused.returncode == 1 and "use --force" in refused.stderr
    dangling = project(tmp_path / "dangling")
    (dangling / "skyreg.toml").symlink_to(tmp_path / "nowhere")  # there all the same
    refused = server.skyreg("launch", str(dangling), "--no-deploy")
    assert refused.returncode == 1 and "use --force" in refused.stderr
    assert not (tmp_path / "nowhere").exists()

    done = server.skyreg("launch", str(root), "--no-deploy", "--force")
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "not yours\n"
    assert not (root / "skyreg.toml").is_symlink()
    assert load_config(root / "skyreg.toml").build.dockerfile == "Dockerfile"


def test_launch_refuses_before_creating_anything(server: Server, tmp_path: Path) -> None:
    apps = server.apps()
    empty = project(tmp_path / "empty", dockerfile=None)
    cases = [
        (["launch", str(empty)], f"error: no Dockerfile in {empty} (pass --image IMAGE"),
        (["launch", str(tmp_path / "absent")], f"error: {tmp_path / 'absent'} is not a directory"),
        (["launch", str(empty), "--image", "base:v1", "--name", "Bad_Name"], "error: --name must"),
        (["launch", str(empty), "--image", "base:v1", "--region", "S"], "error: --region must"),
    ]
    for args, message in cases:
        done = server.skyreg(*args)
        assert done.returncode == 1 and done.stderr.startswith(message), (args, done.stderr)
    assert server.apps() == apps
    assert list(empty.iterdir()) == []


# -- end to end: a builder and an agent -----------------------------------------------------------


@dataclass
class Platform:
    server: Server
    builder: RunningBuilder
    agent: RunningAgent

    def diagnostics(self) -> str:
        return f"builder log:\n{self.builder.log()}\nagent log:\n{self.agent.log()}"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed")
    require_buildah()
    work = tmp_path_factory.mktemp("launch-e2e")
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-launch-")
        server = _start(InProcessRegistry(data_dir=work / "data"), stack, work)
        url = server.reg.url
        builder = RunningBuilder(url, server.admin, top / "builder", top / "builder.log")
        stack.callback(builder.stop)
        builder.start()
        agent = RunningAgent(url, server.admin, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        wait_for(lambda: builder_registered(url, server.acme, "base"), "the builder registered", 60)
        yield Platform(server, builder, agent)


@pytest.mark.slow
def test_launch_builds_and_runs_then_deploy_reuses_its_file(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = platform.server
    root = project(
        tmp_path / "site",
        f"FROM {s.reg.host}/base:v1\nRUN echo launched > /launched.txt\n"
        'CMD ["/bin/busybox", "sh", "-c", "cat /launched.txt; exec /bin/busybox sleep 3600"]\n',
    )
    launched = s.skyreg("launch", str(root))
    assert launched.returncode == 0, launched.stdout + launched.stderr + platform.diagnostics()
    app = load_config(root / "skyreg.toml").app
    assert app is not None and GENERATED_NAME.match(app), app
    assert "STEP 2/3: RUN echo launched" in launched.stderr
    assert f"Release v1 of {app} is complete." in launched.stdout, launched.stdout
    [machine] = s.api(f"/apps/{app}/machines")["machines"]
    assert (machine["release_version"], machine["state"]) == (1, "started"), machine
    written = (root / "skyreg.toml").read_bytes()

    monkeypatch.chdir(root)
    deployed = s.skyreg("deploy")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr + platform.diagnostics()
    assert "warning:" not in deployed.stderr
    assert f"==> Building {app} on builder" in deployed.stderr
    assert f"Release v2 of {app} is complete." in deployed.stdout, deployed.stdout
    builds = s.api(f"/apps/{app}/builds")["builds"]
    assert [b["status"] for b in builds] == ["succeeded", "succeeded"], builds
    log = s.api(f"/builds/{builds[0]['id']}/logs", params={"limit": 1000})["lines"]
    assert any(line["line"].startswith("STEP 2/3: RUN") for line in log), log
    assert [r["version"] for r in s.api(f"/apps/{app}/releases")["releases"]] == [2, 1]
    new = [m for m in s.api(f"/apps/{app}/machines")["machines"] if m["release_version"] == 2]
    assert [m["state"] for m in new] == ["started"], new
    assert (root / "skyreg.toml").read_bytes() == written


@pytest.mark.slow
def test_deploy_builds_the_files_dockerfile_target_and_args_with_flags_winning(
    platform: Platform, tmp_path: Path
) -> None:
    s = platform.server
    root = project(tmp_path / "built", dockerfile=None)
    (root / "Dockerfile.prod").write_text(
        f"FROM {s.reg.host}/base:v1 AS final\nARG FROM_FILE\nARG OVERRIDDEN\n"
        'RUN echo "args: $FROM_FILE $OVERRIDDEN"\n'
        f"FROM {s.reg.host}/base:v1 AS later\nRUN echo later-stage-ran\n"
    )
    (root / "skyreg.toml").write_text(
        'app = "base"\n\n[build]\ndockerfile = "Dockerfile.prod"\ntarget = "final"\n\n'
        '[build.args]\nFROM_FILE = "file-value"\nOVERRIDDEN = "file-value"\n'
    )
    done = s.skyreg("deploy", str(root), "--build-only", "--build-arg", "OVERRIDDEN=flag-value")
    assert done.returncode == 0, done.stdout + done.stderr + platform.diagnostics()
    assert done.stdout.strip().splitlines()[-1].startswith("base@sha256:"), done.stdout
    [build] = s.api("/apps/base/builds")["builds"][:1]
    lines = [
        x["line"] for x in s.api(f"/builds/{build['id']}/logs", params={"limit": 1000})["lines"]
    ]
    assert "args: file-value flag-value" in lines, lines
    assert "later-stage-ran" not in lines, lines
