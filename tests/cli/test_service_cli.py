"""An app's service from the command line, against a real server: `skyreg apps update --port
--check-*` sets it (`--no-service` clears it) and `apps show` prints it; flags the API would
refuse end the command first; `skyreg machines list` shows the address and health agents
report; `skyreg deploy` waits for the health checks and names the machine whose checks failed.

No agent runs: the tests play it, posting reports with the admin token. The commands run in
this process. Org `acme` owns every app; `web` holds the image `web:v1`, which every app's
releases deploy (an org token deploys its org's images).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyreg.client.push import push_image
from tests.support.cli import skyreg_as
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy, answer, api

APPS = ("web", "api", "shop", "cart", "queue")


@dataclass
class Platform:
    reg: InProcessRegistry
    acme: str  # an org token of acme
    admin: str

    def skyreg(self, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return skyreg_as(home, self.reg.url, self.acme, *args)

    def app(self, app: str) -> dict[str, Any]:
        return dict(answer(api(self.reg, "GET", f"/apps/{app}", self.acme), 200))

    def machines(self, app: str) -> list[dict[str, Any]]:
        found = answer(api(self.reg, "GET", f"/apps/{app}/machines", self.acme), 200)
        return list(found["machines"])

    def newest_version(self, app: str) -> int:
        found = answer(api(self.reg, "GET", f"/apps/{app}/releases", self.acme), 200)
        return max((int(r["version"]) for r in found["releases"]), default=0)

    def report(self, machine_id: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """As the agent: POST /agent/machines/ID/WHAT (state, health); the Machine answered."""
        path = f"/agent/machines/{machine_id}/{what}"
        return dict(answer(api(self.reg, "POST", path, self.admin, json=body), 200))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("service-cli") / "data")
    with contextlib.ExitStack() as stack:
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        for name in APPS:
            t.app(name, "acme")
        layout = write_oci_layout(
            tmp_path_factory.mktemp("images") / "web", [("v1", build_image("web"))]
        )
        push_image(layout, f"{reg.host}/web:v1", t.admin_secret())
        acme, _ = t.token("org", org="acme")
        yield Platform(reg, acme, t.admin_secret())


def _set(check: dict[str, Any]) -> dict[str, Any]:
    """A check as the API shows it, without the fields it leaves null (a tcp check's path)."""
    return {k: v for k, v in check.items() if v is not None}


def test_apps_update_sets_shows_and_clears_the_service(platform: Platform, tmp_path: Path) -> None:
    done = platform.skyreg(
        tmp_path,
        *("apps", "update", "web", "--port", "8080", "--check-http", "/healthz"),
        *("--check-http", "/ready?deep=1", "--check-tcp", "--check-interval", "15s"),
        *("--check-timeout", "3s", "--check-grace", "1m"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "App web is private.",
        "Service: port 8080",
        "  http check of port 8080 /healthz every 15s, timeout 3s, grace period 60s",
        "  http check of port 8080 /ready?deep=1 every 15s, timeout 3s, grace period 60s",
        "  tcp check of port 8080 every 15s, timeout 3s, grace period 60s",
    ]
    assert done.stderr == "The service takes effect with the app's next release.\n"
    timing = {"interval": 15.0, "timeout": 3.0, "grace_period": 60.0}
    service = platform.app("web")["service"]
    assert service["internal_port"] == 8080
    assert [_set(c) for c in service["checks"]] == [
        {"type": "http", "port": 8080, "path": "/healthz", **timing},
        {"type": "http", "port": 8080, "path": "/ready?deep=1", **timing},
        {"type": "tcp", "port": 8080, **timing},
    ]

    # Other changes leave it alone; `apps show` prints it.
    other = platform.skyreg(tmp_path, "apps", "update", "web", "--public")
    assert other.returncode == 0, other.stderr
    assert other.stdout == "App web is public.\n"
    assert platform.app("web")["service"] == service
    shown = platform.skyreg(tmp_path, "apps", "show", "web")
    assert shown.returncode == 0, shown.stderr
    assert "Service: port 8080\n  http check of port 8080 /healthz every 15s" in shown.stdout

    # A port alone: a service without checks.
    bare = platform.skyreg(tmp_path, "apps", "update", "web", "--port", "3000")
    assert bare.returncode == 0, bare.stderr
    assert "Service: port 3000, no health checks (machines are ready once started)." in bare.stdout
    assert platform.app("web")["service"] == {"internal_port": 3000, "checks": []}

    cleared = platform.skyreg(tmp_path, "apps", "update", "web", "--no-service")
    assert cleared.returncode == 0, cleared.stderr
    assert "Service: none" in cleared.stdout
    assert platform.app("web")["service"] is None
    shown = platform.skyreg(tmp_path, "apps", "show", "web")
    assert "Service: none (the proxy sends the app no requests)." in shown.stdout


FLAG_ERRORS = [
    pytest.param(
        ["--check-http", "/healthz"],
        "error: --check-http: set the service's port too (--port PORT)\n",
        id="check-without-port",
    ),
    pytest.param(
        ["--check-tcp", "--check-interval", "5s"],
        "error: --check-tcp, --check-interval: set the service's port too (--port PORT)\n",
        id="checks-without-port",
    ),
    pytest.param(
        ["--port", "8080", "--check-grace", "5s"],
        "error: --check-grace: add a check (--check-http PATH or --check-tcp)\n",
        id="timing-without-check",
    ),
    pytest.param(
        ["--no-service", "--port", "8080", "--check-tcp"],
        "error: --no-service removes the service: give no --port, --check-tcp with it\n",
        id="no-service-and-port",
    ),
    pytest.param(
        ["--port", "8080", "--check-http", "healthz"],
        "error: --check-http must start with '/', not 'healthz'\n",
        id="relative-path",
    ),
    pytest.param(
        ["--port", "8080", "--check-http", "/a b"],
        "error: --check-http must be printable ASCII without spaces (write a space as %20)\n",
        id="path-with-space",
    ),
    pytest.param(
        ["--port", "8080", "--check-tcp", "--check-interval", "5 minutes"],
        "error: --check-interval must be a duration: use a duration such as 10s, 1m or 1h30m, "
        "not '5 minutes'\n",
        id="malformed-duration",
    ),
    pytest.param(
        ["--port", "8080", "--check-tcp", "--check-interval", "2h"],
        "error: --check-interval must be from 1s to 1h\n",
        id="interval-range",
    ),
    pytest.param(
        ["--port", "8080", "--check-tcp", "--check-timeout", "20s"],
        "error: --check-timeout must be at most the interval (10s by default), not 20s\n",
        id="timeout-over-interval",
    ),
    pytest.param(
        ["--port", "8080", "--check-tcp", "--check-interval", "1s"],
        "error: --check-interval must be at least the timeout (2s by default), not 1s\n",
        id="interval-under-timeout",
    ),
    pytest.param(
        ["--port", "8080", *[a for i in range(11) for a in ("--check-http", f"/{i}")]],
        "error: at most 10 health checks\n",
        id="too-many-checks",
    ),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_ERRORS)
def test_check_flags_the_api_would_refuse_end_the_command_first(
    platform: Platform, tmp_path: Path, flags: list[str], message: str
) -> None:
    before = platform.app("cart")
    done = platform.skyreg(tmp_path, "apps", "update", "cart", *flags)
    assert (done.returncode, done.stderr) == (1, message), done.stdout
    assert platform.app("cart") == before


def test_a_port_out_of_range_is_a_usage_error(platform: Platform, tmp_path: Path) -> None:
    done = platform.skyreg(tmp_path, "apps", "update", "cart", "--port", "70000")
    assert done.returncode == 2 and "--port" in done.stderr, done.stderr


def _deploy(platform: Platform, home: Path, app: str, *args: str) -> int:
    """Deploy web:v1 to `app` without waiting; the release's version."""
    done = platform.skyreg(
        home, "deploy", "--app", app, "--image", "web:v1", "--region", "local", "--detach", *args
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Release v(\d+) of ", done.stdout)
    assert found, done.stdout
    return int(found.group(1))


def test_machines_list_shows_the_reported_address_and_health(
    platform: Platform, tmp_path: Path
) -> None:
    plain = _deploy(platform, tmp_path, "api")  # no service: no health
    [old] = [m for m in platform.machines("api") if m["release_version"] == plain]
    platform.report(old["id"], "state", {"state": "starting", "address": "10.0.0.6"})

    set_service = ("apps", "update", "api", "--port", "8080", "--check-http", "/healthz")
    assert platform.skyreg(tmp_path, *set_service).returncode == 0
    version = _deploy(platform, tmp_path, "api")
    [m] = [m for m in platform.machines("api") if m["release_version"] == version]
    assert (m["address"], m["health"]) == (None, None)
    listed = platform.skyreg(tmp_path, "machines", "list", "--app", "api")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:7] == [
        "ID",
        "REGION",
        "RELEASE",
        "DESIRED",
        "STATE",
        "ADDRESS",
        "HEALTH",
    ]
    row = next(r.split() for r in rows if r.startswith(m["id"]))
    assert row[4:7] == ["created", "-", "-"], rows
    row = next(r.split() for r in rows if r.startswith(old["id"]))
    assert row[4:7] == ["starting", "10.0.0.6", "-"], rows

    platform.report(m["id"], "state", {"state": "starting", "address": "fd00::7"})
    listed = platform.skyreg(tmp_path, "machines", "list", "--app", "api")
    row = next(r.split() for r in listed.stdout.splitlines() if r.startswith(m["id"]))
    assert row[4:7] == ["starting", "fd00::7", "starting"], listed.stdout

    platform.report(m["id"], "state", {"state": "started"})
    platform.report(m["id"], "health", {"status": "passing"})
    listed = platform.skyreg(tmp_path, "machines", "list", "--app", "api")
    row = next(r.split() for r in listed.stdout.splitlines() if r.startswith(m["id"]))
    assert row[4:7] == ["started", "fd00::7", "passing"], listed.stdout
    assert "Health checks passing" in listed.stdout  # the last event

    as_json = platform.skyreg(tmp_path, "machines", "list", "--app", "api", "--json")
    by_id = {m["id"]: m for m in json.loads(as_json.stdout)}
    assert (by_id[m["id"]]["address"], by_id[m["id"]]["health"]) == ("fd00::7", "passing")
    assert (by_id[old["id"]]["address"], by_id[old["id"]]["health"]) == ("10.0.0.6", None)


def test_a_rolling_deploys_held_back_machines_read_waiting(
    platform: Platform, tmp_path: Path
) -> None:
    live = _deploy(platform, tmp_path, "queue")
    version = _deploy(platform, tmp_path, "queue", "--count", "2")
    listed = platform.skyreg(tmp_path, "machines", "list", "--app", "queue")
    assert listed.returncode == 0, listed.stderr
    desired = sorted(
        (row[2], row[3]) for row in (r.split() for r in listed.stdout.splitlines()[1:])
    )
    assert desired == [
        (f"v{live}", "started"),
        (f"v{version}", "started"),
        (f"v{version}", "waiting"),
    ]


def _play_agent(
    platform: Platform, app: str, version: int, health: dict[str, Any]
) -> tuple[threading.Thread, list[str]]:
    """A thread that, as the agent, starts the machine of release `version` of `app` once it
    exists (starting with an address, then started) and reports `health`; it appends the
    machine's id to the list it returns (or an error)."""
    found: list[str] = []

    def run() -> None:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                mine = [m for m in platform.machines(app) if m["release_version"] == version]
                if mine:
                    break
                time.sleep(0.1)
            else:
                found.append("error: no machine of the release")
                return
            [m] = mine
            found.append(m["id"])
            platform.report(m["id"], "state", {"state": "starting", "address": "10.0.0.9"})
            time.sleep(0.3)  # the wait sees `starting` with its health unknown
            platform.report(m["id"], "state", {"state": "started"})
            time.sleep(0.3)
            platform.report(m["id"], "health", health)
        except Exception as e:  # the test names it
            found.append(f"error: {e!r}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, found


def _waited_deploy(
    platform: Platform, home: Path, app: str, health: dict[str, Any]
) -> tuple[subprocess.CompletedProcess[str], int, str]:
    version = platform.newest_version(app) + 1
    thread, found = _play_agent(platform, app, version, health)
    done = platform.skyreg(
        home,
        *("deploy", "--app", app, "--image", "web:v1", "--region", "local"),
        *("--strategy", "immediate", "--wait-timeout", "60s"),
    )
    thread.join(timeout=60)
    assert found and not found[0].startswith("error"), found
    return done, version, found[0]


def test_deploy_waits_for_the_health_checks_and_names_a_critical_machine(
    platform: Platform, tmp_path: Path
) -> None:
    set_service = ("apps", "update", "shop", "--port", "8080", "--check-http", "/healthz")
    assert platform.skyreg(tmp_path, *set_service).returncode == 0

    done, version, machine = _waited_deploy(platform, tmp_path, "shop", {"status": "passing"})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Service on port 8080, 1 health check." in out
    assert f"Waiting for release v{version} of shop to start and pass its 1 health check" in out
    prefix = f"  machine {machine} [local]: "
    assert f"{prefix}state started" in out and f"{prefix}Health checks passing" in out, out
    assert out.rstrip().endswith(f"Release v{version} of shop is complete."), out

    critical = {"status": "critical", "message": "GET /healthz: 503 Service Unavailable"}
    done, version, machine = _waited_deploy(platform, tmp_path, "shop", critical)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    assert err.startswith(f"error: release v{version} failed:\n"), err
    assert (
        f"  machine {machine} [local] failed its health checks: Health checks critical: "
        "GET /healthz: 503 Service Unavailable\n"
    ) in err, err
