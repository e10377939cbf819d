"""store_signed_report: matching, beside-not-over, idempotency, supersession, audit, deltas
(SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from audit.deltas import ReportDelta, compute_study_deltas
from audit.signed import (
    AmbiguousStudy,
    NoMatchingStudy,
    SignedReportIn,
    SignedText,
    current_signed,
    store_signed_report,
)
from audit.signed_report import SignedReport
from ground.db import session_scope
from reporting.draft_record import DraftRecord
from tests.factories.signed import add_draft, add_study, seed

UID = "1.2.826.0.1.3680043.8.498.1001"
EN = SignedText(language="en", findings="The lungs are clear. Small left pleural effusion.",
                impression="Small left pleural effusion.")
AR = SignedText(language="ar", text="الرئتان سليمتان. انصباب جنبي أيسر صغير.")


def signed(**kw: object) -> SignedReportIn:
    base: dict[str, object] = {"source": "hl7", "source_id": "MSG1", "accession_number": "ACC1001",
                               "status": "final", "texts": (EN, AR), "signer_name": "Dr Test"}
    base.update(kw)
    return SignedReportIn.model_validate(base)


def test_stored_beside_the_draft_with_deltas_and_audit(engine: Engine) -> None:
    _, draft_id = seed(engine)
    with session_scope(engine) as s:
        before = s.exec(select(DraftRecord)).one().draft_json
        res = store_signed_report(s, signed())
    assert not res.duplicate and len(res.signed_ids) == 2 and res.deltas == 2
    with session_scope(engine) as s:
        assert s.exec(select(DraftRecord)).one().draft_json == before  # never over the draft
        rows = s.exec(select(SignedReport).order_by(SignedReport.language)).all()
        assert [(r.language, r.status, r.current) for r in rows] == [("ar", "final", True), ("en", "final", True)]
        assert rows[1].text.startswith("The lungs are clear.") and "effusion." in rows[1].text
        deltas = s.exec(select(ReportDelta).order_by(ReportDelta.language)).all()
        assert [d.language for d in deltas] == ["ar", "en"]
        assert all(d.draft_id == draft_id and 0 < d.char_edit_distance < 1 for d in deltas)
        assert all(d.review_outcome == "none" and d.arrival_to_draft_s == 120.0 for d in deltas)
        assert deltas[0].rouge_l > 0  # Arabic counted
        assert s.exec(select(AuditRecord).where(AuditRecord.action == "signed.received")).one()
        assert verify(s).ok


def test_same_source_id_twice_is_stored_once(engine: Engine) -> None:
    seed(engine)
    with session_scope(engine) as s:
        first = store_signed_report(s, signed())
    with session_scope(engine) as s:
        again = store_signed_report(s, signed())
    assert again.duplicate and again.signed_ids == first.signed_ids
    with session_scope(engine) as s:
        assert len(s.exec(select(SignedReport)).all()) == 2
        assert len(s.exec(select(ReportDelta)).all()) == 2


def test_a_correction_supersedes_and_keeps_the_first(engine: Engine) -> None:
    study_pk, _ = seed(engine)
    with session_scope(engine) as s:
        store_signed_report(s, signed(texts=(EN,)))
    with session_scope(engine) as s:
        store_signed_report(s, signed(source_id="MSG2", status="corrected",
                                      texts=(EN.model_copy(update={"impression": "No effusion."}),)))
    with session_scope(engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.id)).all()
        assert [(r.status, r.current) for r in rows] == [("final", False), ("corrected", True)]
        assert [r.status for r in current_signed(s, study_pk, "en")] == ["corrected"]
        deltas = s.exec(select(ReportDelta).order_by(ReportDelta.signed_report_id)).all()
        assert [d.signed_current for d in deltas] == [False, True]


def test_matching_by_uid_accession_and_refusals(engine: Engine) -> None:
    seed(engine)
    with session_scope(engine) as s:
        add_study(s, study_uid="1.2.3.4.5", accession="DUP", patient_id="P2")
        add_study(s, study_uid="1.2.3.4.6", accession="DUP", patient_id="P3")
    with session_scope(engine) as s:
        res = store_signed_report(s, signed(accession_number=None, study_instance_uid=UID))
        assert res.study_instance_uid == UID
    with pytest.raises(NoMatchingStudy, match="accession number 'NOPE'"), session_scope(engine) as s:
        store_signed_report(s, signed(source_id="M3", accession_number="NOPE"))
    with pytest.raises(NoMatchingStudy, match=r"Study Instance UID 9\.9"), session_scope(engine) as s:
        store_signed_report(s, signed(source_id="M4", study_instance_uid="9.9"))
    with pytest.raises(AmbiguousStudy, match="more than one study"), session_scope(engine) as s:
        store_signed_report(s, signed(source_id="M5", accession_number="DUP"))
    with pytest.raises(AmbiguousStudy, match="keys disagree"), session_scope(engine) as s:
        store_signed_report(s, signed(source_id="M6", study_instance_uid=UID, accession_number="OTHER"))
    with session_scope(engine) as s:
        assert len(s.exec(select(SignedReport)).all()) == 2  # nothing half-stored by the refusals


def test_bad_shapes_are_refused_before_the_database() -> None:
    with pytest.raises(ValidationError, match="Study Instance UID or an Accession Number"):
        signed(accession_number=None)
    with pytest.raises(ValidationError, match="text is empty"):
        SignedText(language="en", findings="  ")
    with pytest.raises(ValidationError, match="one text per language"):
        signed(texts=(EN, EN))
    with pytest.raises(ValidationError):
        signed(status="cancelled")


def test_signed_before_draft_then_draft_arrives(engine: Engine) -> None:
    study_pk, _ = seed(engine, with_draft=False)
    with session_scope(engine) as s:
        assert store_signed_report(s, signed()).deltas == 0
    with session_scope(engine) as s:
        from integrations.dicom.index import Study

        add_draft(s, s.get(Study, study_pk))  # type: ignore[arg-type]
        assert compute_study_deltas(s, study_pk) == 2
    with session_scope(engine) as s:
        assert compute_study_deltas(s, study_pk) == 2  # idempotent
        assert len(s.exec(select(ReportDelta)).all()) == 2


def test_preliminary_is_stored_without_deltas(engine: Engine) -> None:
    seed(engine)
    with session_scope(engine) as s:
        res = store_signed_report(s, signed(status="preliminary"))
    assert res.deltas == 0 and len(res.signed_ids) == 2


@pytest.mark.parametrize(("action", "outcome"), [("accept", "accepted"), ("edit", "edited"), ("reject", "rejected")])
def test_a_late_review_is_picked_up_by_recompute_all(engine: Engine, action: str, outcome: str) -> None:
    from audit.chain import record
    from audit.deltas import recompute_all
    _, draft_id = seed(engine)
    with session_scope(engine) as s:
        store_signed_report(s, signed())
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == draft_id)).one()
        rec.fhir_report_id = "dr-x"  # what the publish stage records once the FHIR report exists
        s.add(rec)
        record(s, action=f"fhir.review.{action}", actor="dr.amal", entity_type="DiagnosticReport", entity_id="dr-x")
    assert recompute_all(engine) == (1, 2)
    with session_scope(engine) as s:
        assert {(d.review_outcome, d.reviewer) for d in s.exec(select(ReportDelta)).all()} == {(outcome, "dr.amal")}


def test_a_preliminary_never_supersedes_a_signed_report(engine: Engine) -> None:
    seed(engine)
    with session_scope(engine) as s:
        store_signed_report(s, signed(source_id="P1", status="preliminary", texts=(EN,)))
    with session_scope(engine) as s:
        store_signed_report(s, signed(source_id="F1", texts=(EN,)))
    with session_scope(engine) as s:
        store_signed_report(s, signed(source_id="P2", status="preliminary", texts=(EN,)))
    with session_scope(engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.id)).all()
        assert [(r.source_id, r.current) for r in rows] == [("P1", False), ("F1", True), ("P2", False)]
