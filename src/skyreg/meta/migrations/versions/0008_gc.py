"""Online garbage collection: review queues, pending byte deletions, run history and totals.

Everything already stored is queued for one review a day after the upgrade (the default review
delay), so storage written before GC existed is collected too: blobs no manifest references,
and manifests no tag or index holds.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_FIRST_REVIEW = timedelta(days=1)


def _review_table(name: str, *key: sa.Column[object]) -> None:
    op.create_table(
        name,
        *key,
        sa.Column("review_after", _TS, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )


def upgrade() -> None:
    _review_table("gc_blob_reviews", sa.Column("digest", sa.String(200), primary_key=True))
    op.create_index("ix_gc_blob_reviews_due", "gc_blob_reviews", ["review_after"])
    _review_table(
        "gc_manifest_reviews",
        sa.Column("repository_id", sa.Integer, primary_key=True),
        sa.Column("digest", sa.String(200), primary_key=True),
    )
    op.create_index("ix_gc_manifest_reviews_due", "gc_manifest_reviews", ["review_after"])
    op.create_table(
        "gc_blob_deletions",
        sa.Column("digest", sa.String(200), primary_key=True),
        sa.Column("region", sa.String(20), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_index("ix_gc_blob_deletions_due", "gc_blob_deletions", ["region", "next_attempt_at"])
    op.create_table(
        "gc_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=False),
        sa.Column("manifests_reviewed", sa.Integer, nullable=False),
        sa.Column("manifests_deleted", sa.Integer, nullable=False),
        sa.Column("blobs_reviewed", sa.Integer, nullable=False),
        sa.Column("blobs_deleted", sa.Integer, nullable=False),
        sa.Column("links_deleted", sa.Integer, nullable=False),
        sa.Column("bytes_deleted", sa.BigInteger, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_manifest_references_child_digest", "manifest_references", ["child_digest"])
    op.create_table(
        "gc_totals",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    # What was stored before: one review each, a day from now.
    now = datetime.now(UTC)
    due = now + _FIRST_REVIEW
    stamp = {"due": due, "now": now}
    op.execute(
        sa.text(
            "INSERT INTO gc_blob_reviews (digest, review_after, event, attempts, created_at,"
            " updated_at) SELECT digest, :due, 'upgrade', 0, :now, :now FROM blobs"
        ).bindparams(**stamp)
    )
    op.execute(
        sa.text(
            "INSERT INTO gc_manifest_reviews (repository_id, digest, review_after, event,"
            " attempts, created_at, updated_at) SELECT m.repository_id, m.digest, :due,"
            " 'upgrade', 0, :now, :now FROM manifests m WHERE NOT EXISTS (SELECT 1 FROM tags t"
            " WHERE t.repository_id = m.repository_id AND t.manifest_digest = m.digest)"
        ).bindparams(**stamp)
    )


def downgrade() -> None:
    for table in (
        "gc_totals",
        "gc_runs",
        "gc_blob_deletions",
        "gc_manifest_reviews",
        "gc_blob_reviews",
    ):
        op.drop_table(table)
    op.drop_index("ix_manifest_references_child_digest", "manifest_references")
