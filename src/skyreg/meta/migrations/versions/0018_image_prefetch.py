"""Learned prefetch lists for lazy pull.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_prefetch",
        sa.Column("repository_id", sa.Integer, primary_key=True),
        sa.Column("digest", sa.String(200), primary_key=True),
        sa.Column("ranges", sa.Text, nullable=False),
        sa.Column("range_count", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["repository_id", "digest"],
            ["manifests.repository_id", "manifests.digest"],
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("image_prefetch")
