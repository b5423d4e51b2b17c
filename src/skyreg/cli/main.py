"""The `skyreg` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from skyreg import __version__
from skyreg.cli.deploy import register as register_deploy
from skyreg.cli.dev import register as register_dev
from skyreg.cli.machines import register as register_machines
from skyreg.cli.platform import register
from skyreg.cli.push import register as register_push

app = typer.Typer(
    help="skyreg: an OCI container registry and the deploy path behind it.",
    no_args_is_help=True,
    add_completion=False,
)


def default_data_dir() -> Path:
    """$SKYREG_DATA_DIR, else $XDG_DATA_HOME/skyreg, else ~/.local/share/skyreg."""
    if env := os.environ.get("SKYREG_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "skyreg"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: pick a free one).")] = 5000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where metadata and blobs live [env: SKYREG_DATA_DIR].",
            show_default="~/.local/share/skyreg",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_DATABASE_URL",
            help="SQLAlchemy URL of the metadata database (default: SQLite in the data dir).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing the socket.")] = 1,
    upload_ttl: Annotated[
        float, typer.Option(help="Seconds an idle upload is kept before it expires.")
    ] = 24 * 3600.0,
    expiry_interval: Annotated[
        float, typer.Option(help="Seconds between sweeps for expired uploads.")
    ] = 300.0,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound port to this file once listening.")
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log one line per request.")] = True,
    auth: Annotated[
        bool,
        typer.Option(
            help="Require tokens (--no-auth: a private registry anyone reaching it may use)."
        ),
    ] = True,
    auth_service: Annotated[
        str, typer.Option(help="Service name in registry tokens and challenges.")
    ] = "skyreg",
    auth_failure_limit: Annotated[
        int,
        typer.Option(min=1, help="Failed logins per client per minute before it must wait (429)."),
    ] = 10,
) -> None:
    """Run the registry (SQLite + filesystem under one data dir by default)."""
    from skyreg.registry.server import ServeConfig
    from skyreg.registry.server import serve as run

    run(
        ServeConfig(
            data_dir=(data_dir or default_data_dir()).resolve(),
            host=host,
            port=port,
            database_url=database_url,
            workers=workers,
            upload_ttl=upload_ttl,
            expiry_interval=expiry_interval,
            port_file=port_file,
            access_log=access_log,
            auth=auth,
            auth_service=auth_service,
            auth_failure_limit=auth_failure_limit,
        )
    )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"skyreg {__version__}")


register(app)
register_deploy(app)
register_dev(app)
register_machines(app)
register_push(app)

keys_app = typer.Typer(help="Registry-token signing keys in the data dir.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DataDir = Annotated[
    Path | None,
    typer.Option(help="The server's data dir [env: SKYREG_DATA_DIR].", show_default=False),
]


@keys_app.command("rotate")
def keys_rotate(
    data_dir: DataDir = None,
    keep: Annotated[
        int, typer.Option(min=1, help="How many of the newest keys keep verifying tokens.")
    ] = 2,
) -> None:
    """Add a new signing key; running servers sign with it within seconds.

    Tokens signed with the previous key keep working until they expire (minutes) while that key
    is among the `--keep` newest; older keys are deleted.
    """
    from skyreg.auth.keys import KeyRing

    ring = KeyRing((data_dir or default_data_dir()).resolve() / "keys")
    kid = ring.rotate()
    removed = ring.retire(keep=keep)
    typer.echo(f"new signing key {kid}" + (f"; removed {', '.join(removed)}" if removed else ""))


def main() -> None:
    """Entry point of the `skyreg` script."""
    app()
