"""The stored draft: one row per machine draft of a study version (table ``draft``).

The table sits beside :class:`reporting.draft.Draft`, whose JSON it holds, because three rooms read it:
the pipeline writes it (``workers.service``), the FHIR room publishes from it, and the audit room
compares it with the signed report. Keeping it in ``workers`` made audit import the pipeline. This is
the one module of ``reporting`` that declares a table; the builders stay pure (the import contract in
``pyproject.toml`` names this exception).

``draft_id`` is derived from (study UID, version, pipeline configuration), and unique, so a retried or
duplicated task can never create a second draft of the same thing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from ground.clock import utcnow


class DraftRecord(SQLModel, table=True):
    """A stored machine draft: the :class:`reporting.draft.Draft` JSON plus pipeline bookkeeping."""

    __tablename__ = "draft"

    id: int | None = Field(default=None, primary_key=True)
    draft_id: str = Field(max_length=64, unique=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    study_instance_uid: str = Field(max_length=64, index=True)
    version: int
    config_sha256: str = Field(max_length=64)
    superseded: bool = Field(default=False, description="A newer study version exists.")
    draft_json: str = Field(sa_column=Column(Text, nullable=False))
    stage_times: str = Field(default="{}", sa_column=Column(Text, nullable=False),
                             description="JSON seconds per stage: queue, render, infer, persist, publish.")
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = None
    publish_attempted_at: datetime | None = Field(default=None, description="Last (re)publish sent; the sweep's timer.")
    publish_error: str | None = Field(default=None, sa_column=Column(Text), description="Why publishing failed for good.")
    fhir_report_id: str | None = Field(default=None, max_length=64)
    consistent: bool | None = Field(
        default=None, index=True,
        description="reporting.consistency verdict on the English and Arabic sections; None: not checked "
                    "(a draft stored before the check existed).")
    consistency: str | None = Field(
        default=None, sa_column=Column(Text),
        description="JSON reporting.consistency.ConsistencyResult: checker and lexicon versions, typed mismatches.")
    guard: str | None = Field(
        default=None, sa_column=Column(Text),
        description="JSON of the output guard's result for the stored text: passed, model calls spent "
                    "(2 = both languages passed first time), Arabic mode.")
