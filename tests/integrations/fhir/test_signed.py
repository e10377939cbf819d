"""Signed reports from a RIS over FHIR: POST/PUT DiagnosticReport final|amended|corrected, stored
beside the drafts (SQLite and PostgreSQL, through a real uvicorn server)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.operationoutcome import OperationOutcome
from sqlmodel import select

from audit.chain import AuditRecord, verify
from audit.deltas import ReportDelta
from audit.signed_report import SignedReport
from ground.db import session_scope
from integrations.dicom.index import Study
from reporting.draft_record import DraftRecord
from reporting.fhir.ids import study_id
from tests.factories.signed import ARRIVAL
from tests.integrations.fhir.conftest import REVIEWER_SCOPES, Server

RIS = ["system/DiagnosticReport.cu"]
EN = "FINDINGS: The lungs are clear. Small left pleural effusion.\nIMPRESSION: Small left pleural effusion."
AR = "النتائج: الرئتان سليمتان. انصباب جنبي أيسر صغير.\nالانطباع: انصباب جنبي أيسر صغير."


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def report(accession: str | None, *, status: str = "final", study_uid: str | None = None,
           imaging_study: str | None = None, texts: bool = True, **extra: Any) -> dict[str, Any]:
    ids: list[dict[str, Any]] = [{"system": "urn:ris:report", "value": "R-1"}]
    if accession:
        ids.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "system": "urn:hosp:acc", "value": accession})
    if study_uid:
        ids.append({"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"})
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": status, "identifier": ids,
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "issued": "2026-12-01T09:00:00+03:00",
        "resultsInterpreter": [{"display": "Dr Amal Radiologist", "identifier": {"value": "D1234"}}],
    }
    if imaging_study:
        body["imagingStudy"] = [{"reference": imaging_study}]
    if texts:
        body["conclusion"] = "Small left pleural effusion."
        body["presentedForm"] = [{"contentType": "text/plain; charset=utf-8", "language": "en", "data": _b64(EN)},
                                 {"contentType": "text/plain", "language": "ar", "data": _b64(AR)}]
    body.update(extra)
    return body


@pytest.fixture
def drafted(fhir_server: Server) -> Server:
    """The first published draft's study, indexed with that draft (as the pipeline leaves it)."""
    d = fhir_server.drafts[0]
    with session_scope(fhir_server.engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == d.draft_id)).one()
        study = s.get(Study, rec.study_pk)
        assert study is not None
        study.accession_number = study.accession_number or "ACC-CT3"
        study.first_received_at = study.last_received_at = ARRIVAL
        rec.created_at = ARRIVAL + timedelta(minutes=2)
        rec.fhir_report_id = fhir_server.report_ids[0]  # as the publish stage records it
        s.add_all([study, rec])
    return fhir_server


def _oo(r: httpx.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status, r.text
    oo = OperationOutcome.model_validate(r.json())
    assert oo.issue[0].code == code and words in (oo.issue[0].diagnostics or ""), r.text


def test_post_stores_beside_the_draft_with_deltas(drafted: Server) -> None:
    d, rid = drafted.drafts[0], drafted.report_ids[0]
    acc = d.study.accession_number or "ACC-CT3"
    with httpx.Client(base_url=drafted.base, headers=drafted.headers(RIS, user="ris"), timeout=30) as c:
        before = c.get(f"/DiagnosticReport/{rid}", headers=drafted.headers()).json()
        r = c.post("/DiagnosticReport", json=report(acc), headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        stored = DiagnosticReport.model_validate(r.json())
        assert stored.id and stored.id.startswith("signed-") and r.headers["Location"].startswith(drafted.base)
        again = c.post("/DiagnosticReport", json=report(acc))
        assert again.status_code == 200 and again.json()["id"] == stored.id  # stored once
        after = c.get(f"/DiagnosticReport/{rid}", headers=drafted.headers()).json()
    assert after == before and after["status"] == "partial"  # never over the draft
    with session_scope(drafted.engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.language)).all()
        assert [(r.language, r.status, r.source) for r in rows] == [("ar", "final", "fhir"), ("en", "final", "fhir")]
        assert rows[1].impression == "Small left pleural effusion." and rows[1].text == EN
        assert rows[0].text == AR and rows[0].signer_name == "Dr Amal Radiologist" and rows[0].signer_id == "D1234"
        assert rows[0].study_instance_uid == d.study.study_instance_uid
        deltas = s.exec(select(ReportDelta)).all()
        assert {(x.language, x.draft_id) for x in deltas} == {("ar", d.draft_id), ("en", d.draft_id)}
        rec = s.exec(select(AuditRecord).where(AuditRecord.action == "signed.received")).one()
        assert rec.actor == "ris" and "Small" not in rec.details  # identifiers only
        assert verify(s).ok


def test_put_to_the_drafts_id_is_stored_beside_it_and_amendments_supersede(drafted: Server) -> None:
    rid = drafted.report_ids[0]
    h = drafted.headers(RIS, user="ris")
    url = f"{drafted.base}/DiagnosticReport/{rid}"
    body = report(None, texts=False, conclusion="No effusion.")
    r = httpx.put(url, json={**body, "id": rid}, headers=h)
    assert r.status_code == 201, r.text
    amended = httpx.put(url, json={**body, "status": "amended", "conclusion": "Tiny effusion."}, headers=h)
    assert amended.status_code == 200, amended.text
    same = httpx.put(url, json={**body, "status": "amended", "conclusion": "Tiny effusion."}, headers=h)
    assert same.status_code == 200 and same.headers["ETag"] == amended.headers["ETag"]
    draft_dr = httpx.get(url, headers=drafted.headers()).json()
    assert draft_dr["status"] == "partial" and draft_dr["meta"]["versionId"] == "1"
    with session_scope(drafted.engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.id)).all()
        assert [(r.status, r.current, r.text) for r in rows] == [("final", False, "No effusion."),
                                                                   ("amended", True, "Tiny effusion.")]
        assert {r.source_id for r in rows} == {rid}


def test_imaging_study_reference_and_the_review_outcome(drafted: Server) -> None:
    d, rid = drafted.drafts[0], drafted.report_ids[0]
    rv = httpx.post(f"{drafted.base}/DiagnosticReport/{rid}/$review",
                    headers={**drafted.headers(REVIEWER_SCOPES, user="dr.amal"), "If-Match": 'W/"1"'},
                    json={"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": "accept"}]})
    assert rv.status_code == 200, rv.text
    r = httpx.post(f"{drafted.base}/DiagnosticReport", headers=drafted.headers(RIS, user="ris"),
                   json=report(None, imaging_study=f"ImagingStudy/{study_id(d.study.study_instance_uid)}"))
    assert r.status_code == 201, r.text
    with session_scope(drafted.engine) as s:
        deltas = s.exec(select(ReportDelta)).all()
        assert deltas and all(x.review_outcome == "accepted" and x.reviewer == "dr.amal" for x in deltas)
        assert all(x.arrival_to_review_s is not None and x.arrival_to_signature_s is not None for x in deltas)


@pytest.mark.parametrize("action", ["accept", "reject"])
def test_a_review_after_the_signature_updates_the_deltas_at_once(drafted: Server, action: str) -> None:
    # the other order: the RIS signs first, the clinician reviews the draft afterwards; the deltas
    # carry the review as soon as it is answered, not at the next `taqrir deltas`
    d, rid = drafted.drafts[0], drafted.report_ids[0]
    r = httpx.post(f"{drafted.base}/DiagnosticReport", headers=drafted.headers(RIS, user="ris"),
                   json=report(None, imaging_study=f"ImagingStudy/{study_id(d.study.study_instance_uid)}"))
    assert r.status_code == 201, r.text
    with session_scope(drafted.engine) as s:
        assert {x.review_outcome for x in s.exec(select(ReportDelta)).all()} == {"none"}
    rv = httpx.post(f"{drafted.base}/DiagnosticReport/{rid}/$review",
                    headers={**drafted.headers(REVIEWER_SCOPES, user="dr.amal"), "If-Match": 'W/"1"'},
                    json={"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": action}]})
    assert rv.status_code == 200, rv.text
    with session_scope(drafted.engine) as s:
        mine = [x for x in s.exec(select(ReportDelta)).all() if x.draft_id == d.draft_id]
        outcome = {"accept": "accepted", "reject": "rejected"}[action]
        assert mine and all(x.review_outcome == outcome and x.reviewer == "dr.amal" for x in mine)
        assert all(x.arrival_to_review_s is not None for x in mine)


@pytest.mark.parametrize(("body", "status", "code", "words"), [
    (report("ACC-CT3", status="preliminary"), 422, "business-rule", "not a signed report"),
    (report("NOPE"), 422, "not-found", "accession number 'NOPE'"),
    (report(None), 422, "business-rule", "names no study"),
    (report("ACC-CT3", texts=False), 422, "business-rule", "has no text"),
    (report("ACC-CT3", imaging_study="ImagingStudy/is-nope"), 422, "not-found", "not an ImagingStudy"),
    ({"resourceType": "Patient"}, 400, "invalid", "resourceType must be DiagnosticReport"),
    ({**report("ACC-CT3"), "issued": "yesterday"}, 400, "invalid", "not a valid R4 DiagnosticReport"),
    ({k: v for k, v in report("ACC-CT3").items() if k != "code"}, 400, "invalid", "code"),
    ({**report("ACC-CT3"), "status": "cancelled"}, 422, "business-rule", "not a signed report"),
    ({**report("ACC-CT3"), "presentedForm": [{"contentType": "text/plain", "data": "%%%"}]}, 400, "invalid",
     "base64"),
    (report("ACC-CT3", study_uid="1.2.3.999"), 422, "not-found", "Study Instance UID 1.2.3.999"),
])
def test_bad_input_gets_an_operation_outcome_and_stores_nothing(
        drafted: Server, body: dict[str, Any], status: int, code: str, words: str) -> None:
    d = drafted.drafts[0]
    text = json.dumps(body).replace("ACC-CT3", d.study.accession_number or "ACC-CT3")
    r = httpx.post(f"{drafted.base}/DiagnosticReport", content=text,
                   headers={**drafted.headers(RIS, user="ris"), "Content-Type": "application/fhir+json"})
    _oo(r, status, code, words)
    with session_scope(drafted.engine) as s:
        assert not s.exec(select(SignedReport)).all()
        refused = s.exec(select(AuditRecord).where(AuditRecord.action == "fhir.signed.refused")).one()
        assert refused.outcome == "failure" and refused.actor == "ris"


def test_scopes_and_unparseable_bodies(drafted: Server) -> None:
    url = f"{drafted.base}/DiagnosticReport"
    body = report(drafted.drafts[0].study.accession_number)
    _oo(httpx.post(url, json=body), 401, "login", "Authorization")
    _oo(httpx.post(url, json=body, headers=drafted.headers()), 403, "forbidden", "'c'")
    _oo(httpx.put(f"{url}/x1", json=body, headers=drafted.headers(["system/DiagnosticReport.c"])), 403,
        "forbidden", "'u'")
    _oo(httpx.post(url, json=body, headers=drafted.headers(["patient/DiagnosticReport.cu"], patient="p1")), 403,
        "forbidden", "not a patient/ scope")
    _oo(httpx.post(url, content=b"{not json", headers={**drafted.headers(RIS), "Content-Type": "application/json"}),
        400, "invalid", "invalid request")
    _oo(httpx.put(f"{url}/abc", json={**body, "id": "other"}, headers=drafted.headers(RIS)), 400, "invalid",
        "differs")
    with session_scope(drafted.engine) as s:
        assert not s.exec(select(SignedReport)).all()
