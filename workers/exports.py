"""What the pipeline hands to people and to PACS destinations: the draft's export folder, the
written DICOM objects, and their outbox rows.

Its own module because two writers use it: the publish stage (``workers.service``: SR, PDF, KOS)
and the verified SR written after a clinician's review (``workers.dicom_objects``); before, the
second imported the first inside a function to dodge the cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from integrations.dicom.outbox import OutboxObject, enqueue_objects
from reporting.draft import Draft
from workers.config import ObjectSettings


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM object written: what the outbox needs to send it, and where people find it."""

    kind: str
    """``sr``, ``pdf``, ``kos`` or ``verified_sr`` (export destinations choose by kind)."""
    sop_class_uid: str
    sop_instance_uid: str
    storage_key: str
    """Key of the Part 10 file in Taqrir's storage (what the sender reads)."""
    export_file: Path
    """The copy beside the draft's FHIR JSON."""


def export_dir(settings: ObjectSettings, draft: Draft) -> Path:
    """Where a draft's JSON files are written for people to open."""
    return settings.data_dir / "drafts" / draft.study.study_instance_uid / f"v{draft.study.version}"


def enqueue_export(session: Session, settings: ObjectSettings, draft: Draft, objects: Sequence[WrittenObject]) -> int:
    """Queue a draft's written DICOM objects for every export destination that takes them, in
    the caller's transaction (the outbox: ``integrations.dicom.outbox``). Returns the number of
    outbox rows."""
    rows = enqueue_objects(
        session, draft_id=draft.draft_id, study_instance_uid=draft.study.study_instance_uid,
        objects=[OutboxObject.model_validate({"kind": o.kind, "sop_class_uid": o.sop_class_uid,
                                              "sop_instance_uid": o.sop_instance_uid, "location": o.storage_key})
                 for o in objects],
        destinations=settings.export.destinations,
    )
    return len(rows)
