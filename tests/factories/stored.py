"""A draft as the pipeline leaves it before publishing: its study in the index and its row in the
``draft`` table (the FHIR room reads the draft from there; it keeps no copy of its own)."""

from __future__ import annotations

from sqlmodel import Session, select

from integrations.dicom.index import Patient, Study, StudyState
from reporting.draft import Draft
from reporting.draft_record import DraftRecord


def store_draft(session: Session, draft: Draft) -> Draft:
    """Add ``draft``'s patient, study and draft rows unless they exist; returns ``draft``."""
    if session.exec(select(DraftRecord.id).where(DraftRecord.draft_id == draft.draft_id)).first() is not None:
        return draft
    ref = draft.study
    study = session.exec(select(Study).where(Study.study_instance_uid == ref.study_instance_uid)).first()
    if study is None:
        issuer = ref.patient.issuer or ""
        patient = session.exec(select(Patient).where(Patient.patient_id == ref.patient.patient_id,
                                                     Patient.issuer == issuer)).first()
        if patient is None:
            patient = Patient(patient_id=ref.patient.patient_id, issuer=issuer, name=ref.patient.name)
            session.add(patient)
            session.flush()
        study = Study(study_instance_uid=ref.study_instance_uid, patient_pk=patient.id or 0,
                      accession_number=ref.accession_number, state=StudyState.drafted.value, version=ref.version)
        session.add(study)
        session.flush()
    session.add(DraftRecord(draft_id=draft.draft_id, study_pk=study.id or 0, study_instance_uid=ref.study_instance_uid,
                            version=ref.version, config_sha256="test", draft_json=draft.model_dump_json(),
                            created_at=draft.created_at))
    session.flush()
    return draft
