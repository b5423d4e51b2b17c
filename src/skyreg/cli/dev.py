"""`skyreg dev`: the whole platform on one machine (a registry node and a region's agent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from skyreg.cli.client import fail

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class DevPlatform:
    """The processes `skyreg dev` runs, started and stopped together."""

    data_dir: Path
    host: str
    port: int
    region: str
    children: list[_Child] = field(default_factory=list)
    url: str = ""
    admin_token: str = ""

    def start(self) -> None:
        registry_dir = self.data_dir / "registry"
        port_file = self.data_dir / "registry.port"
        port_file.unlink(missing_ok=True)
        self._spawn(
            "registry",
            [
                "serve",
                "--host", self.host,
                "--port", str(self.port),
                "--data-dir", str(registry_dir),
                "--port-file", str(port_file),
            ],
        )  # fmt: skip
        port = self._wait_for(lambda: _read(port_file), "the registry to listen")
        self.url = f"http://{_url_host(self.host)}:{port}"
        token_file = registry_dir / "admin-token"
        self.admin_token = self._wait_for(lambda: _read(token_file), "the admin token")
        self._spawn(
            f"agent {self.region}",
            [
                "agent",
                "--region", self.region,
                "--server", self.url,
                "--data-dir", str(self.data_dir / f"agent-{self.region}"),
            ],
            env={"SKYREG_TOKEN": self.admin_token},
        )  # fmt: skip

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "skyreg", *args],
            env={**os.environ, **(env or {})},
            start_new_session=True,  # signals reach children through `stop`, in order
        )
        self.children.append(_Child(name, proc))

    def _wait_for(self, probe: Callable[[], str | None], what: str) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            exited = self.exited()
            if exited is not None:
                raise RuntimeError(f"{exited.name} exited (status {exited.proc.returncode})")
            value = probe()
            if value:
                return value
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def exited(self) -> _Child | None:
        """The first child that is no longer running, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        """SIGTERM every child, agents first (they stop their machines), then the registry."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _unreachable_ancestor(path: Path) -> Path | None:
    """An ancestor of `path` that other users cannot traverse (machines running as non-root
    users need o+x on every directory above their rootfs)."""
    for parent in path.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def dev(
    data_dir: Annotated[
        Path, typer.Option(help="Everything lives here: registry data and the agent's cache.")
    ] = Path(".skyreg-dev"),
    host: Annotated[str, typer.Option(help="Address the registry listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Registry port (0: pick a free one).")] = 5000,
    region: Annotated[str, typer.Option(help="The region code of the machine agent.")] = "local",
) -> None:
    """Run the whole platform on this machine: a registry and a machine agent, until Ctrl-C."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    platform = DevPlatform(data_dir=data_dir, host=host, port=port, region=region)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            platform.start()
        except RuntimeError as e:
            fail(f"skyreg dev: {e}")
        _banner(platform)
        while (exited := platform.exited()) is None:
            time.sleep(0.5)
        typer.echo(f"skyreg dev: {exited.name} exited (status {exited.proc.returncode})", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("skyreg dev: stopping", err=True)
    finally:
        platform.stop()


def _banner(p: DevPlatform) -> None:
    host = p.url.removeprefix("http://")
    token_file = p.data_dir / "registry" / "admin-token"
    lines = [
        "",
        "skyreg dev is running",
        f"  registry   {p.url}   (OCI API /v2/, management API /api/v1, GraphQL /graphql)",
        f"  region     {p.region}: machine agent, data in {p.data_dir / f'agent-{p.region}'}",
        f"  admin      token in {token_file}",
        "",
        "Try:",
        f"  export SKYREG_SERVER={p.url} SKYREG_TOKEN=$(cat {token_file})",
        "  skyreg orgs create acme && skyreg apps create myapp --org acme",
        f"  skyreg push ./result {host}/myapp:latest",
        f"  skyreg deploy --app myapp --image {host}/myapp:latest --region {p.region}",
        "  skyreg machines list --app myapp; skyreg logs --app myapp -f",
        "",
    ]
    if (blocked := _unreachable_ancestor(p.data_dir)) is not None:
        lines.append(
            f"note: {blocked} is not o+x: machines whose image runs as a non-root user cannot "
            "reach their rootfs; use a --data-dir outside it"
        )
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add `dev` to the `skyreg` command."""
    app.command()(dev)
