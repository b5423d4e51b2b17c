"""Running the server: one listening socket, one or more worker processes, each building
the database, stores, auth, geo, services and background workers it serves with."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.envelope import MasterKeys
from skyreg.auth.keys import KeyRing
from skyreg.auth.ratelimit import FailureLimiter
from skyreg.auth.service import Authenticator
from skyreg.meta.audit import AuditMeta
from skyreg.meta.db import unreachable as database_unreachable
from skyreg.meta.gc import GcMeta, GcSettings
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import PlatformMeta, ReleaseMeta
from skyreg.meta.quotas import QuotaMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.meta.retention import RetentionMeta
from skyreg.privatefs import private_dir
from skyreg.registry.app import upload_expiry
from skyreg.registry.connections import ConnectionGuard
from skyreg.registry.context import Registry
from skyreg.registry.forwarded import parse_networks
from skyreg.registry.gc import Collector
from skyreg.registry.pulls import PullTimes
from skyreg.registry.quotas import QuotaGate
from skyreg.registry.space import SpaceGuard, Watermark
from skyreg.server.app import WebhookSettings, create_app, metrics_app
from skyreg.server.config import ServeConfig, parse_storage
from skyreg.server.supervisor import supervise
from skyreg.services.releases import ReleaseService
from skyreg.store.base import BlobStore
from skyreg.store.filesystem import FilesystemBlobStore
from skyreg.workers import Workers

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

log = logging.getLogger("skyreg.server")

_READ_BUFSIZE = 1 << 20
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i"'


def open_blob_store(cfg: ServeConfig) -> BlobStore:
    """The blob store `cfg.storage` names (aiobotocore is imported only for S3)."""
    target = parse_storage(cfg.storage)
    if target is None:
        return FilesystemBlobStore(cfg.data_dir, fsync=cfg.fsync)
    from skyreg.store.s3 import S3BlobStore

    bucket, prefix = target
    return S3BlobStore(
        bucket,
        prefix=prefix,
        endpoint_url=cfg.s3_endpoint,
        region=cfg.s3_region,
        redirect=cfg.s3_redirect,
    )


async def close_blob_store(store: BlobStore) -> None:
    """Release a store's connections and threads, whichever backend it is."""
    await store.aclose()
    store.close()


async def _check_blob_store(cfg: ServeConfig) -> None:
    """Fail at start, with the reason, when the configured storage cannot be reached."""
    store = open_blob_store(cfg)
    try:
        await store.check()
    finally:
        await close_blob_store(store)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on HOST:PORT (0: any free port), ready for `run_worker`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


ADMIN_TOKEN_FILE = "admin-token"


def _authenticator(cfg: ServeConfig, meta: RegistryMeta) -> Authenticator | None:
    if not cfg.auth:
        return None
    return Authenticator(
        PlatformMeta(meta.db),
        KeyRing(meta.db, legacy_dir=cfg.data_dir / "keys"),
        service=cfg.auth_service,
        limiter=FailureLimiter(limit=cfg.auth_failure_limit),
        public_url=cfg.public_url or "http://127.0.0.1:5000",
    )


def bootstrap_admin(cfg: ServeConfig, auth: Authenticator) -> Path | None:
    """On first start, create an admin token and keep it in a 0600 file in the data dir."""
    auth.keys.ensure()
    if auth.platform.count_tokens("admin") > 0:
        path = cfg.data_dir / ADMIN_TOKEN_FILE
        return path if path.exists() else None
    secret, _ = auth.create_token("admin", name="bootstrap admin")
    path = cfg.data_dir / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{secret}\n".encode())
    finally:
        os.close(fd)
    return path


async def run_worker(
    cfg: ServeConfig,
    sock: socket.socket,
    metrics_sock: socket.socket | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Build every part of one worker and serve on `sock` until `stop` is set (by default, until
    SIGTERM or SIGINT: only the main thread may wait for signals)."""
    logging.getLogger("aiohttp.server").addFilter(_unreadable_bodies_in_one_line)  # idempotent
    meta = open_database(
        cfg.database_url,
        cfg.data_dir,
        sqlite_synchronous=cfg.sqlite_synchronous,
        db_threads=cfg.db_threads,
    )
    store = open_blob_store(cfg)
    auth = _authenticator(cfg, meta)
    reg = Registry(meta=meta, store=store, upload_ttl=cfg.upload_ttl, auth=auth)
    if auth is not None:  # who pushed and deleted what: the audit log of the platform's orgs
        reg.audit = AuditMeta(meta.db)
    if isinstance(store, FilesystemBlobStore) and cfg.min_free_space != Watermark():
        reg.space = SpaceGuard(store, meta, cfg.min_free_space, cfg.reclaim_idle)
    reg.geo = _geo_node(cfg, reg)
    reg.trusted_proxies = parse_networks(cfg.trusted_proxies)
    gc_settings = _gc_settings(cfg, reg.geo)
    meta.gc, meta.region = gc_settings, cfg.region or ""
    gc_meta = GcMeta(meta.db)
    gc_meta.settings = gc_settings
    retention_meta = RetentionMeta(meta.db)
    retention_meta.review_delay = gc_settings.review_delay
    collector = Collector(
        gc_meta,
        store,
        cfg.region or "",
        retention=retention_meta,
        retention_interval=cfg.retention_interval,
    )
    reg.pulls = PullTimes(retention_meta)
    releases = None
    if auth is not None:
        reg.quotas = QuotaGate(QuotaMeta(meta.db))  # orgs exist with the platform only
        collector.on_freed = reg.quotas.forget_all
        release_meta, machine_meta = ReleaseMeta(meta.db), MachineMeta(meta.db)
        release_meta.gc = machine_meta.gc = gc_settings
        releases = ReleaseService(
            registry=meta,
            releases=release_meta,
            machines=machine_meta,
            platform=auth.platform,
            policy=auth.policy,
            public_host=auth.public_host,
            geo=reg.geo,
            limits=cfg.deploy_limits,
        )
    workers = _workers(cfg, reg, collector)
    app = create_app(
        reg,
        releases,
        workers=workers,
        gc=collector,
        gc_worker=cfg.gc_worker,
        scan_worker=cfg.scan_worker,
        lazy_index=cfg.lazy_index,
        audit_days=cfg.audit_days,
        webhooks=WebhookSettings(
            cfg.webhook_allow_private, cfg.webhook_max_attempts, cfg.webhook_retry_base
        ),
        secret_keys=functools.partial(
            MasterKeys.load,
            cfg.secrets_key_file,
            cfg.secrets_key_env,
            # Made on first use beside an embedded database only: servers sharing PostgreSQL
            # must share their keys, so there they are given (503 until they are).
            cfg.data_dir / "secrets.key"
            if cfg.database_url is None or cfg.database_url.startswith("sqlite")
            else None,
        ),
    )
    handler_kwargs: dict[str, Any] = {
        "access_log": logging.getLogger("skyreg.access") if cfg.access_log else None,
        "access_log_format": ACCESS_LOG_FORMAT,
        # A larger read buffer lets a blob upload arrive in fewer, bigger pieces.
        "read_bufsize": _READ_BUFSIZE,
        "keepalive_timeout": cfg.connections.aiohttp_keepalive,
    }
    runner = web.AppRunner(app, handle_signals=False, **handler_kwargs)
    await runner.setup()
    assert runner.server is not None
    # Not a SockSite: every connection is a GuardedRequestHandler (timeouts, per-client cap).
    guard = ConnectionGuard(cfg.connections, reg.trusted_proxies)
    listener = await asyncio.get_running_loop().create_server(
        guard.protocol_factory(runner.server, **handler_kwargs), sock=sock
    )
    metrics_runner = None
    if metrics_sock is not None:
        metrics_runner = web.AppRunner(
            metrics_app(reg.geo, workers, collector, reg.pulls),
            access_log=None,
            handle_signals=False,
        )
        await metrics_runner.setup()
        await web.SockSite(metrics_runner, metrics_sock).start()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    workers.start()
    try:
        await stop.wait()
    finally:
        listener.close()  # stop accepting; runner.cleanup() ends the open connections
        await workers.stop()  # before what they use (the geo node, stores, database) closes
        try:  # the pull times noted since the last write
            await reg.pulls.flush()
        except Exception as e:
            log.warning("pull times not written at shutdown: %s", e)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        if releases is not None:
            releases.releases.close()
            releases.machines.close()
        await close_blob_store(store)
        if auth is not None:
            auth.platform.close()
        gc_meta.close()
        retention_meta.close()
        meta.close()


def _workers(cfg: ServeConfig, reg: Registry, collector: Collector) -> Workers:
    """Everything this process runs in the background: one place to see it."""
    # A database out of reach pauses every worker quietly (the engine logs the outage once).
    workers = Workers([upload_expiry(reg, cfg.expiry_interval)], outage=database_unreachable)
    if reg.geo is not None and reg.geo.replicate:
        workers.add(reg.geo.replication_worker())
    if cfg.gc_worker:  # without it (--no-gc) reviews are still queued, and run on demand
        workers.add(collector.worker(cfg.gc_interval))
    if reg.pulls is not None:
        workers.add(reg.pulls.worker(cfg.pull_flush_interval))
    return workers


def _gc_settings(cfg: ServeConfig, geo: GeoNode | None) -> GcSettings:
    """How garbage collection decides: `serve`'s --gc-* flags, and every region whose store may
    hold bytes of a blob (`""` alone without regions)."""
    return GcSettings(
        review_delay=cfg.gc_review_delay,
        keep_releases=cfg.gc_keep_releases,
        regions=tuple(geo.regions.codes) if geo is not None else ("",),
    )


def _geo_node(cfg: ServeConfig, reg: Registry) -> GeoNode | None:
    """This node's part in a multi-region registry, or None for a single-region one."""
    if cfg.region is None:
        return None
    from skyreg.geo.node import GeoNode
    from skyreg.geo.regions import RegionMap
    from skyreg.meta.geo import GeoMeta

    assert cfg.regions_file is not None
    return GeoNode(
        region=cfg.region,
        regions=RegionMap(cfg.regions_file, cfg.region),
        store=reg.store,
        meta=GeoMeta(reg.meta.db),
        registry=reg.meta,
        peer_token=cfg.peer_token,
        peer_token_file=cfg.peer_token_file,
        lease=cfg.replication_lease,
    )


def _metrics_socket(cfg: ServeConfig) -> socket.socket | None:
    """The socket of `--metrics-address HOST:PORT`, bound before the workers start."""
    if cfg.metrics_address is None:
        return None
    host, sep, port = cfg.metrics_address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"error: --metrics-address must be HOST:PORT, not {cfg.metrics_address!r}")
    return listen(host.strip("[]") or "127.0.0.1", int(port))


def _unreadable_bodies_in_one_line(record: logging.LogRecord) -> bool:
    """aiohttp logs a traceback when a request body turns out to be unreadable (a client's
    "gzip" that is not) after the answer went out; that is the client's mistake: one INFO line."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, RequestPayloadError):
        record.msg, record.args, record.exc_info, record.exc_text = (
            "unreadable request body: %s",
            (str(exc).replace("\n", " ")[:200],),
            None,
            None,
        )
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def public_url_of(cfg: ServeConfig, port: int) -> str:
    """The URL the server gives as its own (token realm, image references).

    `--public-url` when given; in a multi-region registry, this region's URL in the regions
    file; else the listening address. Never derived from a request: the Host header is the
    caller's to choose.
    """
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    if cfg.region is not None and cfg.regions_file is not None:
        from skyreg.geo.regions import RegionMap

        return RegionMap(cfg.regions_file, cfg.region).url_of(cfg.region).rstrip("/")
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
        log.warning(
            "listening on every address: calling this server http://%s:%d; "
            "set --public-url to the name clients use",
            host,
            port,
        )
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def banner(cfg: ServeConfig, port: int, admin_token: Path | None) -> str:
    """What `skyreg serve` tells a new user: where it listens and how to push."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    addr = f"{host}:{port}"
    lines = [
        f"skyreg registry listening on http://{addr}/v2/ ({cfg.workers} worker(s))",
        f"  data dir: {cfg.data_dir}",
    ]
    if cfg.storage != "file":
        lines.append(
            f"  blobs: {cfg.storage}" + (f" at {cfg.s3_endpoint}" if cfg.s3_endpoint else "")
        )
    if cfg.auth:
        token = str(admin_token) if admin_token else "<token>"
        lines += [
            f"  admin token: {token} (keep it secret; create scoped tokens with `skyreg tokens`)",
            f"  web console: http://{addr}/ (sign in with a token)",
            "  push an image:",
            f"    skyreg login --server http://{addr} --token-file {token}",
            "    skyreg orgs create myorg && skyreg apps create myapp --org myorg",
            f"    skopeo copy --dest-tls-verify=false --dest-creds x:$(cat {token}) "
            f"docker-archive:image.tar docker://{addr}/myapp:latest",
            f"    docker login {addr} -u x --password-stdin < {token}",
        ]
    else:
        lines += [
            "  authentication is OFF: anyone who reaches this address may push and delete",
            "  push an image:",
            f"    skopeo copy --dest-tls-verify=false docker-archive:image.tar "
            f"docker://{addr}/myapp:latest",
            f"    docker tag myapp:latest {addr}/myapp:latest && docker push {addr}/myapp:latest",
        ]
    lines.append(f"  list tags: curl http://{addr}/v2/myapp/tags/list")
    return "\n".join(lines)


def raise_descriptor_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (workers inherit it), so
    idle clients exhaust descriptors later; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it at fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
        return soft
    return target


def prepare(cfg: ServeConfig) -> Path | None:
    """What serving needs before a worker starts: the data dir (0700), blob storage in reach,
    the database migrated, and on first start an admin token (its file, or None without auth)."""
    try:
        private_dir(cfg.data_dir)  # 0700 whatever the umask; an older one is tightened
    except ValueError as e:
        raise SystemExit(f"error: --data-dir: {e}") from None
    if cfg.storage != "file":
        try:
            asyncio.run(_check_blob_store(cfg))
        except Exception as e:
            raise SystemExit(f"error: cannot use blob storage {cfg.storage}: {e}") from None
    meta = open_database(cfg.database_url, cfg.data_dir, sqlite_synchronous=cfg.sqlite_synchronous)
    admin_token = None
    auth = _authenticator(cfg, meta)
    if auth is not None:
        admin_token = bootstrap_admin(cfg, auth)
        auth.platform.close()
    meta.close()
    return admin_token


def serve(cfg: ServeConfig) -> None:
    """Bind, migrate the database, print the banner and serve until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    log.info("open-file limit: %d descriptors per process", raise_descriptor_limit())
    admin_token = prepare(cfg)
    sock = listen(cfg.host, cfg.port)
    port = int(sock.getsockname()[1])
    cfg.public_url = public_url_of(cfg, port)
    metrics_sock = _metrics_socket(cfg)
    print(banner(cfg, port, admin_token), flush=True)
    if cfg.port_file is not None:
        cfg.port_file.write_text(f"{port}\n")
    if cfg.workers <= 1:
        asyncio.run(run_worker(cfg, sock, metrics_sock))
        return
    if not supervise(cfg.workers, lambda: asyncio.run(run_worker(cfg, sock, metrics_sock))):
        raise SystemExit(1)
