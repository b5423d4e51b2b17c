"""Retention policies per app, pull times per manifest, quotas per org; the tags retention
deleted in each GC pass.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("gc_runs") as batch:
        batch.add_column(
            sa.Column("tags_deleted", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    op.create_table(
        "app_retention",
        sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id"), primary_key=True),
        sa.Column("keep_tags", sa.Text, nullable=False),
        sa.Column("keep_recent", sa.Integer),
        sa.Column("keep_within", sa.BigInteger),
        sa.Column("untagged_after", sa.BigInteger),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("last_run_at", _TS),
        sa.Column("tags_deleted", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "manifest_pulls",
        sa.Column("repository_id", sa.Integer, primary_key=True),
        sa.Column("digest", sa.String(200), primary_key=True),
        sa.Column("pulled_at", _TS, nullable=False),
    )
    op.create_table(
        "org_quotas",
        sa.Column("org_id", sa.Integer, sa.ForeignKey("orgs.id"), primary_key=True),
        sa.Column("soft_bytes", sa.BigInteger),
        sa.Column("hard_bytes", sa.BigInteger),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("org_quotas")
    op.drop_table("manifest_pulls")
    op.drop_table("app_retention")
    with op.batch_alter_table("gc_runs") as batch:
        batch.drop_column("tags_deleted")
