"""The pure FHIR builders, on drafts made from real DICOM headers, checked by the R4B models and
by the independent R4 JSON schema validator."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reporting.draft import Draft, Sections
from reporting.fhir import Review, build_resources, build_review_provenance, build_reviewed_report
from reporting.fhir.diagnostic_report import TRANSLATION_URL
from reporting.fhir.ids import patient_id, report_id
from reporting.labels import (
    AI_ASSERTED,
    DISCLAIMER,
    RESEARCH_ONLY_TAG,
    RESEARCH_PURPOSE,
    has_labels,
)
from tests.factories.drafts import (
    ARABIC_NAME,
    CT_3SLICE,
    CT_SMALL,
    MAMMO,
    MR_SMALL,
    SECTIONS,
    draft_from_dicom,
)
from tests.fhir_validator.validator import assert_valid_r4


def _json(resource: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(resource.model_dump_json())
    return out


CORPUS = {"ct3": CT_3SLICE, "ct": [CT_SMALL], "arabic-name": [ARABIC_NAME], "mr": [MR_SMALL], "mg": [MAMMO]}


@pytest.fixture(params=sorted(CORPUS))
def draft(request: pytest.FixtureRequest) -> Draft:
    return draft_from_dicom(CORPUS[request.param])


def test_every_resource_is_valid_r4_and_labelled(draft: Draft) -> None:
    res = build_resources(draft)
    items = [_json(r) for r in (res.patient, res.imaging_study, res.device, res.report, res.provenance)]
    assert_valid_r4(*items)
    for item in items:
        assert has_labels(item["meta"]), item["resourceType"]


def test_report_is_partial_bilingual_and_says_research(draft: Draft) -> None:
    dr = _json(build_resources(draft).report)
    assert dr["status"] == "partial"
    assert dr["id"] == report_id(draft)
    assert dr["code"]["coding"][0] == {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
    cats = {(c["system"], c["code"]) for c in dr["category"][0]["coding"]}
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD") in cats
    assert ("http://loinc.org", "LP29684-5") in cats
    assert dr["subject"]["reference"] == f"Patient/{patient_id(draft.study.patient)}"
    assert dr["conclusion"] == SECTIONS["en"].impression
    (ext,) = dr["_conclusion"]["extension"]
    assert ext["url"] == TRANSLATION_URL
    assert {e["url"]: e.get("valueCode", e.get("valueString")) for e in ext["extension"]} == {
        "lang": "ar", "content": SECTIONS["ar"].impression}
    for lang in ("en", "ar"):
        assert DISCLAIMER[lang] in dr["text"]["div"]
    sec = {(c["system"], c["code"]) for c in dr["meta"]["security"]}
    assert (AI_ASSERTED["system"], "AIAST") in sec and (RESEARCH_PURPOSE["system"], "HRESCH") in sec
    assert {(t["system"], t["code"]) for t in dr["meta"]["tag"]} == {(RESEARCH_ONLY_TAG["system"], "research-only")}
    idents = {i["system"]: i["value"] for i in dr["identifier"]}
    assert idents["urn:dicom:uid"] == f"urn:oid:{draft.study.study_instance_uid}"
    assert idents["urn:taqrir:study-version"].endswith(f"#{draft.study.version}")
    if draft.study.accession_number:
        assert any(i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN" and
                   i["value"] == draft.study.accession_number for i in dr["identifier"])
    assert dr["issued"] == "2026-11-01T08:30:00Z"


def test_presented_forms_per_language_with_hash_size_and_rtl(draft: Draft) -> None:
    forms = _json(build_resources(draft).report)["presentedForm"]
    assert [(f["language"], f["contentType"].split(";")[0]) for f in forms] == [
        ("en", "text/html"), ("en", "text/plain"), ("ar", "text/html"), ("ar", "text/plain")]
    for f in forms:
        data = base64.b64decode(f["data"])
        assert f["size"] == len(data)
        assert f["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
        text = data.decode("utf-8")
        assert DISCLAIMER[f["language"]] in text.replace("&#x27;", "'")
        assert f["title"]
    ar_html = base64.b64decode(forms[2]["data"]).decode()
    assert '<html lang="ar" dir="rtl">' in ar_html
    assert SECTIONS["ar"].impression in ar_html
    assert '<html lang="en" dir="ltr">' in base64.b64decode(forms[0]["data"]).decode()


def test_patient_and_study_come_from_the_headers() -> None:
    draft = draft_from_dicom(CT_3SLICE)
    res = build_resources(draft, study_timezone=ZoneInfo("Asia/Riyadh"))
    pat, study = _json(res.patient), _json(res.imaging_study)
    assert pat["identifier"][0]["value"] == "99000" and pat["gender"] == "male"
    assert pat["name"][0]["family"] == "JANCT000"
    assert study["identifier"][0] == {"use": "official", "system": "urn:dicom:uid",
                                      "value": f"urn:oid:{draft.study.study_instance_uid}"}
    assert study["started"] == "2003-04-17T10:46:07+03:00"
    assert study["numberOfSeries"] == 1 and study["numberOfInstances"] == 3
    assert study["series"][0]["uid"] == draft.study.series[0].series_instance_uid
    assert study["series"][0]["modality"]["code"] == "CT"
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert _json(res.report)["effectiveDateTime"] == "2003-04-17T10:46:07+03:00"
    arabic = _json(build_resources(draft_from_dicom([ARABIC_NAME])).patient)
    assert arabic["name"][0]["family"] == "قباني"


def test_device_and_provenance_name_the_model_images_and_prompt() -> None:
    draft = draft_from_dicom(CT_3SLICE)
    res = build_resources(draft)
    dev, prov, dr = _json(res.device), _json(res.provenance), _json(res.report)
    assert dev["deviceName"][0] == {"name": "BiMediX2-8B", "type": "model-name"}
    assert dev["version"][0]["value"] == draft.model.model_revision
    assert dev["identifier"][0]["value"] == draft.model.model_revision
    assert dev["manufacturer"] == "MBZUAI"
    assert prov["target"] == [{"reference": f"DiagnosticReport/{dr['id']}/_history/1"}]
    assert prov["recorded"] == dr["issued"]
    assert prov["agent"][0]["who"]["reference"] == f"Device/{dev['id']}"
    assert prov["reason"][0]["coding"][0]["code"] == "AIAST"
    derived = [e["what"]["identifier"]["value"] for e in prov["entity"] if e["role"] == "derivation"]
    sops = [f"urn:oid:{u}" for k in draft.key_images for u in k.sop_instance_uids]
    assert derived == [*sops, draft.model.prompt_template_id]


def test_builders_are_deterministic() -> None:
    a, b = build_resources(sample := draft_from_dicom([CT_SMALL])), build_resources(sample)
    assert a.report.model_dump_json() == b.report.model_dump_json()
    assert a.provenance.model_dump_json() == b.provenance.model_dump_json()


def test_reviewed_versions_keep_labels_and_name_the_reviewer() -> None:
    draft = draft_from_dicom(CT_3SLICE)
    at = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    edited = Sections(findings=SECTIONS["en"].findings, impression="Small left pleural effusion.")
    for action, status in (("accept", "final"), ("edit", "final"), ("reject", "cancelled")):
        review = Review(action=action, reviewer_id="dr.amal", reviewer_display="Dr Amal", reviewed_at=at,  # type: ignore[arg-type]
                        edits={"en": edited} if action == "edit" else {})
        dr = _json(build_reviewed_report(draft, review))
        prov = _json(build_review_provenance(draft, review, previous_version=1, new_version=2))
        assert_valid_r4(dr, prov)
        assert dr["status"] == status and has_labels(dr["meta"]) and has_labels(prov["meta"])
        assert dr["resultsInterpreter"][0]["display"] == "Dr Amal"
        assert prov["entity"][0] == {"role": "revision", "what": {"reference": f"DiagnosticReport/{dr['id']}/_history/1"}}
        if action == "edit":
            assert dr["conclusion"] == "Small left pleural effusion."
            assert "en.impression" in prov["activity"]["text"]


def test_the_independent_validator_rejects_broken_resources() -> None:
    from tests.fhir_validator.validator import validate_r4

    dr = _json(build_resources(draft_from_dicom([CT_SMALL])).report)
    broken = [
        {**dr, "status": "done"},  # not in the required value set
        {**dr, "issued": "2026-11-01T08:30"},  # instant without offset
        {**dr, "conclusionArabic": "x"},  # unknown element
        {k: v for k, v in dr.items() if k != "code"},  # missing required element
    ]
    assert all(errors for errors in validate_r4(broken))
    assert validate_r4([dr]) == [[]]
