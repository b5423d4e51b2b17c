"""`skyreg deploy` and `skyreg releases`: records which image an app runs."""

from __future__ import annotations

import os
import sys
import urllib.parse
from typing import Annotated

import typer

from skyreg.cli.client import client, fail
from skyreg.cli.platform import AsJson, Server, Token, _console, _print_json, _quote, _table, _when
from skyreg.cli.push import push_with_bars
from skyreg.client.push import PushError
from skyreg.services.names import deployment_tag


def deploy(
    app: Annotated[str, typer.Option("--app", help="The app to deploy.")],
    image: Annotated[
        str,
        typer.Option(
            "--image",
            help="Image in this registry: [HOST/]REPO[:TAG] or REPO@DIGEST (any app of your org).",
        ),
    ],
    image_label: Annotated[
        str | None,
        typer.Option(help="Tag for the image in the app (default: deployment-YYYYMMDD-HHMMSS)."),
    ] = None,
    region: Annotated[
        list[str] | None, typer.Option("--region", help="Region to run in (repeatable).")
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=100, help="Machines per region.")] = 1,
    strategy: Annotated[
        str, typer.Option(help="rolling (keep the old machines until the new start) or immediate.")
    ] = "rolling",
    description: Annotated[str | None, typer.Option(help="Why (shown in releases).")] = None,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy an image: pin its digest in a new release of the app.

    `--image` may also be a local docker-archive tarball (e.g. nix's `./result`) or OCI layout
    directory: it is pushed to APP:<label or deployment-YYYYMMDD-HHMMSS> first.
    """
    api = client(server, token)
    if _is_local(image):
        image, image_label = _push_local(image, app, image_label, api.server, api.token)
    body: dict[str, object] = {
        "image": image,
        "strategy": strategy,
        "count": count,
        "regions": region or [],
    }
    if image_label:
        body["image_label"] = image_label
    if description:
        body["description"] = description
    release = api("POST", f"/apps/{_quote(app)}/releases", body)
    if as_json:
        _print_json(release)
        return
    typer.echo(
        f"Release v{release['version']} of {release['app']}: {release['image_ref']} "
        f"({release['image_digest']}), {release['status']}."
    )


def _is_local(image: str) -> bool:
    """Whether `--image` names a local archive or layout rather than a registry reference."""
    if image.startswith(("docker-archive:", "oci:")):
        return True
    return os.path.lexists(image) and ("/" in image or os.sep in image or image.startswith("."))


def _push_local(
    path: str, app: str, label: str | None, server: str, token: str | None
) -> tuple[str, str]:
    """Push a local image into the app; returns (image reference, the tag it got)."""
    tag = label or deployment_tag()
    host = urllib.parse.urlsplit(server).netloc
    try:
        pushed = push_with_bars(path, f"{host}/{app}:{tag}", token, bars=sys.stderr.isatty())
    except PushError as e:
        fail(str(e))
    typer.echo(f"Pushed {path} as {host}/{app}:{tag} ({pushed.digest}).", err=True)
    return f"{app}@{pushed.digest}", tag


def releases(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    image: Annotated[bool, typer.Option("--image", help="Show each release's image.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 25,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List an app's releases, newest first (like `fly releases [--image]`)."""
    found = client(server, token)(
        "GET", f"/apps/{_quote(app)}/releases", query={"limit": str(limit)}
    )["releases"]
    if as_json:
        _print_json(found)
        return
    columns = ["VERSION", "STATUS", "DESCRIPTION", "REASON", "USER", "DATE"]
    table = _table(*columns, *(["DOCKER IMAGE"] if image else []))
    for r in found:
        row = [
            f"v{r['version']}",
            r["status"],
            r["description"],
            r["reason"],
            r["user"]["name"],
            _when(r["created_at"]),
        ]
        table.add_row(*row, *([r["image_ref"]] if image else []))
    _console().print(table)


def register(app: typer.Typer) -> None:
    """Add `deploy` and `releases` to the `skyreg` command."""
    app.command()(deploy)
    app.command()(releases)
