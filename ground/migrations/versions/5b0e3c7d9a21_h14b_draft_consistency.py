"""h14b: the bilingual consistency check and the guard result stored with each draft

Revision ID: 5b0e3c7d9a21
Revises: 00de6fea8b90
Create Date: 2026-12-05 08:20:00

On branch h14b this follows h14a's revision (merged into h14b); on main the lead re-chains it.
Drafts stored before this revision keep NULL (not checked); the research export checks those on
the fly from their stored text.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '5b0e3c7d9a21'
down_revision = '00de6fea8b90'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('draft', schema=None) as batch_op:
        batch_op.add_column(sa.Column('consistent', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('consistency', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('guard', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_draft_consistent'), ['consistent'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('draft', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_draft_consistent'))
        batch_op.drop_column('guard')
        batch_op.drop_column('consistency')
        batch_op.drop_column('consistent')
