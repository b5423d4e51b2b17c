"""Releases: which image (pinned by digest) an app runs, who deployed it and why.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("image_ref", sa.String(512), nullable=False),
        sa.Column("image_repository", sa.String(255), nullable=False),
        sa.Column("image_digest", sa.String(200), nullable=False),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("regions", sa.Text, nullable=False),
        sa.Column("machine_count", sa.Integer, nullable=False),
        sa.Column("stable", sa.Boolean, nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("user_name", sa.String(100), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("app_id", "version", name="uq_releases_app_version"),
    )


def downgrade() -> None:
    op.drop_table("releases")
