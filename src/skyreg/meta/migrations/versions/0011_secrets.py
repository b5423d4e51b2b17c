"""App secrets (each org's wrapped data key, each app's sealed values by version) and the
plain environment variables of a release.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.add_column(
            sa.Column("secrets_version", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("secrets_version", sa.Integer))
        batch.add_column(sa.Column("env", sa.Text))
    op.create_table(
        "org_data_keys",
        sa.Column("org_id", sa.Integer, sa.ForeignKey("orgs.id"), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("wrapped_at", _TS, nullable=False),
    )
    op.create_table(
        "app_secrets",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.Column("set_in", sa.Integer, nullable=False),
        sa.Column("unset_in", sa.Integer),
        sa.Column("set_by_id", sa.String(32), nullable=False),
        sa.Column("set_by_name", sa.String(100), nullable=False),
        sa.Column("set_at", _TS, nullable=False),
    )
    op.create_index("ix_app_secrets_app", "app_secrets", ["app_id", "name"])


def downgrade() -> None:
    op.drop_index("ix_app_secrets_app", table_name="app_secrets")
    op.drop_table("app_secrets")
    op.drop_table("org_data_keys")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("env")
        batch.drop_column("secrets_version")
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("secrets_version")
