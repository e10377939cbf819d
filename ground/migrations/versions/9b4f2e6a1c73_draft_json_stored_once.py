"""The draft JSON stored once: drop fhir_draft.draft_json (the FHIR room reads the draft table)

Every published draft was kept twice, as ``draft.draft_json`` (the pipeline's row) and again as
``fhir_draft.draft_json`` (identical: the publish stage passes the stored draft). The upgrade first
checks that every published draft has its ``draft`` row, and stops, dropping nothing, if one has not
(that copy would be the only one). The downgrade restores the column from the ``draft`` table.

Revision ID: 9b4f2e6a1c73
Revises: 7d2a9c4e1f60
Create Date: 2026-12-05 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "9b4f2e6a1c73"
down_revision = "7d2a9c4e1f60"
branch_labels = None
depends_on = None


def upgrade() -> None:
    orphans = op.get_bind().execute(sa.text(
        "SELECT draft_id FROM fhir_draft WHERE NOT EXISTS "
        "(SELECT 1 FROM draft WHERE draft.draft_id = fhir_draft.draft_id) ORDER BY draft_id"
    )).scalars().all()
    if orphans:
        raise RuntimeError(
            f"{len(orphans)} published draft(s) have no row in the draft table (first: {orphans[0]}); their "
            "fhir_draft.draft_json is their only copy, so it is not dropped. Restore those draft rows (or "
            "delete the published drafts), then run `taqrir db upgrade` again")
    with op.batch_alter_table("fhir_draft") as batch:
        batch.drop_column("draft_json")


def downgrade() -> None:
    with op.batch_alter_table("fhir_draft") as batch:
        batch.add_column(sa.Column("draft_json", sa.Text(), nullable=True))
    op.execute("UPDATE fhir_draft SET draft_json = "
               "(SELECT draft.draft_json FROM draft WHERE draft.draft_id = fhir_draft.draft_id)")
    with op.batch_alter_table("fhir_draft") as batch:
        batch.alter_column("draft_json", existing_type=sa.Text(), nullable=False)
