"""A real `skyreg builder` subprocess (buildah) for the tests that build Dockerfiles."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def require_buildah() -> None:
    """Skip unless buildah and runc are here and we are root (CI installs both)."""
    if os.geteuid() != 0:
        pytest.skip("the builder runs buildah as root")
    for binary in ("buildah", "runc"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed (scripts/install-test-tools.sh installs it)")


@dataclass
class RunningBuilder:
    """A `skyreg builder` process for `server`, its output in `log_path`; the token goes
    through SKYREG_TOKEN, never the command line. RUN steps get no network (`--network none`):
    the tests' base images come from the registry itself."""

    server: str
    token: str
    data_dir: Path
    log_path: Path
    region: str = "local"
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "skyreg", "builder", "--region", self.region]
        args += ["--server", self.server, "--data-dir", str(self.data_dir), "--network", "none"]
        args += self.extra_args
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SKYREG_TOKEN": self.token},
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self, tail: int = 8000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]
