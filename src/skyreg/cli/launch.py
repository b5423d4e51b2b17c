"""`skyreg launch`: create an app for a project, write its skyreg.toml, then deploy it.

Like `fly launch`: the project is a directory with a Dockerfile (or `--image` names what to
run). The app gets `--name` or a name the server generates; the skyreg.toml written holds the
app, the primary region and what to build, and the first deploy is `skyreg deploy PATH`'s own
code reading that file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from skyreg.cli.appconfig import CONFIG_NAME, AppConfig, BuildConfig, render_config
from skyreg.cli.client import client, fail
from skyreg.cli.deploy import deploy
from skyreg.cli.platform import Server, Token
from skyreg.services.names import REGION_RE, is_dns_label

CONFIG_MODE = 0o644  # a project file, committed with the code: no secret in it


def launch(
    path: Annotated[
        Path, typer.Argument(help="The project: a directory with a Dockerfile (or use --image).")
    ] = Path("."),
    name: Annotated[
        str | None,
        typer.Option("--name", help="The app's name (default: one the server generates)."),
    ] = None,
    org: Annotated[
        str | None, typer.Option("--org", help="Organization (default: your token's).")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Deploy this image instead of building PATH/Dockerfile."),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region", help="The app's primary region (default: the server's).", show_default=False
        ),
    ] = None,
    no_deploy: Annotated[
        bool,
        typer.Option("--no-deploy", help="Create the app and write skyreg.toml; deploy nothing."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing PATH/skyreg.toml.")
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Launch a new app from PATH: create it, write PATH/skyreg.toml, then deploy it as
    `skyreg deploy PATH` does (build PATH/Dockerfile, or run `--image`).

    An existing skyreg.toml is left alone (nothing is created) unless `--force`.
    """
    target = path / CONFIG_NAME
    if not path.is_dir():
        fail(f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"cannot write to {path}")
    if os.path.lexists(target):
        if not force:
            fail(f"{CONFIG_NAME} exists: use --force to overwrite")
        if target.is_dir() and not target.is_symlink():
            fail(f"{target} is a directory")
    if image is None and not (path / "Dockerfile").is_file():
        fail(f"no Dockerfile in {path} (pass --image IMAGE to deploy an image)")
    if name is not None and not is_dns_label(name):
        fail("--name must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters")
    if region is not None and not REGION_RE.match(region):
        fail("--region must be a region code such as iad, sin, syd")
    body: dict[str, Any] = {"org": org, "public": False}
    body.update({"generate_name": True} if name is None else {"name": name})
    created = client(server, token)("POST", "/apps", body)
    app = str(created["name"])
    typer.echo(f"Created app {app} in org {created['org']}.", err=True)
    build = BuildConfig(image=image) if image is not None else BuildConfig(dockerfile="Dockerfile")
    text = render_config(AppConfig(app=app, primary_region=region, build=build))
    try:
        _write_new(target, text, replace=force)
    except FileExistsError:
        fail(f"{CONFIG_NAME} exists: use --force to overwrite (app {app} was created)")
    except OSError as e:
        fail(f"cannot write {target}: {e.strerror or e} (app {app} was created)")
    typer.echo(f"Wrote {target}.", err=True)
    if no_deploy:
        typer.echo(f"Deploy it with: skyreg deploy {path}", err=True)
        return
    deploy(path, server=server, token=token)


def _write_new(target: Path, text: str, *, replace: bool) -> None:
    """Write `text` to `target` atomically: a temporary file in its directory, then renamed
    into place (`replace`) or linked there only if nothing is (FileExistsError otherwise). A
    symlink at `target` is replaced itself, never followed."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), CONFIG_MODE)
            os.fsync(f.fileno())
        if not replace:
            try:
                os.link(tmp, target)
                return
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if os.path.lexists(target):
                    raise FileExistsError(target) from None
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def register(app: typer.Typer) -> None:
    """Add `launch` to the `skyreg` command."""
    app.command()(launch)
