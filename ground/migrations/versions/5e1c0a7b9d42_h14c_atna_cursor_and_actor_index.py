"""ATNA cursor per collector; index on audit_event.actor for AuditEvent search by agent

Revision ID: 5e1c0a7b9d42
Revises: 19a35012f8f2
Create Date: 2026-12-05 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "5e1c0a7b9d42"
down_revision = '19a35012f8f2'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "atna_cursor",
        sa.Column("collector", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("error_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("collector"),
    )
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_event_actor"), ["actor"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_event_actor"))
    op.drop_table("atna_cursor")
