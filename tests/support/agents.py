"""A real `skyreg agent` subprocess for the tests that run machines."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunningAgent:
    """A `skyreg agent` process polling the registry at `server`, its output in `log_path`.

    The token goes through SKYREG_TOKEN, never the command line (which every host user can read).
    """

    server: str
    token: str
    data_dir: Path
    log_path: Path
    region: str = "local"
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the agent is not running"
        return self.proc.pid

    def command(self) -> list[str]:
        """The process's command line (never the token)."""
        args = [sys.executable, "-m", "skyreg", "agent", "--region", self.region]
        return [*args, "--server", self.server, "--data-dir", str(self.data_dir), *self.extra_args]

    def start(self) -> None:
        """Start the agent (it inherits the caller's umask); does not wait for its first poll."""
        args = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SKYREG_TOKEN": self.token},
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the agent has not exited within 30 seconds."""
        terminate(self.proc)
        self.proc = None

    def log(self, tail: int = 5000) -> str:
        """The last `tail` characters of the agent's output."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM a process that still runs, then SIGKILL if it has not exited within `timeout`."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine_top(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A fresh directory to hold an agent's data dir, removed when `stack` closes.

    Machines that run as a non-root user must reach their rootfs, so every ancestor of the
    agent's data dir must be o+x: pytest's own temp dirs are 0700, this one is 0711.
    """
    top = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, top, ignore_errors=True)
    top.chmod(0o711)
    return top
