"""`skyreg agent`, `skyreg machines list|stop|start|restart` and `skyreg logs [-f]`."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer

from skyreg.cli.client import (
    Client,
    TokenFile,
    client,
    fail,
    normalize_server,
    run_until_signalled,
    service_token,
    service_token_option,
)
from skyreg.cli.platform import AsJson, Server, Token, _console, _print_json, _quote, _table, _when

machines_app = typer.Typer(help="Machines that run an app's releases.", no_args_is_help=True)
FOLLOW_INTERVAL = 1.0


def agent(
    region: Annotated[str, typer.Option(help="The region this agent runs machines for.")] = "local",
    server: Annotated[
        str, typer.Option("--server", envvar="SKYREG_SERVER", help="Server URL.")
    ] = "http://127.0.0.1:5000",
    token: Annotated[
        str | None,
        service_token_option(
            "An agent token (`skyreg tokens create agent`: receives machines' secrets), or an "
            "admin or org token (machines without secrets only)."
        ),
    ] = None,
    token_file: TokenFile = None,
    data_dir: Annotated[
        Path,
        typer.Option(help="Layer cache and machine rootfs copies (root-only: mode 0700)."),
    ] = Path("/var/lib/skyreg-agent"),
    # The defaults are UnpackLimits' (they admit a real 10 GB image).
    max_layer_bytes: Annotated[
        int, typer.Option(min=1, help="Most bytes one layer may hold once decompressed.")
    ] = 16 << 30,
    max_image_bytes: Annotated[
        int, typer.Option(min=1, help="Most bytes all layers of an image may hold, decompressed.")
    ] = 32 << 30,
    max_layer_entries: Annotated[
        int, typer.Option(min=1, help="Most tar entries in one layer.")
    ] = 1_000_000,
    max_header_bytes: Annotated[
        int,
        typer.Option(
            min=512, help="Most bytes of extended tar headers (PAX, GNU long names) per entry."
        ),
    ] = 1 << 20,
    max_path_bytes: Annotated[
        int, typer.Option(min=1, help="Longest entry name or link target in a layer, in bytes.")
    ] = 4096,
    max_path_depth: Annotated[
        int,
        typer.Option(min=1, help="Most components in an entry name or hard link target."),
    ] = 256,
    network: Annotated[
        str | None,
        typer.Option(
            "--network",
            metavar="SUBNET",
            help="Give every machine its own network namespace with an address in this private "
            "IPv4 subnet (needs root). Off: machines share the host's network.",
        ),
    ] = None,
    network_prefix: Annotated[
        str,
        typer.Option(help="Name prefix of the bridges, links, namespaces and chains made."),
    ] = "sky",
    no_nat: Annotated[
        bool, typer.Option("--no-nat", help="With --network: do not masquerade outbound traffic.")
    ] = False,
    drain: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="Seconds a machine with a service keeps running once asked to stop.",
        ),
    ] = 2.0,
    lazy: Annotated[
        bool,
        typer.Option(
            "--lazy/--no-lazy",
            help="Start a machine whose image is not here yet from a read-only FUSE mount of "
            "the registry's layer indexes while the image downloads (root, /dev/fuse and "
            "pyfuse3 needed; otherwise, or without indexes, the image is pulled whole first).",
        ),
    ] = True,
) -> None:
    """Run the machine agent of a region: start, stop and report the region's machines."""
    from skyreg.machines.agent import Agent, check_host
    from skyreg.machines.network import HostNetwork, NetworkError
    from skyreg.machines.rootfs import enter_private_mount_namespace
    from skyreg.machines.unpack import UnpackLimits
    from skyreg.privatefs import private_dir

    token = service_token(token, token_file, "for the agent")
    problem = check_host()
    if problem:
        fail(problem)
    host_network = None
    if network is not None:
        try:
            subnet = ipaddress.IPv4Network(network)
        except ValueError as e:
            fail(f"--network: {e}")
        if os.geteuid() != 0:
            fail("--network needs root (network namespaces, links and iptables rules)")
        try:
            host_network = HostNetwork(network_prefix, subnet, nat=not no_nat)
        except NetworkError as e:
            fail(f"--network: {e}")
    try:
        private_dir(data_dir.resolve())
    except ValueError as e:
        fail(f"--data-dir: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Before any thread starts: overlay rootfs mounts stay private to this agent.
    if enter_private_mount_namespace():
        logging.getLogger("skyreg.agent").info("machine rootfs mounts are private to this agent")
    limits = UnpackLimits(
        layer_bytes=max_layer_bytes,
        image_bytes=max_image_bytes,
        entries=max_layer_entries,
        header_bytes=max_header_bytes,
        path_bytes=max_path_bytes,
        path_depth=max_path_depth,
    )
    runner = Agent(
        server=normalize_server(server),
        token=token,
        region=region,
        data_dir=data_dir.resolve(),
        limits=limits,
        network=host_network,
        drain=drain,
        lazy=lazy,
    )
    try:
        run_until_signalled(runner.run)
    except NetworkError as e:
        fail(f"--network: {e}")


@machines_app.command("list")
def list_machines(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The app's machines: id, region, release, desired state (started, stopped, or waiting
    for its turn in a rolling deploy), reported state, address, health (of a release with
    health checks), last event."""
    found = _all_machines(client(server, token), app)
    if as_json:
        _print_json(found)
        return
    table = _table(
        "ID", "REGION", "RELEASE", "DESIRED", "STATE", "ADDRESS", "HEALTH", "UPDATED", "LAST EVENT"
    )
    for m in found:
        last = m["events"][-1]["message"] if m["events"] else "-"
        table.add_row(
            m["id"],
            m["region"],
            f"v{m['release_version']}",
            m["desired"],
            m["state"],
            m.get("address") or "-",
            m.get("health") or "-",
            _when(m["updated_at"]),
            last,
        )
    _console().print(table)


LIST_PAGE = 100
MAX_LIST_PAGES = 1000


def _all_machines(api: Client, app: str) -> list[dict[str, Any]]:
    """Every machine of the app, following the listing's pages."""
    found: list[dict[str, Any]] = []
    query: dict[str, str | None] = {"limit": str(LIST_PAGE)}
    for _ in range(MAX_LIST_PAGES):
        page: dict[str, Any] = api("GET", f"/apps/{_quote(app)}/machines", query=query)
        found += page["machines"]
        cursor = page.get("next_cursor")
        if not cursor or cursor == query.get("cursor"):
            return found
        query["cursor"] = str(cursor)
    fail(f"more than {MAX_LIST_PAGES} pages of machines")


def _change(action: str, machine_id: str, server: str | None, token: str | None) -> None:
    m = client(server, token)(
        "POST", f"/machines/{urllib.parse.quote(machine_id, safe='')}/{action}"
    )
    typer.echo(f"Machine {m['id']}: desired {m['desired']}, state {m['state']}.")


@machines_app.command("stop")
def stop(
    machine_id: Annotated[str, typer.Argument(help="Machine id.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Stop a machine (SIGTERM, then SIGKILL after 5 s)."""
    _change("stop", machine_id, server, token)


@machines_app.command("start")
def start(
    machine_id: Annotated[str, typer.Argument(help="Machine id.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Start a stopped (or failed) machine again."""
    _change("start", machine_id, server, token)


@machines_app.command("restart")
def restart(
    machine_id: Annotated[str, typer.Argument(help="Machine id.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Restart a machine on a fresh copy of its image (its writes are gone)."""
    _change("restart", machine_id, server, token)


def logs(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Print the app's machine logs (`-f`: follow them until interrupted)."""
    api = client(server, token)
    try:
        after = _print_logs(api, app, 0)
        while follow:
            time.sleep(FOLLOW_INTERVAL)
            after = _print_logs(api, app, after)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print_logs(api: Client, app: str, after: int) -> int:
    while True:
        page: dict[str, Any] = api("GET", f"/apps/{_quote(app)}/logs", query={"after": str(after)})
        for line in page["lines"]:
            typer.echo(f"{line['at']} {line['machine_id']} [{line['region']}] {line['line']}")
        if not page["lines"]:
            return after
        after = int(page["last"])


def register(app: typer.Typer) -> None:
    """Add `agent`, `machines` and `logs` to the `skyreg` command."""
    app.command()(agent)
    app.add_typer(machines_app, name="machines")
    app.command()(logs)
