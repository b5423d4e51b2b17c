"""Builders, builds and their logs.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "builders",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("region", sa.String(20), nullable=False),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("orgs.id")),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("registered_at", _TS, nullable=False),
        sa.Column("last_seen", _TS, nullable=False),
    )
    op.create_table(
        "builds",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS),
        sa.Column("finished_at", _TS),
        sa.Column("builder_id", sa.String(32), nullable=False),
        sa.Column("region", sa.String(20), nullable=False),
        sa.Column("context_digest", sa.String(200), nullable=False),
        sa.Column("context_size", sa.BigInteger, nullable=False),
        sa.Column("dockerfile", sa.Text, nullable=False),
        sa.Column("target", sa.Text),
        sa.Column("platform", sa.String(40)),
        sa.Column("build_args", sa.Text, nullable=False),
        sa.Column("secret_ids", sa.Text, nullable=False),
        sa.Column("sealed_secrets", sa.Text),
        sa.Column("no_cache", sa.Boolean, nullable=False),
        sa.Column("image_label", sa.String(128), nullable=False),
        sa.Column("image_digest", sa.String(200)),
        sa.Column("steps", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("client_seen_at", _TS, nullable=False),
        sa.Column("deadline", _TS, nullable=False),
        sa.Column("credential_id", sa.String(32)),
        sa.Column("log_lines", sa.Integer, nullable=False),
        sa.Column("log_bytes", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_builds_app", "builds", ["app_id", "created_at"])
    op.create_index("ix_builds_builder", "builds", ["builder_id", "status", "created_at"])
    op.create_table(
        "build_logs",
        sa.Column("build_id", sa.String(32), sa.ForeignKey("builds.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("build_logs")
    op.drop_index("ix_builds_builder", table_name="builds")
    op.drop_index("ix_builds_app", table_name="builds")
    op.drop_table("builds")
    op.drop_table("builders")
