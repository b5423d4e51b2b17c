"""Machines: what runs each release, with their events and log lines.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "machines",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id"), nullable=False),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("region", sa.String(20), nullable=False),
        sa.Column("desired", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_index("ix_machines_region", "machines", ["region"])
    op.create_index("ix_machines_app", "machines", ["app_id"])
    op.create_index("ix_machines_release", "machines", ["release_id"])
    op.create_table(
        "machine_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(32), sa.ForeignKey("machines.id"), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("duration_ms", sa.Integer),
    )
    op.create_index("ix_machine_events_machine", "machine_events", ["machine_id"])
    op.create_table(
        "machine_logs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(32), sa.ForeignKey("machines.id"), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )
    op.create_index("ix_machine_logs_machine", "machine_logs", ["machine_id"])


def downgrade() -> None:
    op.drop_table("machine_logs")
    op.drop_table("machine_events")
    op.drop_table("machines")
