"""A real `skyreg builder` subprocess (buildah) for the tests that build Dockerfiles."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import requests

from tests.support.agents import RunningAgent


def require_buildah() -> None:
    """Skip unless buildah and runc are here and we are root (CI installs both)."""
    if os.geteuid() != 0:
        pytest.skip("the builder runs buildah as root")
    for binary in ("buildah", "runc"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed (scripts/install-test-tools.sh installs it)")


class RunningBuilder(RunningAgent):
    """A `skyreg builder` process for `server`, its output in `log_path` (start, stop and log as
    `RunningAgent`'s). RUN steps get no network (`--network none`): the tests' base images come
    from the registry itself."""

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "skyreg", "builder", "--region", self.region]
        args += ["--server", self.server, "--data-dir", str(self.data_dir), "--network", "none"]
        return [*args, *self.extra_args]


def builder_registered(server: str, token: str, app: str) -> bool:
    """Whether a builder takes builds of `app` (whose org `token` belongs to)."""
    r = requests.get(f"{server}/api/v1/apps/{app}/builder", auth=("x", token), timeout=10)
    return r.status_code == 200
