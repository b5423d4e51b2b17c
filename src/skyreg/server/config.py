"""What `skyreg serve` is told: its settings, and the blob storage they name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skyreg.meta.threads import DEFAULT_THREADS
from skyreg.platform.releases import DeployLimits
from skyreg.registry.connections import ConnectionLimits
from skyreg.registry.space import Watermark


@dataclass
class ServeConfig:
    """Settings of `skyreg serve`."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    database_url: str | None = None
    workers: int = 1
    upload_ttl: float = 24 * 3600.0
    expiry_interval: float = 300.0
    port_file: Path | None = None
    fsync: bool = True
    access_log: bool = True
    auth: bool = True
    auth_service: str = "skyreg"
    auth_failure_limit: int = 10  # failed authentications per client per minute before 429
    storage: str = "file"  # "file" (the data dir) or "s3://BUCKET[/PREFIX]"
    s3_endpoint: str | None = None  # None: AWS (or AWS_ENDPOINT_URL)
    s3_region: str | None = None  # None: AWS_REGION / the profile's
    s3_redirect: bool = False  # answer blob GETs with a presigned URL (307)
    region: str | None = None  # multi-region: this node's region (needs regions_file)
    regions_file: Path | None = None
    peer_token: str | None = None  # credential for other regions' nodes
    peer_token_file: Path | None = None
    replication_lease: float = 30.0  # seconds a replication job stays claimed without renewal
    trusted_proxies: tuple[str, ...] = ()  # CIDRs of load balancers whose X-Forwarded-* count
    deploy_limits: DeployLimits = field(default_factory=DeployLimits)  # machines per release/app
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # timeouts, cap
    public_url: str | None = None  # what the server calls itself; None: see public_url_of
    metrics_address: str | None = None  # HOST:PORT serving /metrics without a token
    min_free_space: Watermark = field(default_factory=lambda: Watermark(percent=2.0))
    reclaim_idle: float = 600.0  # seconds idle before low space may reclaim an upload
    sqlite_synchronous: str = "full"  # "normal": faster, but a power cut may undo acknowledgements
    db_threads: int = DEFAULT_THREADS  # database threads per process (SQLite uses at most 4)
    gc_review_delay: float = 24 * 3600.0  # seconds before garbage collection reviews a candidate
    gc_interval: float = 10.0  # seconds between this process's garbage collection passes
    gc_keep_releases: int = 10  # releases per app whose images garbage collection keeps
    gc_worker: bool = True  # False (--no-gc): no collector worker here; enqueues still happen
    retention_interval: float = 300.0  # seconds between the gc worker's rounds over policies
    pull_flush_interval: float = 30.0  # seconds between writes of manifest pull times
    scan_worker: bool = True  # False (--no-scan): pushes are queued for scanning, not scanned here
    lazy_index: bool = True  # the scan worker makes layer indexes for lazy pull (--no-lazy-index)
    audit_days: int = 365  # days the audit log keeps an entry
    webhook_allow_private: bool = False  # webhook targets on loopback/private addresses
    webhook_max_attempts: int = 8  # attempts before a delivery fails
    webhook_retry_base: float = 5.0  # seconds before the first retry (doubling, at most 1 h)
    # Master keys of app secrets: SKYREG_SECRETS_KEY, else this 0600 file, else
    # `<data-dir>/secrets.key` (made on first use). See auth/envelope.py.
    secrets_key_file: Path | None = None
    secrets_key_env: str | None = None


def parse_storage(storage: str) -> tuple[str, str] | None:
    """`file` → None; `s3://BUCKET[/PREFIX]` → (bucket, prefix); anything else is ValueError."""
    if storage == "file":
        return None
    if not storage.startswith("s3://"):
        raise ValueError(f"storage must be 'file' or 's3://BUCKET[/PREFIX]', not {storage!r}")
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {storage!r} (s3://BUCKET[/PREFIX])")
    return bucket, prefix.strip("/")
