"""Regions: which region holds which blob, the replication queue, and app placement.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blob_regions",
        sa.Column("digest", sa.String(200), primary_key=True),
        sa.Column("region", sa.String(20), primary_key=True),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "replication_jobs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("digest", sa.String(200), nullable=False),
        sa.Column("region", sa.String(20), nullable=False),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", _TS),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("bytes_moved", sa.BigInteger, nullable=False),
        sa.Column("source_region", sa.String(20)),
        sa.Column("error", sa.Text),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("digest", "region", name="uq_replication_jobs_digest_region"),
    )
    op.create_index(
        "ix_replication_jobs_due", "replication_jobs", ["region", "state", "next_attempt_at"]
    )
    with op.batch_alter_table("apps") as batch:
        batch.add_column(sa.Column("regions", sa.Text))
        batch.add_column(
            sa.Column("replicate_ahead", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("replicate_ahead")
        batch.drop_column("regions")
    op.drop_index("ix_replication_jobs_due", "replication_jobs")
    op.drop_table("replication_jobs")
    op.drop_table("blob_regions")
