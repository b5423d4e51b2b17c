"""`skyreg deploy` reads skyreg.toml: the app, image, primary region and strategy come from the
file, its [http_service] and checks become the release's service, flags win over it, its
warnings reach stderr, and a file it cannot use ends the command with a message naming its line
and key. A real server, the command in this process; nothing
runs the machines (`--detach`).

Org `acme` owns app `web`, which holds the image `web:v1`.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.cli import skyreg_as
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy


@dataclass
class Server:
    reg: InProcessRegistry
    acme: str  # an org token of acme

    def skyreg(self, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return skyreg_as(home, self.reg.url, self.acme, *args)

    def releases(self, app: str) -> list[dict[str, Any]]:
        r = requests.get(
            f"{self.reg.url}/api/v1/apps/{app}/releases", auth=("x", self.acme), timeout=30
        )
        assert r.status_code == 200, r.text
        return list(r.json()["releases"])

    def app(self, app: str) -> dict[str, Any]:
        r = requests.get(f"{self.reg.url}/api/v1/apps/{app}", auth=("x", self.acme), timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("deploy-config") / "data")
    with contextlib.ExitStack() as stack:
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        layout = write_oci_layout(
            tmp_path_factory.mktemp("images") / "web", [("v1", build_image("web"))]
        )
        push_image(layout, f"{reg.host}/web:v1", t.admin_secret())
        acme, _ = t.token("org", org="acme")
        yield Server(reg, acme)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory, the working directory of the command."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


BAD_FILES = [
    (
        "bad.toml",
        'app = "web"\n\n[deploy]\nstrategy = "fast"\n',
        "error: bad.toml:4: [deploy] strategy must be one of rolling, immediate, not 'fast'\n",
    ),
    (
        "skyreg.toml",
        'app = "web"\nprimary_region = 7\n',
        "error: skyreg.toml:2: primary_region must be a string, not an integer\n",
    ),
    (
        "skyreg.toml",
        'app = "web"\n[build]\nimage = "web:v1"\n[build.args]\nBAD-NAME = "x"\n',
        "error: skyreg.toml:5: [build] args.BAD-NAME is not a valid name: [A-Za-z_][A-Za-z0-9_]*\n",
    ),
    (
        "skyreg.toml",
        'app = "web"\n[build]\nimage = "web:v1"\n[http_service]\ninternal_port = 8080\n'
        '[[http_service.checks]]\npath = "/health check"\n',
        "error: skyreg.toml:7: [http_service] checks[0].path must be printable ASCII without "
        "spaces (write a space as %20)\n",
    ),
    (
        "skyreg.toml",
        'app = "web"\n[build]\nimage = "web:v1"\n[http_service]\ninternal_port = 8080\n'
        + "".join(f'[checks.c{i}]\ntype = "tcp"\nport = {i + 1}\n' for i in range(11)),
        "error: skyreg.toml:6: [checks] at most 10 checks, not 11\n",
    ),
    (
        "skyreg.toml",
        'app = "web"\n[deploy\n',
        "error: skyreg.toml:2: invalid TOML: Expected ']' at the end of a table declaration"
        " (column 8)\n",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
def test_a_file_it_cannot_use_ends_the_command_naming_line_and_key(
    server: Server, project: Path, name: str, text: str, message: str
) -> None:
    (project / name).write_text(text)
    before = len(server.releases("web"))
    args = ["--config", name] if name != "skyreg.toml" else []
    done = server.skyreg(project, "deploy", *args, "--image", "web:v1", "--detach")
    assert (done.returncode, done.stderr) == (1, message), done.stdout
    assert len(server.releases("web")) == before


def test_a_missing_config_file_is_named(server: Server, project: Path) -> None:
    done = server.skyreg(project, "deploy", "--config", "nope.toml", "--detach")
    assert (done.returncode, done.stderr) == (1, "error: nope.toml: no such file\n")


def test_the_file_gives_app_image_strategy_and_its_warnings_reach_stderr(
    server: Server, project: Path
) -> None:
    (project / "skyreg.toml").write_text(
        'app = "web"\nkill_signal = "SIGINT"\n\n[build]\nimage = "web:v1"\n\n'
        '[env]\nGREETING = "hi"\n\n[deploy]\nstrategy = "immediate"\n'
    )
    done = server.skyreg(project, "deploy", "--detach", "--region", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "warning: skyreg.toml:2: unknown key kill_signal (ignored)",
    ]
    [release] = server.releases("web")[:1]
    assert release["env"] == {"GREETING": "hi"}
    assert f"Release v{release['version']} of web" in done.stdout
    assert release["strategy"] == "immediate" and release["regions"] == ["local"]
    assert release["image_ref"].endswith("web:v1"), release


def test_env_flags_win_over_the_files_env_per_name(server: Server, project: Path) -> None:
    (project / "skyreg.toml").write_text(
        'app = "web"\n\n[build]\nimage = "web:v1"\n\n[env]\nA = "file"\nB = "file"\n'
    )
    done = server.skyreg(project, "deploy", "--detach", "-e", "B=flag", "--env", "C=flag")
    assert done.returncode == 0, done.stdout + done.stderr
    [release] = server.releases("web")[:1]
    assert release["env"] == {"A": "file", "B": "flag", "C": "flag"}


def test_flags_win_over_the_file(server: Server, project: Path) -> None:
    # Another directory's file, named by --config: its app does not exist, its region is not
    # this server's.
    elsewhere = project / "conf"
    elsewhere.mkdir()
    (elsewhere / "app.toml").write_text(
        'app = "no-such-app"\nprimary_region = "syd"\n\n[build]\nimage = "web:v1"\n\n'
        '[deploy]\nstrategy = "immediate"\n'
    )
    config = ["--config", "conf/app.toml", "--detach"]
    from_file = server.skyreg(project, "deploy", *config)
    assert from_file.returncode == 1 and "no-such-app" in from_file.stderr, from_file.stderr

    region_from_file = server.skyreg(project, "deploy", *config, "--app", "web")
    assert region_from_file.returncode == 1 and "syd" in region_from_file.stderr, (
        region_from_file.stderr
    )

    before = len(server.releases("web"))
    done = server.skyreg(
        project, "deploy", *config, "--app", "web", "--region", "local", "--strategy", "rolling"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    releases = server.releases("web")
    assert len(releases) == before + 1
    assert releases[0]["strategy"] == "rolling" and releases[0]["regions"] == ["local"]


def test_a_file_naming_an_image_refuses_build_only(server: Server, project: Path) -> None:
    (project / "skyreg.toml").write_text('app = "web"\n[build]\nimage = "web:v1"\n')
    done = server.skyreg(project, "deploy", "--build-only")
    assert (done.returncode, done.stderr) == (
        1,
        "error: --build-only: nothing to build, skyreg.toml names an image\n",
    )


def _set(check: dict[str, Any]) -> dict[str, Any]:
    """A check as the API shows it, without the fields it leaves null (a tcp check's path)."""
    return {k: v for k, v in check.items() if v is not None}


def test_the_files_http_service_and_checks_become_the_releases_service(
    server: Server, project: Path
) -> None:
    (project / "skyreg.toml").write_text(
        'app = "web"\n[build]\nimage = "web:v1"\n\n'
        "[http_service]\ninternal_port = 8080\nforce_https = true\n\n"
        '[[http_service.checks]]\npath = "/healthz"\ninterval = "15s"\ntimeout = "3s"\n\n'
        '[checks.db]\ntype = "tcp"\nport = 5432\ngrace_period = "1m"\n\n'
        '[checks.same]\ntype = "http"\nport = 8080\npath = "/ready?full=1"\n'
    )
    done = server.skyreg(project, "deploy", "--detach", "--region", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert "Service on port 8080, 3 health checks." in done.stdout
    [release] = server.releases("web")[:1]
    service = release["service"]
    assert service["internal_port"] == 8080
    assert [_set(c) for c in service["checks"]] == [
        {"type": "http", "port": 8080, "path": "/healthz", "interval": 15.0, "timeout": 3.0,
         "grace_period": 5.0},
        {"type": "tcp", "port": 5432, "interval": 10.0, "timeout": 2.0, "grace_period": 60.0},
        {"type": "http", "port": 8080, "path": "/ready?full=1", "interval": 10.0,
         "timeout": 2.0, "grace_period": 5.0},
    ]  # fmt: skip
    # The app's service is the release's now: the next deploy without one keeps it.
    assert server.app("web")["service"] == service
    (project / "skyreg.toml").write_text('app = "web"\n[build]\nimage = "web:v1"\n')
    again = server.skyreg(project, "deploy", "--detach", "--region", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    [kept] = server.releases("web")[:1]
    assert kept["version"] == release["version"] + 1 and kept["service"] == service
    assert server.app("web")["service"] == service
