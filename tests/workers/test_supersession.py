"""Issue 11, item 10, the pipeline side: publishing version N+1's draft marks version N's draft
superseded and supersedes its FHIR report in the same transaction, audited (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.dicom.index import Patient, Study
from integrations.fhir.store import FhirResource
from reporting.draft import Draft
from reporting.draft_record import DraftRecord
from reporting.fhir.ids import report_id
from taqrir.settings import load_settings
from tests.factories.drafts import sample_draft
from workers.service import PipelineContext, publish_stage


def _record(s: object, study_pk: int, draft: Draft) -> None:
    s.add(DraftRecord(draft_id=draft.draft_id, study_pk=study_pk,  # type: ignore[attr-defined]
                      study_instance_uid=draft.study.study_instance_uid, version=draft.study.version,
                      config_sha256="cfg", draft_json=draft.model_dump_json()))


def test_publishing_version_two_supersedes_version_one(engine: Engine, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", database_url=engine.url.render_as_string(hide_password=False))
    ctx = PipelineContext.from_settings(settings, engine)
    v1 = sample_draft()
    v2 = v1.model_copy(update={"draft_id": v1.draft_id[:60] + "-v2",
                               "study": v1.study.model_copy(update={"version": 2}),
                               "created_at": v1.created_at + timedelta(hours=1)})
    with session_scope(engine) as s:
        patient = Patient(patient_id="P1")
        s.add(patient)
        s.flush()
        study = Study(study_instance_uid=v1.study.study_instance_uid, patient_pk=patient.id or 0, version=2)
        s.add(study)
        s.flush()
        _record(s, study.id or 0, v1)
    assert publish_stage(ctx, v1.draft_id) == report_id(v1)
    with session_scope(engine) as s:
        _record(s, study.id or 0, v2)
    assert publish_stage(ctx, v2.draft_id) == report_id(v2)
    with session_scope(engine) as s:
        rec1 = s.exec(select(DraftRecord).where(DraftRecord.draft_id == v1.draft_id)).one()
        rec2 = s.exec(select(DraftRecord).where(DraftRecord.draft_id == v2.draft_id)).one()
        assert rec1.superseded and not rec2.superseded
        old = s.get(FhirResource, ("DiagnosticReport", report_id(v1)))
        new = s.get(FhirResource, ("DiagnosticReport", report_id(v2)))
        assert old is not None and new is not None
        assert (old.status, old.version_id, new.status) == ("cancelled", 2, "partial")
        records = s.exec(select(AuditRecord).where(col(AuditRecord.action).in_(["draft.superseded", "fhir.supersede",
                                                                                   "fhir.publish"]))
                         .order_by(col(AuditRecord.seq))).all()
        actions = [r.action for r in records]
        assert actions == ["fhir.publish", "fhir.publish", "fhir.supersede", "draft.superseded"]
        assert json.loads(records[-1].details)["by_draft"] == v2.draft_id
        assert verify(s).ok
    # a superseded draft is not published again
    assert publish_stage(ctx, v1.draft_id) == report_id(v1)
