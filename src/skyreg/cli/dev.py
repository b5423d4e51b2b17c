"""`skyreg dev`: the whole platform on one machine (a registry node, a region's agent, a
builder)."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from skyreg.cli.client import fail
from skyreg.geo.regions import REGION_RE
from skyreg.privatefs import private_dir

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Run in a child before it execs: the kernel sends it SIGTERM when `skyreg dev` dies, even
    by SIGKILL, so no registry or agent outlives it; if it died already, exit now."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: `stop` is then the only way down
        return
    if os.getppid() != parent:
        os._exit(1)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class RegionEndpoints:
    code: str
    url: str
    data_dir: Path
    agent_dir: Path


@dataclass
class DevPlatform:
    """The processes `skyreg dev` runs, started and stopped together.

    One region (`regions` = [code]): a registry node with everything in its data dir. Several:
    one node per region, each with its own blob directory, all on one metadata database
    (`<data-dir>/meta.db`) and one regions file (`<data-dir>/regions.json`), the nodes
    fetching from each other with the admin token as their service credential.
    """

    data_dir: Path
    host: str
    port: int
    regions: list[str]
    children: list[_Child] = field(default_factory=list)
    endpoints: list[RegionEndpoints] = field(default_factory=list)
    admin_token: str = ""
    builder_problem: str | None = None  # why no builder runs (None: one does)
    proxy_port: int = 8080  # 0: a free one, picked at start
    # Each region's agent gives machines their own network in one of these (None: machines
    # share the host's network); `network_problem` says why not.
    networks: list[ipaddress.IPv4Network] | None = None
    network_problem: str | None = None

    @property
    def multi(self) -> bool:
        return len(self.regions) > 1

    @property
    def url(self) -> str:
        return self.endpoints[0].url

    @property
    def _token_file(self) -> Path:
        home = self.data_dir / self.regions[0] if self.multi else self.data_dir
        return home / "registry" / "admin-token"

    def start(self) -> None:
        ports = self._ports()
        for i, (code, port) in enumerate(zip(self.regions, ports, strict=True)):
            home = self.data_dir / code if self.multi else self.data_dir
            private_dir(home, mode=0o711)  # as data_dir: an ancestor of an agent's data dir
            registry_dir = home / "registry"
            port_file = home / "registry.port"
            port_file.unlink(missing_ok=True)
            args = [
                "serve",
                "--host", self.host,
                "--port", str(port),
                "--data-dir", str(registry_dir),
                "--port-file", str(port_file),
            ]  # fmt: skip
            if self.multi:
                if i == 0:
                    self._write_regions(ports)
                args += [
                    "--database-url", f"sqlite:///{self.data_dir / 'meta.db'}",
                    "--region", code,
                    "--regions-file", str(self.data_dir / "regions.json"),
                    # The first node creates the admin token; every node uses it between regions.
                    "--peer-token-file", str(self._token_file),
                    # One master key file for app secrets: the nodes share their database.
                    "--secrets-key-file", str(self._secrets_key_file()),
                ]  # fmt: skip
            self._spawn(f"registry {code}", args)
            bound = self._wait_for(partial(_read, port_file), f"the {code} registry to listen")
            url = f"http://{_url_host(self.host)}:{bound}"
            self.endpoints.append(RegionEndpoints(code, url, registry_dir, home / f"agent-{code}"))
            if i == 0:
                self.admin_token = self._wait_for(
                    lambda: _read(self._token_file), "the admin token"
                )
        # Agents run with an agent token (every org's machines): only such a token receives the
        # machines' secrets (`skyreg secrets`).
        from skyreg.cli.client import Client

        made = Client(self.endpoints[0].url, self.admin_token).call(
            "POST", "/tokens", {"kind": "agent", "name": "skyreg dev agents"}
        )
        agent_token = {"SKYREG_TOKEN": str(made["secret"])}
        routes = Client(self.endpoints[0].url, self.admin_token).call(
            "POST", "/tokens", {"kind": "proxy", "name": "skyreg dev proxy"}
        )
        for i, ep in enumerate(self.endpoints):
            args = [
                "agent",
                "--region",
                ep.code,
                "--server",
                ep.url,
                "--data-dir",
                str(ep.agent_dir),
            ]
            if self.networks is not None:
                args += ["--network", str(self.networks[i]), "--network-prefix", f"sd{i}"]
            self._spawn(f"agent {ep.code}", args, env=agent_token)
        # One proxy, in the first region (it falls back to the others' machines), with a token
        # that reads the routes and nothing else.
        if self.proxy_port == 0:
            self.proxy_port = _free_port(self.host)
        first = self.endpoints[0]
        self._spawn(
            "proxy",
            ["proxy", "--server", first.url, "--region", first.code,
             "--listen", f"{_url_host(self.host)}:{self.proxy_port}",
             *(["--regions-file", str(self.data_dir / "regions.json")] if self.multi else [])],
            env={"SKYREG_TOKEN": str(routes["secret"])},
        )  # fmt: skip
        if self.builder_problem is None:  # one builder, in the first region
            first = self.endpoints[0]
            self._spawn(
                f"builder {first.code}",
                ["builder", "--region", first.code, "--server", first.url,
                 "--data-dir", str(first.data_dir.parent / f"builder-{first.code}")],
                env={"SKYREG_TOKEN": self.admin_token},
            )  # fmt: skip

    def _secrets_key_file(self) -> Path:
        """The regions' shared master key file (made on first use, 0600)."""
        from skyreg.auth.envelope import generate_key_file

        path = self.data_dir / "secrets.key"
        if not path.exists():
            generate_key_file(path)
        return path

    def _ports(self) -> list[int]:
        """One port per region: consecutive from `port`, or free ones picked now for port 0
        (a multi-region file names every node before it starts)."""
        if self.port != 0:
            return [self.port + i for i in range(len(self.regions))]
        if not self.multi:
            return [0]
        socks = [socket.socket() for _ in self.regions]
        try:
            for sock in socks:
                sock.bind((self.host, 0))
            return [int(sock.getsockname()[1]) for sock in socks]
        finally:
            for sock in socks:
                sock.close()

    def _write_regions(self, ports: list[int]) -> None:
        doc = {
            "regions": {
                code: {"url": f"http://{_url_host(self.host)}:{port}"}
                for code, port in zip(self.regions, ports, strict=True)
            }
        }
        path = self.data_dir / "regions.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "skyreg", *args],
            env={**os.environ, **(env or {})},
            start_new_session=True,  # signals reach children through `stop`, in order
            preexec_fn=partial(_die_with, os.getpid()),
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


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((_url_host(host).strip("[]"), 0))
        return int(sock.getsockname()[1])


NETWORK_TOOLS = ("ip", "iptables", "iptables-restore", "nsenter", "setpriv")


def machine_networks(count: int) -> tuple[list[ipaddress.IPv4Network] | None, str | None]:
    """One free 10.x.0.0/16 per region for the agents' machine networks, or (None, why not):
    they need root, the tools, IP forwarding, and ranges no route of the host uses."""
    if os.geteuid() != 0:
        return None, "machine networks need root"
    missing = [tool for tool in NETWORK_TOOLS if shutil.which(tool) is None]
    if missing:
        return None, f"machine networks need {', '.join(missing)}"
    try:
        forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        forwarding = False
    if not forwarding:
        return None, "machine networks need net.ipv4.ip_forward=1"
    shown = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, check=False
    )
    taken: list[ipaddress.IPv4Network] = []
    for route in json.loads(shown.stdout or b"[]"):
        dst, dev = str(route.get("dst", "")), str(route.get("dev", ""))
        if dst and dst != "default" and not dev.startswith("sd"):  # ours from a previous run
            try:
                taken.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
    picked: list[ipaddress.IPv4Network] = []
    for second in range(200, 250):
        net = ipaddress.IPv4Network(f"10.{second}.0.0/16")
        if not any(net.overlaps(t) for t in taken):
            picked.append(net)
            if len(picked) == count:
                return picked, None
    return None, "no free 10.x.0.0/16 range for machine networks"


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
    regions: Annotated[
        str | None,
        typer.Option(
            help="Several regions, e.g. iad,sin,syd: a registry node (own blob store) and an "
            "agent per region over one metadata database.",
            show_default=False,
        ),
    ] = None,
    proxy_port: Annotated[
        int, typer.Option(help="Port of the proxy to the apps (<app>.localhost; 0: a free one).")
    ] = 8080,
    machine_network: Annotated[
        bool,
        typer.Option(
            help="Give each machine its own network (when running as root with ip, iptables, "
            "nsenter and setpriv); without, machines share the host's."
        ),
    ] = True,
) -> None:
    """Run the whole platform on this machine: registry and machine agent, until Ctrl-C."""
    codes = [c.strip() for c in (regions or region).split(",") if c.strip()]
    bad = [c for c in codes if not REGION_RE.match(c)]
    if bad or not codes or len(set(codes)) != len(codes):
        fail(f"regions must be distinct region codes such as iad,sin,syd (got {regions or region})")
    data_dir = data_dir.resolve()
    # 0711: what lies in it is private (the registry's and agents' own 0700 dirs), but agents'
    # non-root machines need o+x on every ancestor of the agent's data dir.
    private_dir(data_dir, mode=0o711)
    platform = DevPlatform(
        data_dir=data_dir, host=host, port=port, regions=codes, proxy_port=proxy_port
    )
    if machine_network:
        platform.networks, platform.network_problem = machine_networks(len(codes))
    else:
        platform.network_problem = "--no-machine-network"
    from skyreg.builder.buildah import BuildahSettings
    from skyreg.builder.host import check_host as check_builder_host

    platform.builder_problem = check_builder_host(BuildahSettings())

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
    token_file = p._token_file
    lines = ["", "skyreg dev is running"]
    for ep in p.endpoints:
        lines.append(
            f"  region {ep.code:<6} registry {ep.url}  (/v2/, /api/v1, /graphql, /metrics)  "
            f"agent data {ep.agent_dir}"
        )
    last = p.endpoints[-1]
    lines += [
        f"  admin token in {token_file}",
        "",
        "Try:",
        f"  export SKYREG_SERVER={p.url} SKYREG_TOKEN=$(cat {token_file})",
        "  skyreg orgs create acme && skyreg apps create myapp --org acme",
        f"  skyreg push ./result {host}/myapp:latest",
        "  skyreg apps update myapp --port 8080 --check-http /   # where it listens; its check",
        f"  skyreg deploy --app myapp --image {host}/myapp:latest --region {last.code}",
        "  cd a-directory-with-a-Dockerfile && skyreg deploy --app myapp   # built by the builder",
        "  skyreg machines list --app myapp; skyreg logs --app myapp -f",
        f"  curl http://myapp.localhost:{p.proxy_port}/   # the proxy, to the app's machines",
    ]
    if p.multi:
        lines.append(
            "  skyreg images show myapp:latest; skyreg replication status   # copies per region"
        )
    lines.append("")
    if p.network_problem is not None:
        lines.append(
            f"note: machines share the host's network ({p.network_problem}): one machine per "
            "app and port on this host"
        )
    if p.builder_problem is not None:
        lines.append(f"note: no builder runs ({p.builder_problem}); use deploy --build-local")
    if (blocked := _unreachable_ancestor(p.data_dir)) is not None:
        lines.append(
            f"note: {blocked} is not o+x: machines whose image runs as a non-root user cannot "
            "reach their rootfs; use a --data-dir outside it"
        )
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add `dev` to the `skyreg` command."""
    app.command()(dev)
