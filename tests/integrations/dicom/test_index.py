"""The study index on its own: patients without an ID, versions, duplicates."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import select

from integrations.dicom.headers import InstanceHeaders
from integrations.dicom.index import Patient, Study, StudyState, find_instance, index_instance, set_state
from integrations.dicom.storage import StoredFile
from taqrir.db import session_scope


def _h(study: str, sop: str, patient_id: str = "") -> InstanceHeaders:
    return InstanceHeaders(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop, study_instance_uid=study,
                           series_instance_uid=study + ".1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                           patient_id=patient_id, modality="CT")


def _index(engine: Engine, h: InstanceHeaders, sha: str) -> None:
    with session_scope(engine) as s:
        index_instance(s, headers=h, stored=StoredFile(key=f"{h.sop_instance_uid}.{sha}", size=1, sha256=sha),
                       calling_ae="T", existing=find_instance(s, h.sop_instance_uid))


def test_studies_without_patient_id_do_not_share_a_patient(engine: Engine) -> None:
    _index(engine, _h("1.2.3", "1.2.3.1.1"), "a" * 64)
    _index(engine, _h("1.2.4", "1.2.4.1.1"), "b" * 64)
    _index(engine, _h("1.2.5", "1.2.5.1.1", patient_id="MRN1"), "c" * 64)
    _index(engine, _h("1.2.6", "1.2.6.1.1", patient_id="MRN1"), "d" * 64)
    with session_scope(engine) as s:
        patients = s.exec(select(Patient)).all()
        studies = s.exec(select(Study)).all()
    assert len(patients) == 3
    assert len({st.patient_pk for st in studies}) == 3


def test_late_instance_after_drafting_starts_a_new_version(engine: Engine) -> None:
    _index(engine, _h("1.2.3", "1.2.3.1.1", "P"), "a" * 64)
    with session_scope(engine) as s:
        st = s.exec(select(Study)).one()
        assert set_state(s, study_pk=st.id or 0, version=1, new_state=StudyState.drafted)
    _index(engine, _h("1.2.3", "1.2.3.1.1", "P"), "a" * 64)  # duplicate: no change
    with session_scope(engine) as s:
        st = s.exec(select(Study)).one()
        assert (st.state, st.version) == ("drafted", 1)
    _index(engine, _h("1.2.3", "1.2.3.1.2", "P"), "b" * 64)
    with session_scope(engine) as s:
        st = s.exec(select(Study)).one()
        assert (st.state, st.version) == ("receiving", 2)
        assert not set_state(s, study_pk=st.id or 0, version=1, new_state=StudyState.drafted)  # stale version
