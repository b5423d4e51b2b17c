"""`skyreg proxy`: the HTTP proxy in front of the apps' machines, following the server's routes."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from skyreg.cli.client import (
    TokenFile,
    fail,
    normalize_server,
    run_until_signalled,
    service_token,
    service_token_option,
)

if TYPE_CHECKING:
    import asyncio
    import socket


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (`[::1]:8080` for IPv6; port 0: any free one) as (host, port)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise typer.BadParameter(f"HOST:PORT, not {value!r}", param_hint="--listen")
    return host, int(port)


def proxy(
    server: Annotated[
        str, typer.Option("--server", envvar="SKYREG_SERVER", help="Server URL.")
    ] = "http://127.0.0.1:5000",
    token: Annotated[
        str | None,
        service_token_option(
            "A proxy token (`skyreg tokens create proxy`: reads the routes and nothing else; "
            "every org's apps, or its org's); an agent, admin or org token also works."
        ),
    ] = None,
    token_file: TokenFile = None,
    region: Annotated[
        str,
        typer.Option(
            help="This proxy's region: its healthy machines are preferred, other regions' "
            "serve when it has none."
        ),
    ] = "local",
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0: any free one).")
    ] = "127.0.0.1:8080",
    domain: Annotated[
        str, typer.Option(help="Apps are served at <app>.<domain> (the Host header).")
    ] = "localhost",
    poll: Annotated[float, typer.Option(help="Seconds between reads of the routes.")] = 1.0,
    connect_timeout: Annotated[
        float,
        typer.Option(help="Seconds to connect to a machine before trying another."),
    ] = 1.0,
    eject: Annotated[
        float,
        typer.Option(help="Seconds a machine that could not be connected to gets no request."),
    ] = 2.0,
    request_timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for a machine's answer (and each part of its body)."),
    ] = 60.0,
    grace: Annotated[
        float,
        typer.Option(help="On SIGTERM/SIGINT, seconds requests in flight have to finish."),
    ] = 10.0,
    regions_file: Annotated[
        Path | None,
        typer.Option(
            help="The regions file (as `skyreg serve` reads it): with no machine of an app "
            "serving in this region, the nearest region's serve (else any region's)."
        ),
    ] = None,
    max_per_app: Annotated[
        int,
        typer.Option(
            min=1, help="Requests and WebSockets in flight to one app; more are answered 503."
        ),
    ] = 256,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Processes sharing the listening socket, each following the routes on its own "
            "(one core each).",
        ),
    ] = 1,
) -> None:
    """Serve the apps' machines over HTTP at <app>.<domain>, following the server's routes."""
    token = service_token(token, token_file, "for the proxy")
    host, port = parse_listen(listen)
    for value, hint in (
        (poll, "--poll"),
        (connect_timeout, "--connect-timeout"),
        (request_timeout, "--request-timeout"),
    ):
        if not math.isfinite(value) or value <= 0:
            raise typer.BadParameter(f"seconds, greater than 0, not {value:g}", param_hint=hint)
    for value, hint in ((eject, "--eject"), (grace, "--grace")):
        if not math.isfinite(value) or value < 0:
            raise typer.BadParameter(f"seconds, 0 or more, not {value:g}", param_hint=hint)
    domain = domain.lower().strip(".")
    if not domain:
        raise typer.BadParameter("a domain name", param_hint="--domain")
    server = normalize_server(server)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    distance = None
    if regions_file is not None:
        from skyreg.geo.regions import RegionConfigError, RegionMap

        try:
            regions = RegionMap(regions_file, region)
        except RegionConfigError as e:
            fail(f"--regions-file: {e}")
        distance = partial(regions.rtt, region)
    shown = f"[{host}]" if ":" in host else host

    def listening(bound: int) -> None:
        typer.echo(
            f"skyreg proxy listening on http://{shown}:{bound} for *.{domain} "
            f"(routes from {server}, region {region}, {workers} worker(s))"
        )

    async def service(stop: asyncio.Event, sock: socket.socket | None = None) -> None:
        import asyncio

        from skyreg.proxy.routes import RouteSync
        from skyreg.proxy.server import ProxyServer
        from skyreg.proxy.table import RoutingTable

        table = RoutingTable(ejection=eject)
        sync = RouteSync(table, server, token, region, poll=poll, distance=distance)
        proxy = ProxyServer(
            table,
            domain,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            max_per_app=max_per_app,
        )
        # Routes first, so that the first requests find the apps (a failure is retried below).
        await sync.poll_once()
        try:
            bound = await proxy.start(host, port, sock=sock)
        except OSError as e:
            await sync.close()
            fail(f"cannot listen on {listen}: {e}")
        if sock is None:
            listening(bound)
        polling = asyncio.create_task(sync.run(stop))
        try:
            await stop.wait()
        finally:
            await proxy.stop(grace)
            await polling

    if workers == 1:
        run_until_signalled(service)
        return
    # The master binds; each forked worker serves on that socket with its own routes.
    import socket as sockets

    from skyreg.server.supervisor import supervise

    try:
        sock = sockets.create_server((host, port))
    except OSError as e:
        fail(f"cannot listen on {listen}: {e}")
    listening(int(sock.getsockname()[1]))
    if not supervise(workers, lambda: run_until_signalled(partial(service, sock=sock))):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `proxy` to the `skyreg` command."""
    app.command()(proxy)
