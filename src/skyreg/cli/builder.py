"""`skyreg builder`: run a builder host (buildah) for the server's Dockerfile builds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from skyreg.cli.client import (
    TokenFile,
    fail,
    normalize_server,
    run_until_signalled,
    service_token,
    service_token_option,
)


def builder(
    region: Annotated[str, typer.Option(help="The region this builder serves.")] = "local",
    server: Annotated[
        str, typer.Option("--server", envvar="SKYREG_SERVER", help="Server URL.")
    ] = "http://127.0.0.1:5000",
    token: Annotated[
        str | None,
        service_token_option("Admin token (builds of every org) or org token (its org's builds)."),
    ] = None,
    token_file: TokenFile = None,
    data_dir: Annotated[
        Path,
        typer.Option(help="Build caches (one per org) and working files (root-only: 0700)."),
    ] = Path("/var/lib/skyreg-builder"),
    name: Annotated[str, typer.Option(help="Shown in `skyreg builds` (default: hostname).")] = "",
    network: Annotated[
        str,
        typer.Option(
            help="RUN steps' network: private (their own namespace with outbound access) or "
            "none (no network at all)."
        ),
    ] = "private",
    storage_driver: Annotated[
        str, typer.Option(help="buildah's storage driver: vfs (works anywhere) or overlay.")
    ] = "vfs",
    max_build_time: Annotated[
        int, typer.Option(min=10, help="Seconds a build may take on this builder, at most.")
    ] = 7200,
    max_context_bytes: Annotated[
        int, typer.Option(min=1, help="Most bytes a build context may unpack to.")
    ] = 2 << 30,
    min_free_space: Annotated[
        int,
        typer.Option(
            min=0,
            help="Bytes kept free on the data dir's disk: a build going below is stopped, and "
            "the least recently used orgs' build caches are emptied after a build until twice "
            "as much is free.",
        ),
    ] = 2 << 30,
) -> None:
    """Run a builder: build the server's Dockerfile builds with buildah, one at a time."""
    from skyreg.builder.buildah import NETWORKS, BuildahSettings
    from skyreg.builder.host import BuilderHost, check_host
    from skyreg.client.buildcontext import ContextLimits
    from skyreg.privatefs import private_dir

    token = service_token(token, token_file, "for the builder")
    if network not in NETWORKS:
        fail(f"--network must be one of {', '.join(NETWORKS)}")
    if storage_driver not in ("vfs", "overlay"):
        fail("--storage-driver must be vfs or overlay")
    settings = BuildahSettings(storage_driver=storage_driver, network=network)
    problem = check_host(settings)
    if problem:
        fail(problem)
    try:
        private_dir(data_dir.resolve())
    except ValueError as e:
        fail(f"--data-dir: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host = BuilderHost(
        server=normalize_server(server),
        token=token,
        region=region,
        data_dir=data_dir.resolve(),
        name=name,
        settings=settings,
        max_build_seconds=float(max_build_time),
        context_limits=ContextLimits(max_bytes=max_context_bytes),
        min_free_bytes=min_free_space,
    )

    run_until_signalled(host.run)


def register(app: typer.Typer) -> None:
    """Add `builder` to the `skyreg` command."""
    app.command()(builder)
