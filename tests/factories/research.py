"""A small research scenario in the database: drafts as the pipeline stores them, a published and
reviewed one, a signed report with its deltas, an older draft stored before the consistency check
existed. Built through the real service functions (publish, review, store_signed_report)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.signed import SignedReportIn, SignedText, store_signed_report
from ground.db import session_scope
from integrations.dicom.index import Patient, Series, Study
from integrations.fhir.store import publish_draft, review_report
from reporting.consistency import check_sections
from reporting.draft import Sections
from reporting.draft_record import DraftRecord
from reporting.fhir import Review
from tests.factories.drafts import CT_3SLICE, MR_SMALL, draft_from_dicom
from tests.factories.signed import add_draft, add_study

CT_UID = "1.2.826.0.1.3680043.8.498.2001"
MR_UID = "1.2.826.0.1.3680043.8.498.2002"
PATIENT_NAME = "HADDAD^AMAL"
PATIENT_ID = "PAT-7731"
ACCESSION = "ACC-99001"
ARRIVAL = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)

CT_TEXT = {
    "en": Sections(findings="Small left pleural effusion. No pneumothorax.", impression="Small left pleural effusion."),
    "ar": Sections(findings="انصباب جنبي صغير في الجهة اليسرى. لا يوجد استرواح صدري.",
                   impression="انصباب جنبي أيسر صغير."),
}
MR_TEXT = {  # the Arabic says right: the check flags it
    "en": Sections(findings="A 12 mm lesion in the left kidney.", impression="Left renal lesion."),
    "ar": Sections(findings="آفة بقياس ١٢ ملم في الكلية اليمنى.", impression="آفة كلوية يمنى."),
}


@dataclass(frozen=True)
class Scenario:
    ct_draft_v1: str
    ct_draft_v2: str
    mr_draft: str
    report_id: str


def build(engine: Engine) -> Scenario:
    with session_scope(engine) as s:
        ct = add_study(s, study_uid=CT_UID, accession=ACCESSION, patient_id=PATIENT_ID, arrival=ARRIVAL)
        patient = s.get(Patient, ct.patient_pk)
        assert patient is not None
        patient.name, patient.birth_date, patient.sex = PATIENT_NAME, date(1961, 4, 2), "F"
        ct.study_date, ct.patient_age, ct.version = date(2026, 11, 3), "065Y", 2
        s.add_all([patient, ct, Series(series_instance_uid=CT_UID + ".1", study_pk=ct.id or 0, modality="CT")])
        base = draft_from_dicom(CT_3SLICE)
        v1 = add_draft(s, ct, draft=base.model_copy(update={"draft_id": "ct-draft-v1"}), sections=CT_TEXT,
                       version=1, after=timedelta(minutes=3))
        v1.superseded = True
        v2 = add_draft(s, ct, draft=base.model_copy(update={"draft_id": "ct-draft-v2"}), sections=CT_TEXT,
                       version=2, after=timedelta(minutes=9))
        for rec in (v1, v2):
            result = check_sections(CT_TEXT)
            rec.consistent, rec.consistency = result.consistent, result.model_dump_json()
            rec.guard = '{"passed": true, "model_calls": 3, "arabic_mode": "translate"}'
            rec.stage_times = '{"queue_s": 0.4, "render_s": 0.02, "infer_s": 3.5, "model_latency_s": 3.2, "persist_s": 0.01}'
        mr = add_study(s, study_uid=MR_UID, accession="ACC-99002", patient_id="PAT-8842",
                       arrival=ARRIVAL + timedelta(days=20))
        s.add(Series(series_instance_uid=MR_UID + ".1", study_pk=mr.id or 0, modality="MR"))
        mr_base = draft_from_dicom([MR_SMALL]).model_copy(update={"draft_id": "mr-draft-v1"})
        mr_rec = add_draft(s, mr, draft=mr_base, sections=MR_TEXT)  # stored before the check existed: NULL
        s.add_all([v1, v2])
        ids = (v1.draft_id, v2.draft_id, mr_rec.draft_id)
    # publish v2, a clinician edits it, the RIS sends the signed report back
    with session_scope(engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == ids[1])).one()
        from reporting.draft import Draft

        draft = Draft.model_validate_json(rec.draft_json)
        rid = publish_draft(s, draft)
        rec.fhir_report_id, rec.published_at = rid, ARRIVAL + timedelta(minutes=10)
        s.add(rec)
    with session_scope(engine) as s:
        review_report(s, rid, Review(action="edit", reviewer_id="dr.amal", reviewed_at=ARRIVAL + timedelta(hours=2),
                                     edits={"en": Sections(findings="Small left pleural effusion.",
                                                           impression="Small left effusion.")}), if_match=None)
    with session_scope(engine) as s:
        store_signed_report(s, SignedReportIn(
            source="hl7", source_id="MSG-1", accession_number=ACCESSION, status="final",
            texts=(SignedText(language="en", findings="Small left pleural effusion.", impression="Small left effusion."),
                   SignedText(language="ar", text="انصباب جنبي صغير في الجهة اليسرى.")),
            signer_name="Dr Amal Haddad", signer_id="dr.amal", signed_at=ARRIVAL + timedelta(hours=3)))
    with session_scope(engine) as s:
        assert s.exec(select(Study)).all()
    return Scenario(ids[0], ids[1], ids[2], rid)
