"""Pipeline state that is not the study's own: key-image sets, and queries over stored drafts.

The study row (``integrations.dicom.index.Study``) holds the state machine; this module holds what
the stages produce. ``draft_id`` is derived from (study UID, version, pipeline configuration), and
unique, so a retried or duplicated task can never create a second draft of the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from ground.clock import utcnow
from reporting.draft_record import DraftRecord


class KeyImageSet(SQLModel, table=True):
    """The rendered key images of one study version (files in storage; this row says where)."""

    __tablename__ = "key_image_set"
    __table_args__ = (UniqueConstraint("study_pk", "version", "config_sha256", name="uq_keyimages_version"),)

    id: int | None = Field(default=None, primary_key=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    version: int
    config_sha256: str = Field(max_length=64)
    folder_key: str = Field(max_length=512, description="Storage key of the folder with PNGs + provenance.json.")
    manifest: str = Field(sa_column=Column(Text, nullable=False), description="JSON: key images, decisions, failures.")
    render_s: float = 0.0
    queue_s: float = Field(default=0.0, description="Seconds between the hand-off and the start of rendering.")
    created_at: datetime = Field(default_factory=utcnow)


def consistency_of_current_drafts(session: Session, studies: Sequence[tuple[int, int]]) -> dict[int, str | None]:
    """For (study pk, version) pairs: the stored consistency JSON of that version's newest draft
    (None when the draft predates the check; pairs without a draft are left out)."""
    if not studies:
        return {}
    wanted = dict(studies)
    rows = session.exec(
        select(DraftRecord.study_pk, DraftRecord.version, DraftRecord.consistency)
        .where(col(DraftRecord.study_pk).in_(list(wanted)))
        .order_by(col(DraftRecord.created_at))
    ).all()
    return {pk: text for pk, version, text in rows if wanted.get(pk) == version}
