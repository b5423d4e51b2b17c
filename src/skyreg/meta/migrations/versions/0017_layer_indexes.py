"""Layer indexes for lazy pull.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "layer_indexes",
        sa.Column("layer_digest", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("index_digest", sa.String(200)),
        sa.Column("index_size", sa.BigInteger),
        sa.Column("points_digest", sa.String(200)),
        sa.Column("points_size", sa.BigInteger),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("layer_indexes")
