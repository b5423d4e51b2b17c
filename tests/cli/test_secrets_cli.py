"""`skyreg secrets set|list|unset` as people type them, against a real server: NAME=VALUE
arguments or lines on standard input, names and digests listed, values never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessRegistry, str]]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("secrets-cli") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        token, _ = t.token("org", org="acme")
        yield reg, token
    finally:
        reg.stop()


def skyreg(
    server: tuple[InProcessRegistry, str], home: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    reg, token = server
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "xdg"),
        SKYREG_SERVER=reg.url,
        SKYREG_TOKEN=token,
        COLUMNS="250",
    )
    return subprocess.run(
        [sys.executable, "-m", "skyreg", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lines_on_standard_input_are_set_and_listed_without_their_values(
    server: tuple[InProcessRegistry, str], tmp_path: Path
) -> None:
    lines = "# production\nDATABASE_URL=postgres://u:pa=ss@db/x\n\nAPI_KEY=k-123456789\n"
    done = skyreg(server, tmp_path, "secrets", "set", "web", "-", "TOKEN=t-987654321", stdin=lines)
    assert done.returncode == 0, done.stderr
    # No release yet: staged for the first deploy.
    assert "set API_KEY, DATABASE_URL, TOKEN" in done.stdout and "staged" in done.stdout
    listed = skyreg(server, tmp_path, "secrets", "list", "web")
    assert listed.returncode == 0, listed.stderr
    for name in ("DATABASE_URL", "API_KEY", "TOKEN"):
        assert name in listed.stdout
    as_json = json.loads(skyreg(server, tmp_path, "secrets", "list", "web", "--json").stdout)
    by_name = {s["name"]: s for s in as_json["secrets"]}
    assert set(by_name) == {"DATABASE_URL", "API_KEY", "TOKEN"}
    assert all(not s["deployed"] for s in by_name.values())
    for value in ("postgres://u:pa=ss@db/x", "k-123456789", "t-987654321"):
        assert value not in listed.stdout + json.dumps(as_json) + done.stdout + done.stderr

    unset = skyreg(server, tmp_path, "secrets", "unset", "web", "API_KEY", "NOT_THERE")
    assert unset.returncode == 0, unset.stderr
    after = json.loads(skyreg(server, tmp_path, "secrets", "list", "web", "--json").stdout)
    assert {s["name"] for s in after["secrets"]} == {"DATABASE_URL", "TOKEN"}


def test_a_malformed_line_is_named_by_number_and_nothing_is_set(
    server: tuple[InProcessRegistry, str], tmp_path: Path
) -> None:
    done = skyreg(
        server, tmp_path, "secrets", "set", "web", "-", stdin="GOOD=1\nthis-is-the-secret\n"
    )
    assert done.returncode == 1
    assert done.stderr == "error: line 2 of standard input is not NAME=VALUE\n"
    listed = json.loads(skyreg(server, tmp_path, "secrets", "list", "web", "--json").stdout)
    assert "GOOD" not in {s["name"] for s in listed["secrets"]}
    bare = skyreg(server, tmp_path, "secrets", "set", "web", "hunter2-typed-alone")
    assert bare.returncode == 1 and "hunter2" not in bare.stderr + bare.stdout
