"""The metadata schema. Alembic migrations under `migrations/versions` create exactly this."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.sql.expression import false, text
from sqlalchemy.types import TypeEngine

metadata = MetaData()


def _name(length: int) -> TypeEngine[str]:
    """A name listed in byte order (tags, repositories), like SQLite's BINARY collation: on
    PostgreSQL the column collates "C" whatever the database's locale (migration 0005)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


# A 64-bit id for high-volume rows (SQLite's INTEGER PRIMARY KEY already is one). Values with no
# length limit of their own are Text, not String(n): PostgreSQL enforces n, SQLite never did.
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")

repositories = Table(
    "repositories",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", _name(255), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Which repository may serve which blob (a push or a mount links it).
repository_blobs = Table(
    "repository_blobs",
    metadata,
    Column(
        "repository_id",
        Integer,
        ForeignKey("repositories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("digest", String(200), ForeignKey("blobs.digest"), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_repository_blobs_digest", "digest"),
)

manifests = Table(
    "manifests",
    metadata,
    Column(
        "repository_id",
        Integer,
        ForeignKey("repositories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("digest", String(200), primary_key=True),
    Column("media_type", String(255), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("artifact_type", Text),  # any string a manifest carries
    Column("subject_digest", String(200)),
    Column("annotations", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_manifests_subject", "repository_id", "subject_digest"),
)

# Edges from a manifest to what it references: blobs (config, layers) and child manifests.
manifest_references = Table(
    "manifest_references",
    metadata,
    Column("repository_id", Integer, primary_key=True),
    Column("parent_digest", String(200), primary_key=True),
    Column("child_digest", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),
    Index("ix_manifest_references_child", "repository_id", "child_digest"),
    # GC asks whether any manifest anywhere still references a blob (migration 0008).
    Index("ix_manifest_references_child_digest", "child_digest"),
)

tags = Table(
    "tags",
    metadata,
    Column(
        "repository_id",
        Integer,
        ForeignKey("repositories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("name", _name(128), primary_key=True),
    Column("manifest_digest", String(200), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_tags_manifest", "repository_id", "manifest_digest"),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("repository", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_uploads_updated", "updated_at"),
)

# -- platform: organizations, apps and access tokens --------------------------------------------

orgs = Table(
    "orgs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

apps = Table(
    "apps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("org_id", Integer, ForeignKey("orgs.id"), nullable=False),
    Column("public", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Placement (migration 0006): the app's regions (JSON list) and whether a push copies its
    # images there ahead of any deploy.
    Column("regions", Text),
    Column("replicate_ahead", Boolean, nullable=False, default=False, server_default=false()),
    # Secrets (migration 0011): bumped by every change of the app's secrets; a release keeps the
    # version it was made with (`releases.secrets_version`), its machines get that set.
    Column("secrets_version", Integer, nullable=False, default=0, server_default=text("0")),
    # Service (migration 0012): JSON of the port its machines listen on and their health checks;
    # the app's next release takes a copy (`releases.service`).
    Column("service", Text),
    Index("ix_apps_org", "org_id"),
)

# A token is shown once; only the SHA-256 of its secret is kept.
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("kind", String(16), nullable=False),  # admin | org | deploy | readonly
    Column("org_id", Integer, ForeignKey("orgs.id")),
    Column("app_id", Integer, ForeignKey("apps.id")),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_tokens_org", "org_id"),
)

# -- releases: which image an app runs -----------------------------------------------------------

releases = Table(
    "releases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", Integer, ForeignKey("apps.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("description", Text, nullable=False),
    Column("reason", String(32), nullable=False),
    Column("image_ref", Text, nullable=False),
    Column("image_repository", String(255), nullable=False),
    Column("image_digest", String(200), nullable=False),
    Column("strategy", String(16), nullable=False),
    Column("regions", Text, nullable=False),  # JSON list
    Column("machine_count", Integer, nullable=False),
    Column("stable", Boolean, nullable=False),
    Column("user_id", String(32), nullable=False),
    Column("user_name", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("secrets_version", Integer),  # the app's secrets_version then (None: before 0011)
    Column("env", Text),  # JSON object: plain environment variables of its machines (0011)
    Column("service", Text),  # JSON: its machines' port and health checks (0012; None: none)
    UniqueConstraint("app_id", "version", name="uq_releases_app_version"),
)

# -- machines: what runs each release, reported by region agents ---------------------------------

machines = Table(
    "machines",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("app_id", Integer, ForeignKey("apps.id"), nullable=False),
    Column("release_id", Integer, ForeignKey("releases.id"), nullable=False),
    Column("region", String(20), nullable=False),
    Column("desired", String(16), nullable=False),  # started | stopped | waiting (rolling)
    Column("state", String(16), nullable=False),  # created | starting | started | stopped | failed
    Column("generation", Integer, nullable=False),  # bumped by restart
    Column("exit_code", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("address", String(64)),  # where its agent reached it (0012)
    Column("health", String(16)),  # starting | passing | critical; None: no checks (0012)
    Index("ix_machines_region", "region"),
    Index("ix_machines_app", "app_id"),
    Index("ix_machines_release", "release_id"),
)

machine_events = Table(
    "machine_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("machine_id", String(32), ForeignKey("machines.id"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("message", Text, nullable=False),
    Column("duration_ms", Integer),
    Index("ix_machine_events_machine", "machine_id"),
)

machine_logs = Table(
    "machine_logs",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("machine_id", String(32), ForeignKey("machines.id"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("line", Text, nullable=False),
    Index("ix_machine_logs_machine", "machine_id", "id"),  # (machine_id, id) since 0016: tails
)

# -- regions (migration 0006) ---------------------------------------------------------------------

# Which region's blob store holds a verified copy of which blob.
blob_regions = Table(
    "blob_regions",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("region", String(20), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The durable replication queue: one job per (blob, target region).
replication_jobs = Table(
    "replication_jobs",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("digest", String(200), nullable=False),
    Column("region", String(20), nullable=False),
    Column("repository", String(255), nullable=False),  # a repository linking the blob
    Column("size", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # queued | running | done | failed
    Column("attempts", Integer, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("bytes_moved", BigInteger, nullable=False),
    Column("source_region", String(20)),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("digest", "region", name="uq_replication_jobs_digest_region"),
    Index("ix_replication_jobs_due", "region", "state", "next_attempt_at"),
)

# Registry-token signing keys (migration 0007): every node signs and verifies with the same ones.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(32), primary_key=True),
    Column("private_pem", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# -- garbage collection (migration 0008): review queues, pending byte deletions, history ---------

# A blob to review once `review_after` has passed: is it still linked and referenced?
gc_blob_reviews = Table(
    "gc_blob_reviews",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("review_after", DateTime(timezone=True), nullable=False),
    Column("event", String(32), nullable=False),  # what queued it last
    Column("attempts", Integer, nullable=False),  # failed reviews in a row
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_gc_blob_reviews_due", "review_after"),
)

# A manifest of a repository to review: tagged, a child, a referrer, a release's image?
gc_manifest_reviews = Table(
    "gc_manifest_reviews",
    metadata,
    Column("repository_id", Integer, primary_key=True),
    Column("digest", String(200), primary_key=True),
    Column("review_after", DateTime(timezone=True), nullable=False),
    Column("event", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_gc_manifest_reviews_due", "review_after"),
)

# Bytes of a deleted blob still to remove from one region's store ("" without regions).
gc_blob_deletions = Table(
    "gc_blob_deletions",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("region", String(20), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_gc_blob_deletions_due", "region", "next_attempt_at"),
)

# Recent collector passes (the newest few hundred), for `skyreg gc status`.
gc_runs = Table(
    "gc_runs",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("node", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # worker | manual
    Column("dry_run", Boolean, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("manifests_reviewed", Integer, nullable=False),
    Column("manifests_deleted", Integer, nullable=False),
    Column("blobs_reviewed", Integer, nullable=False),
    Column("blobs_deleted", Integer, nullable=False),
    Column("links_deleted", Integer, nullable=False),
    Column("bytes_deleted", BigInteger, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("error", Text),
    # tags retention policies deleted in the pass (migration 0009)
    Column("tags_deleted", Integer, nullable=False, server_default=text("0")),
)

# Running totals of everything collected (one row per name).
gc_totals = Table(
    "gc_totals",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# -- retention per app and quotas per org (migration 0009) ---------------------------------------

# What an app keeps: tags matching patterns, its N most recent tags per repository, those pushed
# or pulled within a duration; untagged manifests go `untagged_after` seconds after losing a tag.
app_retention = Table(
    "app_retention",
    metadata,
    Column("app_id", Integer, ForeignKey("apps.id"), primary_key=True),
    Column("keep_tags", Text, nullable=False),  # JSON list of glob patterns
    Column("keep_recent", Integer),
    Column("keep_within", BigInteger),  # seconds
    Column("untagged_after", BigInteger),  # seconds
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_run_at", DateTime(timezone=True)),
    Column("tags_deleted", BigInteger, nullable=False, default=0),  # by every run so far
)

# When a manifest of a repository was last pulled (GET), written in batches, not per request.
manifest_pulls = Table(
    "manifest_pulls",
    metadata,
    Column("repository_id", Integer, primary_key=True),
    Column("digest", String(200), primary_key=True),
    Column("pulled_at", DateTime(timezone=True), nullable=False),
)

# An org's storage limits in bytes (of the unique blobs its repositories link).
org_quotas = Table(
    "org_quotas",
    metadata,
    Column("org_id", Integer, ForeignKey("orgs.id"), primary_key=True),
    Column("soft_bytes", BigInteger),
    Column("hard_bytes", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# -- builds: Dockerfiles built by builders (migration 0010) --------------------------------------

# A builder host (`skyreg builder`): its region, the org it serves (None: every org) and the
# public key build secrets are sealed to (an X25519 key, new at every start of the builder).
builders = Table(
    "builders",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("region", String(20), nullable=False),
    Column("org_id", Integer, ForeignKey("orgs.id")),
    Column("public_key", String(64), nullable=False),
    Column("token_id", String(32), nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)

# One build: what was asked (context blob, Dockerfile, arguments), who asked, where it ran and
# what came out. `sealed_secrets` holds the build secrets sealed to the builder's key until the
# builder claims the build (then NULL); the plaintext is never stored.
builds = Table(
    "builds",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("org_id", Integer, ForeignKey("orgs.id"), nullable=False),
    Column("app_id", Integer, ForeignKey("apps.id"), nullable=False),
    Column("status", String(16), nullable=False),  # queued|running|succeeded|failed|cancelled
    Column("created_by", String(32), nullable=False),  # token id
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("builder_id", String(32), nullable=False),
    Column("region", String(20), nullable=False),
    Column("context_digest", String(200), nullable=False),
    Column("context_size", BigInteger, nullable=False),
    Column("dockerfile", Text, nullable=False),
    Column("target", Text),
    Column("platform", String(40)),
    Column("build_args", Text, nullable=False),  # JSON object
    Column("secret_ids", Text, nullable=False),  # JSON list (the ids only)
    Column("sealed_secrets", Text),  # JSON object id -> base64 sealed box; NULL once claimed
    Column("no_cache", Boolean, nullable=False),
    Column("image_label", String(128), nullable=False),
    Column("image_digest", String(200)),
    Column("steps", Text),  # JSON list of {step, instruction, seconds, cached}
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("client_seen_at", DateTime(timezone=True), nullable=False),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("credential_id", String(32)),  # the build token the builder pushes with
    Column("log_lines", Integer, nullable=False),
    Column("log_bytes", BigInteger, nullable=False),
    Index("ix_builds_app", "app_id", "created_at"),
    Index("ix_builds_builder", "builder_id", "status", "created_at"),
)

build_logs = Table(
    "build_logs",
    metadata,
    Column("build_id", String(32), ForeignKey("builds.id"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("line", Text, nullable=False),
)


# -- secrets: values encrypted under a data key per org, which a master key outside the database
# wraps (auth/envelope.py; meta/secrets.py) -------------------------------------------------

org_data_keys = Table(
    "org_data_keys",
    metadata,
    Column("org_id", Integer, ForeignKey("orgs.id"), primary_key=True),
    Column("key_id", String(32), nullable=False),  # the master key that wraps it
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("wrapped_at", DateTime(timezone=True), nullable=False),
)

# One row per value an app's secret took: set in version `set_in`, replaced or unset in
# `unset_in` (None: current). Rows no live release needs are deleted.
app_secrets = Table(
    "app_secrets",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("app_id", Integer, ForeignKey("apps.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("digest", String(32), nullable=False),
    Column("set_in", Integer, nullable=False),
    Column("unset_in", Integer),
    Column("set_by_id", String(32), nullable=False),
    Column("set_by_name", String(100), nullable=False),
    Column("set_at", DateTime(timezone=True), nullable=False),
    Index("ix_app_secrets_app", "app_id", "name"),
)

# -- scans: what images hold and what is known to be wrong with them (migration 0013) ------------

# One row per image manifest (by digest), queued in the transaction that stored the manifest
# (`meta/scans.py` `enqueue_scan`), so a crash never loses a scan. `repository` is one that held
# it then: where the scan worker reads its layers and attaches its SBOMs. The package and file
# lists and the findings are zstd-compressed msgspec JSON (`scan/model.py`).
image_scans = Table(
    "image_scans",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("repository", _name(255), nullable=False),
    Column("region", String(64), nullable=False, server_default=""),  # whose store has the push
    Column("state", String(16), nullable=False),  # queued, indexing, done, failed
    Column("queued_at", DateTime(timezone=True), nullable=False),
    Column("claimed_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", Text),
    Column("indexed_at", DateTime(timezone=True)),
    Column("os", Text),
    Column("package_count", Integer),
    Column("file_count", Integer),
    Column("packages", LargeBinary),
    Column("files", LargeBinary),
    Column("files_truncated", Boolean, nullable=False, server_default=false()),
    Column("matched_generation", Integer, nullable=False, server_default=text("0")),
    Column("matched_at", DateTime(timezone=True)),
    Column("findings", LargeBinary),
    Column("severity_counts", Text),  # JSON {"CRITICAL": n, ...}
    Index("ix_image_scans_state", "region", "state", "queued_at"),
    Index("ix_image_scans_generation", "matched_generation"),
)

# OSV advisories as the operator loaded them (`skyreg vulndb import`): the record skyreg keeps
# (`scan/osv.py` `Advisory`, msgspec JSON) and each (ecosystem, package name) it names, the key
# matching looks advisories up by. `vulndb_state` (one row) counts changes: scans matched at an
# older generation are matched again, without reading their layers.
vuln_advisories = Table(
    "vuln_advisories",
    metadata,
    Column("id", String(256), primary_key=True),
    Column("modified", String(64), nullable=False),
    Column("record", LargeBinary, nullable=False),
)

vuln_packages = Table(
    "vuln_packages",
    metadata,
    Column("ecosystem", String(128), primary_key=True),
    Column("name", String(1024), primary_key=True),
    Column(
        "advisory_id",
        String(256),
        ForeignKey("vuln_advisories.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Index("ix_vuln_packages_advisory", "advisory_id"),
)

vulndb_state = Table(
    "vulndb_state",
    metadata,
    Column("id", Integer, primary_key=True),  # always 1
    Column("generation", Integer, nullable=False),
    Column("advisories", Integer, nullable=False),
    Column("imported_at", DateTime(timezone=True)),
    Column("source", Text),
)

# -- the audit log (migration 0014) -------------------------------------------------------------

# One row per mutating management API call and registry action (push, deletions), appended after
# it answered: who (the token: id, name, kind; none for an anonymous caller), what (`action`: the
# API operation or registry action; `target`: what it named), when, from where (the client
# address), and the result (the HTTP status). `org_id` is the org whose thing was acted on (else
# the caller's; None: neither, seen by admins only). Nothing updates or deletes a row but the
# expiry of rows older than the retention (`meta/audit.py`).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("org_id", Integer),
    Column("actor_id", String(32)),
    Column("actor_name", String(100)),
    Column("actor_kind", String(16)),
    Column("action", String(64), nullable=False),
    Column("target", Text, nullable=False),
    Column("client", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Index("ix_audit_log_org", "org_id", "id"),
    Index("ix_audit_log_at", "at"),
)

# -- webhooks (migration 0015) -------------------------------------------------------------------

# A webhook of an org (app_id None: every app of it) for some event types; its HMAC secret
# sealed under a master key (`key_id`), shown to its creator once.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("org_id", Integer, ForeignKey("orgs.id"), nullable=False),
    Column("app_id", Integer, ForeignKey("apps.id")),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event types; [] = every type
    Column("key_id", String(32), nullable=False),
    Column("sealed_secret", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(32)),
    Column("deleted_at", DateTime(timezone=True)),
    Index("ix_webhooks_org", "org_id"),
)

# The outbox: one row per (event, webhook), written in the transaction of the change that made
# the event; the `webhooks` worker delivers each webhook's rows in id order (at least once; the
# CloudEvents id names the event for de-duplication), retrying with backoff up to a cap.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", _BIG_ID, primary_key=True, autoincrement=True),
    Column("webhook_id", String(32), ForeignKey("webhooks.id"), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("subject", Text),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("data", Text, nullable=False),  # JSON
    Column("state", String(16), nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_status", Integer),
    Column("last_latency_ms", Integer),
    Column("last_response", Text),
    Column("last_error", Text),
    Column("delivered_at", DateTime(timezone=True)),
    Index("ix_webhook_deliveries_due", "state", "webhook_id", "id"),
)

# -- console sessions (migration 0016) ------------------------------------------------------------

# A signed-in browser: the sha256 of its session cookie's secret, the access token it signed in
# with (the session sees what that token sees, and ends when the token is revoked or expires),
# and its own end. Sign-out deletes the row.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("token_id", String(32), ForeignKey("tokens.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("client", String(64), nullable=False),
    Index("ix_console_sessions_expires", "expires_at"),
)

# -- layer indexes for lazy pull (migration 0017) ------------------------------------------------

# A layer blob's seekable index (docs/lazy-index.md), made once per layer digest whatever the
# images sharing it: the index document's blob and, for gzip, its seek points' blob (both kept
# in the registry's blob store, linked into each repository whose images use them); or why
# there is none (`unindexable`: one zstd frame, a limit; `failed`: not a readable tar).
layer_indexes = Table(
    "layer_indexes",
    metadata,
    Column("layer_digest", String(200), primary_key=True),
    Column("state", String(16), nullable=False),  # done, unindexable, failed
    Column("index_digest", String(200)),
    Column("index_size", BigInteger),
    Column("points_digest", String(200)),
    Column("points_size", BigInteger),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# -- learned prefetch lists for lazy pull (migration 0018) ----------------------------------------

# What machines of an image read in their first seconds (lazy/prefetch.py), as its agent last
# reported it: the JSON list of (layer digest, offset, length) ranges of the layers' uncompressed
# streams. One row per manifest of a repository; it goes with the manifest.
image_prefetch = Table(
    "image_prefetch",
    metadata,
    Column("repository_id", Integer, primary_key=True),
    Column("digest", String(200), primary_key=True),
    Column("ranges", Text, nullable=False),
    Column("range_count", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("reported_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(
        ["repository_id", "digest"],
        ["manifests.repository_id", "manifests.digest"],
        ondelete="CASCADE",
    ),
)
