"""`skyreg agent`, `skyreg machines list|stop|start|restart` and `skyreg logs [-f]`."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer

from skyreg.cli.client import Client, client, fail, normalize_server
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
        typer.Option(
            "--token", envvar="SKYREG_TOKEN", help="Admin or org token.", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(help="Layer cache and machine rootfs copies (made mode 0711)."),
    ] = Path("/var/lib/skyreg-agent"),
) -> None:
    """Run the machine agent of a region: start, stop and report the region's machines."""
    from skyreg.machines.agent import Agent, check_host
    from skyreg.machines.rootfs import enter_private_mount_namespace

    if not token:
        fail("no token: pass --token or set SKYREG_TOKEN (an admin or org token)")
    problem = check_host()
    if problem:
        fail(problem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Before any thread starts: overlay rootfs mounts stay private to this agent.
    if enter_private_mount_namespace():
        logging.getLogger("skyreg.agent").info("machine rootfs mounts are private to this agent")
    runner = Agent(
        server=normalize_server(server), token=token, region=region, data_dir=data_dir.resolve()
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runner.run(stop)

    asyncio.run(main())


@machines_app.command("list")
def list_machines(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The app's machines: id, region, release, desired and reported state, last event."""
    found = client(server, token)("GET", f"/apps/{_quote(app)}/machines")["machines"]
    if as_json:
        _print_json(found)
        return
    table = _table("ID", "REGION", "RELEASE", "DESIRED", "STATE", "UPDATED", "LAST EVENT")
    for m in found:
        last = m["events"][-1]["message"] if m["events"] else "-"
        table.add_row(
            m["id"],
            m["region"],
            f"v{m['release_version']}",
            m["desired"],
            m["state"],
            _when(m["updated_at"]),
            last,
        )
    _console().print(table)


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
