"""The instance spool: small instances' bytes committed with their rows (issue 15)

One table, ``instance_spool``: a small instance's bytes, written in the transaction that files
it, so that one flush (the index's commit) makes the acknowledgement durable; its file is made
durable after the acknowledgement and the row deleted (``integrations.dicom.spool``). Empty
between bursts; nothing to migrate.

Revision ID: c3e8a1d5f207
Revises: 9b4f2e6a1c73
Create Date: 2026-12-06 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "c3e8a1d5f207"
down_revision = "9b4f2e6a1c73"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_spool",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("sop_instance_uid", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("storage_key", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # pixel data compresses poorly and the row lives milliseconds: out of line, uncompressed
        op.execute("ALTER TABLE instance_spool ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    rows = op.get_bind().execute(sa.text("SELECT count(*) FROM instance_spool")).scalar_one()
    if rows:
        raise RuntimeError(
            f"instance_spool holds {rows} instance(s) whose files may not be durable yet; start "
            "`taqrir listen` once (it writes them back and empties the spool), then downgrade")
    op.drop_table("instance_spool")
