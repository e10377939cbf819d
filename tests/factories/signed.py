"""Studies and drafts in the index, for the signed-report and delta tests (rows, as the listener
and the pipeline would have written them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ground.db import session_scope
from integrations.dicom.index import Patient, Study, StudyState
from reporting.draft import Draft, Sections
from reporting.draft_record import DraftRecord
from tests.factories.drafts import sample_draft

ARRIVAL = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def add_study(session: Session, *, study_uid: str, accession: str | None, patient_id: str = "P1",
              arrival: datetime = ARRIVAL, state: StudyState = StudyState.drafted) -> Study:
    patient = Patient(patient_id=patient_id, issuer="")
    session.add(patient)
    session.flush()
    study = Study(study_instance_uid=study_uid, patient_pk=patient.id or 0, accession_number=accession,
                  state=state.value, first_received_at=arrival, last_received_at=arrival)
    session.add(study)
    session.flush()
    return study


def add_draft(session: Session, study: Study, *, draft: Draft | None = None,
              sections: dict[str, Sections] | None = None, after: timedelta = timedelta(minutes=2),
              version: int = 1) -> DraftRecord:
    base = draft or sample_draft()
    ref = base.study.model_copy(update={"study_instance_uid": study.study_instance_uid,
                                        "accession_number": study.accession_number, "version": version})
    draft_id = base.draft_id if draft is not None else f"d-{study.study_instance_uid[-20:]}-{version}"
    d = base.model_copy(update={"draft_id": draft_id, "study": ref,
                                "sections": sections or base.sections,
                                "created_at": study.first_received_at + after})
    rec = DraftRecord(draft_id=d.draft_id, study_pk=study.id or 0, study_instance_uid=study.study_instance_uid,
                      version=version, config_sha256="cfg", draft_json=d.model_dump_json(),
                      created_at=d.created_at)
    session.add(rec)
    session.flush()
    return rec


def seed(engine: Engine, *, study_uid: str = "1.2.826.0.1.3680043.8.498.1001", accession: str | None = "ACC1001",
         with_draft: bool = True) -> tuple[int, str | None]:
    """A drafted study (and its draft); returns (study pk, draft id)."""
    with session_scope(engine) as s:
        study = add_study(s, study_uid=study_uid, accession=accession)
        rec = add_draft(s, study) if with_draft else None
        return study.id or 0, rec.draft_id if rec else None
