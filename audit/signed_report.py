"""The stored signed report (table ``signed_report``): what :func:`audit.signed.store_signed_report`
writes and :mod:`audit.deltas` and the research export read.

Apart from ``audit.signed`` because the deltas are recomputed on every store: the store imports the
deltas, the deltas import this table, and neither needs a function-local import to do so.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field as SqlField
from sqlmodel import SQLModel

from ground.clock import utcnow

#: Statuses that mean a clinician signed the text (deltas are computed against these only).
SIGNED_STATUSES: frozenset[str] = frozenset({"final", "amended", "corrected"})


class SignedReport(SQLModel, table=True):
    """One signed report of one study in one language (a bilingual report is two rows).

    Never updated except ``current`` (cleared when a later report of the same study and language
    arrives). Drafts and their FHIR resources are never touched by storing one.
    """

    __tablename__ = "signed_report"
    __table_args__ = (
        UniqueConstraint("source", "source_id", "source_version", "language", name="uq_signed_report_source"),
    )

    id: int | None = SqlField(default=None, primary_key=True)
    study_pk: int = SqlField(foreign_key="study.id", index=True)
    study_instance_uid: str = SqlField(max_length=64, index=True)
    accession_number: str | None = SqlField(default=None, max_length=64, index=True)
    source: str = SqlField(max_length=8, description="fhir | hl7 | dicom: the door it came in by.")
    source_id: str = SqlField(
        max_length=128,
        description="FHIR DiagnosticReport id, HL7 message control id (MSH-10) or SR SOP Instance UID.",
    )
    source_version: str = SqlField(
        default="", max_length=64,
        description="FHIR: hash of the posted content (a PUT with new content is a new row); else ''.",
    )
    status: str = SqlField(max_length=16, description="final | amended | corrected | preliminary")
    language: str = SqlField(max_length=2, description="en | ar")
    findings: str = SqlField(default="", sa_column=Column(Text, nullable=False))
    impression: str = SqlField(default="", sa_column=Column(Text, nullable=False))
    text: str = SqlField(
        default="", sa_column=Column(Text, nullable=False),
        description="The whole signed text in this language (what deltas compare).",
    )
    signer_name: str | None = SqlField(default=None, max_length=324)
    signer_id: str | None = SqlField(default=None, max_length=128)
    signed_at: datetime | None = SqlField(default=None, description="When the clinician signed (as sent).")
    received_at: datetime = SqlField(default_factory=utcnow, index=True)
    current: bool = SqlField(default=True, description="False once a later report of the study+language arrived.")
    raw_ref: str | None = SqlField(
        default=None, max_length=256,
        description="Where the raw input is kept (hl7_message id, FHIR resource, SR storage key).",
    )
    source_json: str | None = SqlField(
        default=None, sa_column=Column(Text),
        description="The received FHIR DiagnosticReport as sent (FHIR only; HL7 keeps hl7_message.raw).",
    )
