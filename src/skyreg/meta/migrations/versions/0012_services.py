"""Services: the port and health checks of an app's machines (the app's, and each release's
copy), and the address and health agents report of each machine.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.add_column(sa.Column("service", sa.Text))
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("service", sa.Text))
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("address", sa.String(64)))
        batch.add_column(sa.Column("health", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("health")
        batch.drop_column("address")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("service")
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("service")
