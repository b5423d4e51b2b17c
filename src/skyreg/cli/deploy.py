"""`skyreg deploy` and `skyreg releases`: records which image an app runs.

`skyreg deploy` reads the project's skyreg.toml (`--config FILE`, else PATH/skyreg.toml when
there is one; see `skyreg.cli.appconfig`): its app, build, primary region and deploy settings
are used where no flag says otherwise, and its [http_service] (with the checks) becomes the
release's service.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from skyreg.cli.appconfig import (
    AppConfig,
    ConfigError,
    find_config,
    load_config,
    release_service,
)
from skyreg.cli.client import client, fail
from skyreg.cli.platform import AsJson, Server, Token, _console, _print_json, _quote, _table, _when
from skyreg.cli.waiting import health_checks, parse_wait_timeout, printable, wait_release
from skyreg.services.names import deployment_tag


def deploy(
    path: Annotated[
        Path,
        typer.Argument(help="Directory with a Dockerfile, built when no --image is given."),
    ] = Path("."),
    app: Annotated[
        str, typer.Option("--app", help="The app to deploy (default: app in skyreg.toml).")
    ] = "",
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="Image in this registry: [HOST/]REPO[:TAG] or REPO@DIGEST (any app of your org); "
            "or a local docker-archive or OCI layout. Without it, PATH is built.",
        ),
    ] = None,
    image_label: Annotated[
        str | None,
        typer.Option(help="Tag for the image in the app (default: deployment-YYYYMMDD-HHMMSS)."),
    ] = None,
    region: Annotated[
        list[str] | None,
        typer.Option(
            "--region",
            help="Region to run in (repeatable; default: primary_region in skyreg.toml).",
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=100, help="Machines per region.")] = 1,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="rolling (keep the old machines until the new start) or immediate.",
            show_default="rolling",
        ),
    ] = None,
    description: Annotated[str | None, typer.Option(help="Why (shown in releases).")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once the release is recorded (no waiting).")
    ] = False,
    wait_timeout: Annotated[
        str | None,
        typer.Option(
            help="How long to wait for every machine to start (e.g. 90s, 5m).", show_default="5m"
        ),
    ] = None,
    dockerfile: Annotated[
        Path | None, typer.Option(help="The Dockerfile (default: PATH/Dockerfile).")
    ] = None,
    build_only: Annotated[
        bool,
        typer.Option("--build-only", help="Build (and push), print the image, deploy nothing."),
    ] = False,
    push: Annotated[
        bool,
        typer.Option(
            "--push",
            help="With --build-only --build-local: push the image (remote builds always do).",
        ),
    ] = False,
    build_local: Annotated[
        bool, typer.Option("--build-local", help="Build on this machine (buildah, podman, docker).")
    ] = False,
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="NAME=VALUE (repeatable).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            help="NAME=VALUE: a plain environment variable of the machines, over the config "
            "file's [env] (repeatable; secrets go in `skyreg secrets`).",
        ),
    ] = None,
    build_secret: Annotated[
        list[str] | None,
        typer.Option(
            "--build-secret",
            help="ID=FILE, read in RUN --mount=type=secret,id=ID; never stored (repeatable).",
        ),
    ] = None,
    target: Annotated[str | None, typer.Option(help="The stage to build.")] = None,
    platform: Annotated[
        str | None, typer.Option(help="linux/amd64 or linux/arm64 (default: the builder's).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Build every step afresh.")] = False,
    build_timeout: Annotated[str, typer.Option(help="Longest a build may take.")] = "30m",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="The app's config file (default: PATH/skyreg.toml, when there is one).",
            show_default=False,
        ),
    ] = None,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy an image: pin its digest in a new release of the app, then wait until its
    machines started and passed their health checks, if any (exit 0), or one failed (exit 1,
    with its last health event or log lines).

    Without `--image`, PATH (a directory with a Dockerfile) is built first, on a builder
    (`skyreg builder`) or with `--build-local` on this machine, and pushed to APP:<label or
    deployment-YYYYMMDD-HHMMSS>. `--image` may also be a local docker-archive tarball (e.g.
    nix's `./result`) or OCI layout directory: it is pushed the same way first.

    PATH/skyreg.toml (or `--config FILE`) gives the app, what to build (dockerfile, image,
    build args, target), primary_region and the deploy's strategy and wait_timeout; flags win.
    Its http_service and checks become the release's (and the app's) service: the machines
    then count as started once their health checks pass. Without http_service, the app's
    service (`skyreg apps update --port`) is kept.
    """
    settings = _settings(path, config)
    app = app or settings.app or ""
    if not app:
        fail("--app is required (or app in skyreg.toml)")
    if image is None and dockerfile is None and settings.image is not None:
        if build_only:
            fail(f"--build-only: nothing to build, {settings.source} names an image")
        image = settings.image
    dockerfile = dockerfile or settings.dockerfile
    timeout = parse_wait_timeout(wait_timeout or settings.wait_timeout or "5m")
    api = client(server, token)
    if image is None:
        # Imported here: packing contexts (docker's matcher) and sealing (libsodium) cost every
        # other command its start-up time.
        from skyreg.cli.build import (
            BuildOptions,
            has_dockerfile,
            local_build,
            local_engine,
            parse_build_timeout,
            parse_pairs,
            remote_build,
        )

        options = BuildOptions(
            path=path,
            dockerfile=dockerfile,
            build_args={**settings.build_args, **parse_pairs(build_arg, "--build-arg")},
            secrets={k: Path(v) for k, v in parse_pairs(build_secret, "--build-secret").items()},
            target=target or settings.target,
            platform=platform,
            no_cache=no_cache,
            label=image_label,
            timeout=parse_build_timeout(build_timeout),
        )
        if not has_dockerfile(path, dockerfile):
            fail(f"no Dockerfile in {path} (pass --image to deploy an image, or --dockerfile)")
        if build_local:
            with tempfile.TemporaryDirectory(prefix="skyreg-build-") as tmp:
                layout = Path(tmp) / "image"
                local_build(options, layout)
                if build_only and not push:
                    typer.echo("Built locally (not pushed: add --push).", err=True)
                    return
                source = (
                    f"docker-archive:{layout}"
                    if local_engine() == "docker"
                    else f"oci:{layout}:latest"
                )
                image, image_label = _push_local(source, app, image_label, api.server, api.token)
        else:
            built = remote_build(api, app, options)
            image, image_label = built.ref, built.label
        if build_only:
            typer.echo(image)
            return
    elif _is_local(image):
        image, image_label = _push_local(image, app, image_label, api.server, api.token)
    body: dict[str, object] = {
        "image": image,
        "strategy": strategy or settings.strategy or "rolling",
        "count": count,
        "regions": region or settings.regions,
    }
    if image_label:
        body["image_label"] = image_label
    if description:
        body["description"] = description
    from skyreg.cli.build import parse_pairs as parse_env

    plain = {**settings.env, **parse_env(env, "--env")}
    if plain:
        body["env"] = plain
    if settings.service is not None:
        body["service"] = settings.service
    release = api("POST", f"/apps/{_quote(app)}/releases", body)
    if not as_json:
        typer.echo(
            f"Release v{release['version']} of {release['app']}: {release['image_ref']} "
            f"({release['image_digest']}), {release['status']}.{_service_note(release)}"
        )
    if not detach:  # progress on stderr under --json: stdout is the final release's JSON
        waited = wait_release(api, app, release, timeout, lambda s: typer.echo(s, err=as_json))
        release = waited.release
    if as_json:
        _print_json(release)
    if not detach and waited.code:
        fail(waited.reason, waited.code)


def _service_note(release: dict[str, Any]) -> str:
    """The end of the release line when the release has a service (" Service on port 8080, 2
    health checks."), else nothing."""
    service = release.get("service")
    if not isinstance(service, dict):
        return ""
    checks = health_checks(release)
    plural = "" if checks == 1 else "s"
    port = printable(service.get("internal_port"), 8)
    return f" Service on port {port}, {checks} health check{plural}."


@dataclass(frozen=True)
class _Settings:
    """What a skyreg.toml says about a deploy (all unset without one)."""

    source: str = ""  # the file, as named in messages
    app: str | None = None
    image: str | None = None
    dockerfile: Path | None = None  # relative to the file's directory, as in fly.toml
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    regions: list[str] = field(default_factory=list)
    strategy: str | None = None
    wait_timeout: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # [env]: the machines' plain variables
    service: dict[str, Any] | None = None  # [http_service] and checks, as the API takes them


def _settings(path: Path, explicit: Path | None) -> _Settings:
    """The skyreg.toml to deploy with (`--config`, else PATH/skyreg.toml if any), its
    warnings printed on stderr; a ConfigError ends the command."""
    try:
        found = find_config(path, explicit)
        if found is None:
            return _Settings()
        loaded: AppConfig = load_config(found)
    except ConfigError as e:
        fail(str(e))
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    build = loaded.build
    return _Settings(
        source=str(found),
        app=loaded.app,
        image=build.image,
        dockerfile=None if build.dockerfile is None else found.parent / build.dockerfile,
        build_args=dict(build.args),
        target=build.target,
        regions=[loaded.primary_region] if loaded.primary_region else [],
        strategy=loaded.deploy.strategy,
        wait_timeout=loaded.deploy.wait_timeout,
        env=dict(loaded.env),
        service=release_service(loaded),
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
    from skyreg.cli.push import push_with_bars
    from skyreg.client.push import PushError

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
