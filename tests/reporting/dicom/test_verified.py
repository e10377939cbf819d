"""The verified revision: clinician text, VERIFIED, the reviewer as the only verifying observer."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from reporting.dicom import (
    DicomObjectError,
    Equipment,
    SourceAttributes,
    Verification,
    build_draft_sr,
    build_verified_sr,
)
from reporting.draft import Sections
from reporting.labels import DISCLAIMER
from tests.factories.drafts import SECTIONS, sample_draft
from tests.reporting.dicom.checks import dciodvfy_errors, write_and_read

EQUIPMENT = Equipment(software_version="0.1.0")
AT = datetime(2026, 11, 2, 9, 15, tzinfo=UTC)


def _verification(action: str = "edit", **kw: object) -> Verification:
    sections = {"en": Sections(findings="Small left pleural effusion.", impression="Effusion, 2 cm."),
                "ar": SECTIONS["ar"]}
    base: dict[str, object] = {"action": action, "reviewer_name": "Layla Haddad", "reviewer_id": "lhaddad",
                               "organization": "Research Hospital", "verified_at": AT, "sections": sections,
                               "revision": "2"}
    base.update(kw)
    return Verification.model_validate(base)


def test_verified_sr(tmp_path: Path) -> None:
    draft = sample_draft()
    source = SourceAttributes.from_study_ref(draft.study)
    ds = write_and_read(build_verified_sr(draft, source, EQUIPMENT, _verification()), tmp_path / "v.dcm")
    assert dciodvfy_errors(tmp_path / "v.dcm") == []
    assert ds.VerificationFlag == "VERIFIED" and ds.CompletionFlag == "COMPLETE"
    (observer,) = ds.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "Haddad^Layla"
    assert observer.VerifyingOrganization == "Research Hospital"
    assert observer.VerificationDateTime.startswith("20261102091500")
    draft_sr = build_draft_sr(draft, source, EQUIPMENT)
    pred = ds.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == draft.study.study_instance_uid
    assert pred.ReferencedSeriesSequence[0].SeriesInstanceUID == draft_sr.SeriesInstanceUID
    assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == draft_sr.SOPInstanceUID
    assert ds.SOPInstanceUID != draft_sr.SOPInstanceUID
    assert "research only" in ds.SeriesDescription.lower()
    texts = [str(i.TextValue).strip("\u2067\u2069") for i in ds.ContentSequence if i.ValueType == "TEXT"]
    assert DISCLAIMER["en"] in texts and DISCLAIMER["ar"] in texts
    assert any(t.startswith("Verified by Layla Haddad (Research Hospital), edited") for t in texts)
    findings = next(i for i in ds.ContentSequence if i.ValueType == "CONTAINER")
    assert [str(i.TextValue) for i in findings.ContentSequence if i.ValueType == "TEXT"] == [
        "Small left pleural effusion."]
    # the machine is an observer of the content, never the verifying observer
    assert len(ds.VerifyingObserverSequence) == 1
    assert draft.model.model_name not in str(observer.VerifyingObserverName)


def test_each_revision_is_its_own_instance() -> None:
    draft = sample_draft()
    source = SourceAttributes.from_study_ref(draft.study)
    a = build_verified_sr(draft, source, EQUIPMENT, _verification(revision="2"))
    b = build_verified_sr(draft, source, EQUIPMENT, _verification(revision="2"))
    c = build_verified_sr(draft, source, EQUIPMENT, _verification(revision="3"))
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID


def test_rejection_makes_no_verified_sr() -> None:
    draft = sample_draft()
    with pytest.raises(DicomObjectError, match="rejection makes no verified SR"):
        build_verified_sr(draft, SourceAttributes.from_study_ref(draft.study), EQUIPMENT, _verification("reject"))


def test_verifier_needs_a_name_and_organisation() -> None:
    with pytest.raises(ValueError):
        _verification(organization="")
    with pytest.raises(ValueError):
        _verification(reviewer_name="")


def test_person_names() -> None:
    from reporting.dicom.verified import person_name

    assert person_name("Dr Amal Haddad") == "Haddad^Amal^^Dr"
    assert person_name("Layla Haddad") == "Haddad^Layla"
    assert person_name("Haddad^Layla") == "Haddad^Layla"
    assert person_name("dr.omar") == "dr.omar^"
