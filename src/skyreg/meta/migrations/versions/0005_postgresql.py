"""PostgreSQL: unbounded text where a value has no limit of its own, byte-order names, 64-bit log
ids.

PostgreSQL enforces VARCHAR lengths (SQLite never did): a manifest's artifactType (or its config's
media type) and a release's image reference (it holds the request's Host) have no limit, so they
become TEXT. Tags and repository names are listed and paginated in byte order, as with SQLite's
BINARY collation, whatever the database's locale: their columns collate "C". Log lines are many:
their ids become BIGINT (sequence too). On SQLite every one of these already holds, so this
revision changes nothing there.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column(
        "manifests", "artifact_type", type_=sa.Text, existing_type=sa.String(255), nullable=True
    )
    op.alter_column(
        "releases", "image_ref", type_=sa.Text, existing_type=sa.String(512), nullable=False
    )
    op.alter_column(
        "repositories",
        "name",
        type_=sa.String(255, collation="C"),
        existing_type=sa.String(255),
        nullable=False,
    )
    op.alter_column(
        "tags",
        "name",
        type_=sa.String(128, collation="C"),
        existing_type=sa.String(128),
        nullable=False,
    )
    op.alter_column("machine_logs", "id", type_=sa.BigInteger, existing_type=sa.Integer)
    op.execute("ALTER SEQUENCE machine_logs_id_seq AS bigint")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER SEQUENCE machine_logs_id_seq AS integer")
    op.alter_column("machine_logs", "id", type_=sa.Integer, existing_type=sa.BigInteger)
    op.alter_column("tags", "name", type_=sa.String(128), nullable=False)
    op.alter_column("repositories", "name", type_=sa.String(255), nullable=False)
    op.alter_column("releases", "image_ref", type_=sa.String(512), nullable=False)
    op.alter_column("manifests", "artifact_type", type_=sa.String(255), nullable=True)
