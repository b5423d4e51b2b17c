"""Console sessions: signed-in browsers; a machine's log lines indexed by (machine, id) for
its tail.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id_sha256", sa.String(64), primary_key=True),
        sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.id"), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
    )
    op.create_index("ix_console_sessions_expires", "console_sessions", ["expires_at"])
    op.drop_index("ix_machine_logs_machine", "machine_logs")
    op.create_index("ix_machine_logs_machine", "machine_logs", ["machine_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_machine_logs_machine", "machine_logs")
    op.create_index("ix_machine_logs_machine", "machine_logs", ["machine_id"])
    op.drop_index("ix_console_sessions_expires", "console_sessions")
    op.drop_table("console_sessions")
