"""The `skyreg` command."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer

from skyreg import __version__
from skyreg.cli.audit import register as register_audit
from skyreg.cli.builder import register as register_builder
from skyreg.cli.builds import register as register_builds
from skyreg.cli.deploy import register as register_deploy
from skyreg.cli.dev import register as register_dev
from skyreg.cli.gc import register as register_gc
from skyreg.cli.launch import register as register_launch
from skyreg.cli.machines import register as register_machines
from skyreg.cli.platform import register
from skyreg.cli.proxy import register as register_proxy
from skyreg.cli.push import register as register_push
from skyreg.cli.registry import register as register_registry
from skyreg.cli.retention import register as register_retention
from skyreg.cli.secrets import register as register_secrets
from skyreg.cli.webhooks import register as register_webhooks
from skyreg.meta.threads import DEFAULT_THREADS, MAX_THREADS

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
    storage: Annotated[
        str,
        typer.Option(
            envvar="SKYREG_STORAGE",
            help="Where blobs live: 'file' (the data dir), s3://BUCKET or s3://BUCKET/PREFIX "
            "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE).",
        ),
    ] = "file",
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_S3_ENDPOINT",
            help="URL of an S3-compatible endpoint (default: AWS).",
        ),
    ] = None,
    s3_region: Annotated[
        str | None,
        typer.Option(envvar="SKYREG_S3_REGION", help="S3 region (default: AWS_REGION)."),
    ] = None,
    s3_redirect: Annotated[
        bool,
        typer.Option(help="Answer blob downloads with a presigned S3 URL (307 redirect)."),
    ] = False,
    region: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_REGION",
            help="Multi-region: this node's region code (with --regions-file and a database "
            "shared by every region).",
            show_default=False,
        ),
    ] = None,
    regions_file: Annotated[
        Path | None,
        typer.Option(
            envvar="SKYREG_REGIONS_FILE",
            help="JSON naming every region, its node URL and round-trip times.",
            show_default=False,
        ),
    ] = None,
    peer_token: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_PEER_TOKEN",
            help="Token this node uses to fetch blobs from other regions' nodes (admin).",
            show_default=False,
        ),
    ] = None,
    peer_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the peer token (read when first needed).", show_default=False
        ),
    ] = None,
    replication_lease: Annotated[
        float,
        typer.Option(min=0.5, help="Seconds before a crashed node's replication job is retried."),
    ] = 30.0,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="Address or CIDR of a load balancer whose X-Forwarded-For/-Proto are believed "
            "(repeatable).",
            show_default=False,
        ),
    ] = None,
    max_machines_per_region: Annotated[
        int, typer.Option(min=1, help="Machines one release may ask for in each region (count).")
    ] = 100,
    max_machines_per_release: Annotated[
        int, typer.Option(min=1, help="Machines one release may create (count x regions).")
    ] = 1000,
    max_machines_per_app: Annotated[
        int,
        typer.Option(
            min=1,
            help="Live machines (desired started) an app may have; a rolling deploy counts the "
            "running ones too.",
        ),
    ] = 1000,
    max_regions_per_release: Annotated[
        int, typer.Option(min=1, help="Regions one release may name.")
    ] = 50,
    public_url: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_PUBLIC_URL",
            help="The URL clients use to reach this server, e.g. https://registry.example.com "
            "(token realm, image references). Default: this region's URL in --regions-file, "
            "else http://HOST:PORT of the listening address. Never taken from requests.",
            show_default=False,
        ),
    ] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT where /metrics answers without a token (for a scraper); on the main "
            "address /metrics needs an admin token.",
            show_default=False,
        ),
    ] = None,
    header_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a connection has to send a complete request head, from connecting "
            "or from the first byte after a response (slow clients are closed).",
        ),
    ] = 30.0,
    keepalive_timeout: Annotated[
        float,
        typer.Option(min=0.001, help="Seconds an idle connection is kept open after a response."),
    ] = 30.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a request body (an upload) may send nothing before its connection is "
            "closed; the upload stays resumable.",
        ),
    ] = 60.0,
    request_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds from a complete request head until its whole body has arrived, for "
            "every request but blob uploads (which only --body-timeout bounds); the connection "
            "is closed when it passes.",
        ),
    ] = 120.0,
    max_connections_per_client: Annotated[
        int,
        typer.Option(
            min=0,
            help="Open connections per client address (per worker) before new ones get 429; "
            "0: no cap. Trusted proxies are not capped.",
        ),
    ] = 128,
    min_free_space: Annotated[
        str,
        typer.Option(
            help="Free space to keep on the data dir's disk (filesystem storage): below it, "
            "unused uploads are reclaimed and, if that is not enough, new uploads answer 507. "
            "Bytes with a binary unit (512MiB, 2GiB) or a share of the disk (2%); 0: off.",
        ),
    ] = "2%",
    reclaim_idle: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds without activity after which low space may reclaim an upload "
            "(uploads that failed for lack of space go first, whatever their age).",
        ),
    ] = 600.0,
    sqlite_synchronous: Annotated[
        str,
        typer.Option(
            help="SQLite durability: full (every acknowledged write survives a power cut) or "
            "normal (faster commits; a power cut can take back the last acknowledged writes).",
        ),
    ] = "full",
    db_threads: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_THREADS,
            help="Threads running this process's database queries, so none runs on the event "
            "loop (up to 64; each may hold two connections); SQLite uses at most 4. More "
            "threads help when the database is far away (see BENCHMARKS.md).",
        ),
    ] = DEFAULT_THREADS,
    gc_review_delay: Annotated[
        float,
        typer.Option(
            help="Seconds a blob or manifest that lost its last reference waits before garbage "
            "collection reviews it (covers pushes in flight; 0: at the next pass).",
        ),
    ] = 24 * 3600.0,
    gc_interval: Annotated[
        float,
        typer.Option(help="Seconds between this process's garbage collection passes."),
    ] = 10.0,
    gc_keep_releases: Annotated[
        int,
        typer.Option(
            help="Releases per app whose images garbage collection keeps (besides the images "
            "of releases machines use).",
        ),
    ] = 10,
    gc: Annotated[
        bool,
        typer.Option(
            help="Run the garbage collection worker (--no-gc: none here; what becomes garbage "
            "is still queued, and `skyreg gc run` still collects).",
        ),
    ] = True,
    retention_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between rounds of the garbage collection worker over the apps' "
            "retention policies (`skyreg apps retention`).",
        ),
    ] = 300.0,
    scan: Annotated[
        bool,
        typer.Option(
            help="Run the scan worker: index pushed images (packages, files, SBOMs) and match "
            "them against the vulnerability data (--no-scan: pushes are still queued, and a "
            "server with the worker scans them).",
        ),
    ] = True,
    lazy_index: Annotated[
        bool,
        typer.Option(
            help="With the scan worker, give each scanned image seekable indexes of its layers "
            "(an OCI referrer) for lazy pull: far machines start before the image arrives.",
        ),
    ] = True,
    webhook_allow_private: Annotated[
        bool,
        typer.Option(
            help="Allow webhook targets on loopback, private and link-local addresses (refused "
            "by default: a webhook must not reach into the server's own network)."
        ),
    ] = False,
    webhook_max_attempts: Annotated[
        int, typer.Option(min=1, max=100, help="Attempts before a webhook delivery fails.")
    ] = 8,
    webhook_retry_base: Annotated[
        float,
        typer.Option(
            min=0.01, help="Seconds before a failed delivery's first retry (doubling, at most 1 h)."
        ),
    ] = 5.0,
    audit_days: Annotated[
        int,
        typer.Option(
            min=1, help="Days the audit log keeps an entry (`skyreg audit`); older ones go."
        ),
    ] = 365,
    pull_flush_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between writes of the manifest pull times retention policies read "
            "(pulls are noted in memory in between).",
        ),
    ] = 30.0,
    secrets_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="SKYREG_SECRETS_KEY_FILE",
            help="The master keys of app secrets: a 0600 file of base64 keys, newest first "
            "(SKYREG_SECRETS_KEY, comma-separated keys, wins; default: DATA_DIR/secrets.key, "
            "made on first use). Every server of a deployment needs the same keys.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the registry (SQLite + filesystem under one data dir by default)."""
    from skyreg.platform.releases import DeployLimits
    from skyreg.registry.connections import ConnectionLimits
    from skyreg.registry.forwarded import parse_networks
    from skyreg.registry.space import parse_watermark
    from skyreg.server.config import ServeConfig, parse_storage
    from skyreg.server.process import serve as run

    try:
        parse_storage(storage)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--storage") from None
    if sqlite_synchronous not in ("full", "normal"):
        raise typer.BadParameter("full or normal", param_hint="--sqlite-synchronous")
    try:
        watermark = parse_watermark(min_free_space)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--min-free-space") from None
    try:
        parse_networks(trusted_proxy or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--trusted-proxy") from None
    if public_url is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise typer.BadParameter(
                "give scheme and host only, like https://registry.example.com",
                param_hint="--public-url",
            )
    if metrics_address is not None and region is None:
        raise typer.BadParameter(
            "metrics exist in a multi-region registry only (--region)",
            param_hint="--metrics-address",
        )
    for value, hint, positive in (
        (gc_review_delay, "--gc-review-delay", False),
        (gc_interval, "--gc-interval", True),
        (retention_interval, "--retention-interval", True),
        (pull_flush_interval, "--pull-flush-interval", True),
    ):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "greater than 0" if positive else "0 or more"
            raise typer.BadParameter(f"seconds, {bound}, not {value:g}", param_hint=hint)
    if gc_keep_releases < 0:
        raise typer.BadParameter(
            f"a number of releases, 0 or more, not {gc_keep_releases}",
            param_hint="--gc-keep-releases",
        )
    if (region is None) != (regions_file is None):
        raise typer.BadParameter("--region and --regions-file go together", param_hint="--region")
    if region is not None and regions_file is not None:
        from skyreg.geo.regions import RegionConfigError, RegionMap

        try:
            RegionMap(regions_file.resolve(), region)
        except RegionConfigError as e:
            raise typer.BadParameter(str(e), param_hint="--regions-file") from None
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
            storage=storage,
            s3_endpoint=s3_endpoint,
            s3_region=s3_region,
            s3_redirect=s3_redirect,
            region=region,
            regions_file=regions_file.resolve() if regions_file else None,
            peer_token=peer_token,
            peer_token_file=peer_token_file.resolve() if peer_token_file else None,
            replication_lease=replication_lease,
            trusted_proxies=tuple(trusted_proxy or ()),
            deploy_limits=DeployLimits(
                per_region=max_machines_per_region,
                per_release=max_machines_per_release,
                per_app=max_machines_per_app,
                regions=max_regions_per_release,
            ),
            connections=ConnectionLimits(
                header_timeout=header_timeout,
                keepalive_timeout=keepalive_timeout,
                body_timeout=body_timeout,
                request_timeout=request_timeout,
                max_per_client=max_connections_per_client,
            ),
            public_url=public_url,
            metrics_address=metrics_address,
            min_free_space=watermark,
            reclaim_idle=reclaim_idle,
            sqlite_synchronous=sqlite_synchronous,
            db_threads=db_threads,
            gc_review_delay=gc_review_delay,
            gc_interval=gc_interval,
            gc_keep_releases=gc_keep_releases,
            gc_worker=gc,
            retention_interval=retention_interval,
            pull_flush_interval=pull_flush_interval,
            scan_worker=scan,
            lazy_index=lazy_index,
            audit_days=audit_days,
            webhook_allow_private=webhook_allow_private,
            webhook_max_attempts=webhook_max_attempts,
            webhook_retry_base=webhook_retry_base,
            secrets_key_file=secrets_key_file,
            secrets_key_env=os.environ.get("SKYREG_SECRETS_KEY"),
        )
    )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"skyreg {__version__}")


register(app)
register_deploy(app)
register_builder(app)
register_builds(app)
register_dev(app)
register_gc(app)
register_launch(app)
register_retention()
register_machines(app)
register_proxy(app)
register_push(app)
register_registry(app)
register_audit(app)
register_webhooks(app)
register_secrets(app)

keys_app = typer.Typer(help="Registry-token signing keys in the data dir.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DataDir = Annotated[
    Path | None,
    typer.Option(help="The server's data dir [env: SKYREG_DATA_DIR].", show_default=False),
]


@keys_app.command("rotate")
def keys_rotate(
    data_dir: DataDir = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_DATABASE_URL",
            help="SQLAlchemy URL of the metadata database (default: SQLite in the data dir).",
        ),
    ] = None,
    keep: Annotated[
        int, typer.Option(min=1, help="How many of the newest keys keep verifying tokens.")
    ] = 2,
) -> None:
    """Add a new signing key; running servers sign with it within seconds.

    Tokens signed with the previous key keep working until they expire (minutes) while that key
    is among the `--keep` newest; older keys are deleted. The keys live in the metadata
    database, so every node of the registry follows.
    """
    from skyreg.auth.keys import KeyRing
    from skyreg.meta.registry import open_database

    directory = (data_dir or default_data_dir()).resolve()
    meta = open_database(database_url, directory)
    ring = KeyRing(meta.engine, legacy_dir=directory / "keys")
    try:
        ring.ensure()
        kid = ring.rotate()
        removed = ring.retire(keep=keep)
    finally:
        ring.close()
    typer.echo(f"new signing key {kid}" + (f"; removed {', '.join(removed)}" if removed else ""))


db_app = typer.Typer(help="The metadata database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="SKYREG_DATABASE_URL",
            help="SQLAlchemy URL of the metadata database (default: SQLite in the data dir).",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Apply every migration not yet applied and print the schema revision.

    `skyreg serve` does the same at start; run this first to migrate a shared PostgreSQL before
    rolling out new servers. Concurrent runs are safe.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from skyreg.meta.db import create_db_engine, sqlite_url, upgrade_schema

    if database_url is None:
        from skyreg.privatefs import private_dir

        try:
            directory = private_dir((data_dir or default_data_dir()).resolve())
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--data-dir") from None
        database_url = sqlite_url(directory / "skyreg.db")
    try:
        engine = create_db_engine(database_url)
        try:
            revision = upgrade_schema(engine)
        finally:
            engine.dispose()
    except SQLAlchemyError as e:
        typer.echo(f"error: cannot migrate the database: {getattr(e, 'orig', None) or e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"database schema at revision {revision}")


def main() -> None:
    """Entry point of the `skyreg` script."""
    app()
