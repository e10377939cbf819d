"""publish_draft: idempotent per draft, upserts shared resources, audited."""

from __future__ import annotations

import json

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.fhir.store import FhirResource, FhirResourceVersion, publish_draft, put_resource
from reporting.labels import has_labels
from tests.factories.drafts import CT_3SLICE, draft_from_dicom, draft_variant
from tests.factories.stored import store_draft


def _count(engine: Engine, model: type) -> int:
    with session_scope(engine) as s:
        return int(s.exec(select(func.count()).select_from(model)).one())


def test_publish_is_idempotent_and_upserts_shared_resources(engine: Engine) -> None:
    draft = draft_from_dicom(CT_3SLICE)
    with session_scope(engine) as s:
        rid = publish_draft(s, store_draft(s, draft))
    rows, versions = _count(engine, FhirResource), _count(engine, FhirResourceVersion)
    assert rows == 5 and versions == 5
    with session_scope(engine) as s:
        assert publish_draft(s, draft) == rid
    assert (_count(engine, FhirResource), _count(engine, FhirResourceVersion)) == (rows, versions)

    # Version 2 of the same study (a late series arrived): same Patient/Device, new ImagingStudy version.
    late = draft.study.series[0].model_copy(update={"series_instance_uid": "1.2.3.4.5", "instance_count": 7})
    v2 = draft.model_copy(update={"draft_id": draft.draft_id + "-v2",
                                  "study": draft.study.model_copy(update={"version": 2, "series": (*draft.study.series, late)})})
    with session_scope(engine) as s:
        rid2 = publish_draft(s, store_draft(s, v2))
        assert rid2 != rid
        study = s.exec(select(FhirResource).where(FhirResource.resource_type == "ImagingStudy")).one()
        patient = s.exec(select(FhirResource).where(FhirResource.resource_type == "Patient")).one()
        device = s.exec(select(FhirResource).where(FhirResource.resource_type == "Device")).one()
        assert (study.version_id, patient.version_id, device.version_id) == (2, 1, 1)
        assert json.loads(study.json_text)["numberOfInstances"] == 10
        actions = s.exec(select(AuditRecord.action)).all()
        assert actions.count("fhir.publish") == 2
        assert verify(s).ok


def test_store_puts_labels_back_on_every_version(engine: Engine) -> None:
    draft = draft_variant(draft_from_dicom(CT_3SLICE), 3)
    with session_scope(engine) as s:
        rid = publish_draft(s, store_draft(s, draft))
        row = s.get(FhirResource, ("DiagnosticReport", rid))
        assert row is not None
        data = json.loads(row.json_text)
        data["meta"] = {"security": [], "tag": []}
        data["status"] = "registered"
        version, changed = put_resource(s, data)
        assert (version, changed) == (2, True)
        stored = json.loads(s.get(FhirResourceVersion, ("DiagnosticReport", rid, 2)).json_text)  # type: ignore[union-attr]
        assert has_labels(stored["meta"]) and stored["meta"]["versionId"] == "2"


def test_concurrent_publishers_of_one_patient_do_not_collide(engine: Engine) -> None:
    import threading

    base = draft_from_dicom(CT_3SLICE)
    drafts = [draft_variant(base, n, patients=1) for n in range(1, 9)]
    errors: list[BaseException] = []
    with session_scope(engine) as s:
        for d in drafts:
            store_draft(s, d)

    def publish(d: object) -> None:
        try:
            with session_scope(engine) as s:
                publish_draft(s, d)  # type: ignore[arg-type]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=publish, args=(d,)) for d in drafts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with session_scope(engine) as s:
        types = s.exec(select(FhirResource.resource_type)).all()
        assert types.count("DiagnosticReport") == 8 and types.count("Patient") == 1
        assert verify(s).ok
