"""Backfill draft.fhir_report_id from fhir_draft, so audit needs no FHIR table to find a draft's report

Until now audit.deltas fell back to the FHIR room's ``fhir_draft`` row when the publish stage had not
yet recorded the report id (a crash between the API's answer and the worker's commit). Audit no longer
imports the FHIR room (issue 12's contracts); this copies every id that only ``fhir_draft`` knew. New
drafts get it from the publish stage and its sweep, which republishes idempotently.

Revision ID: 7d2a9c4e1f60
Revises: 5b0e3c7d9a21
Create Date: 2026-12-05 17:30:00
"""

from __future__ import annotations

from alembic import op

revision = "7d2a9c4e1f60"
down_revision = "5b0e3c7d9a21"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE draft SET fhir_report_id = "
        "(SELECT fhir_draft.report_id FROM fhir_draft WHERE fhir_draft.draft_id = draft.draft_id) "
        "WHERE fhir_report_id IS NULL "
        "AND EXISTS (SELECT 1 FROM fhir_draft WHERE fhir_draft.draft_id = draft.draft_id)"
    )


def downgrade() -> None:
    """Nothing to undo: the copied ids are the ones the publish stage would have written."""
