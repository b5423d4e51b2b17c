"""Scans: what each image manifest holds (packages, files, findings) and the OSV advisories
they are matched against.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def _name(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "image_scans",
        sa.Column("digest", sa.String(200), primary_key=True),
        sa.Column("repository", _name(255), nullable=False),
        sa.Column("region", sa.String(64), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("queued_at", _TS, nullable=False),
        sa.Column("claimed_at", _TS),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("error", sa.Text),
        sa.Column("indexed_at", _TS),
        sa.Column("os", sa.Text),
        sa.Column("package_count", sa.Integer),
        sa.Column("file_count", sa.Integer),
        sa.Column("packages", sa.LargeBinary),
        sa.Column("files", sa.LargeBinary),
        sa.Column("files_truncated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("matched_generation", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("matched_at", _TS),
        sa.Column("findings", sa.LargeBinary),
        sa.Column("severity_counts", sa.Text),
    )
    op.create_index("ix_image_scans_state", "image_scans", ["region", "state", "queued_at"])
    op.create_index("ix_image_scans_generation", "image_scans", ["matched_generation"])
    op.create_table(
        "vuln_advisories",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("modified", sa.String(64), nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "vuln_packages",
        sa.Column("ecosystem", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(1024), primary_key=True),
        sa.Column(
            "advisory_id",
            sa.String(256),
            sa.ForeignKey("vuln_advisories.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_vuln_packages_advisory", "vuln_packages", ["advisory_id"])
    op.create_table(
        "vulndb_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("advisories", sa.Integer, nullable=False),
        sa.Column("imported_at", _TS),
        sa.Column("source", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("vulndb_state")
    op.drop_index("ix_vuln_packages_advisory", "vuln_packages")
    op.drop_table("vuln_packages")
    op.drop_table("vuln_advisories")
    op.drop_index("ix_image_scans_generation", "image_scans")
    op.drop_index("ix_image_scans_state", "image_scans")
    op.drop_table("image_scans")
