"""Search and paging with a real FHIR client (fhirclient) against a real uvicorn server."""

from __future__ import annotations

from typing import Any

import httpx
from fhirclient import client
from fhirclient.models.bundle import Bundle
from fhirclient.models.diagnosticreport import DiagnosticReport
from fhirclient.models.imagingstudy import ImagingStudy
from fhirclient.models.provenance import Provenance
from sqlmodel import select

from audit.chain import AuditRecord
from ground.db import session_scope
from reporting.fhir.ids import patient_id
from tests.integrations.fhir.conftest import Server


def fhir_client(server: Server) -> client.FHIRClient:
    smart = client.FHIRClient(settings={"app_id": "taqrir-tests", "api_base": server.base + "/"})
    smart.server.session.headers.update(server.headers())
    return smart


def test_fhirclient_pages_through_a_patients_reports(fhir_server: Server) -> None:
    smart = fhir_client(fhir_server)
    base = fhir_server.drafts[0]
    pid = patient_id(base.study.patient.model_copy(update={"patient_id": f"{base.study.patient.patient_id}-1"}))
    search = DiagnosticReport.where(struct={"patient": pid, "_count": "2", "_sort": "-date"})
    pages = list(search.perform_iter(smart.server))
    reports = [e.resource for p in pages for e in p.entry or []]
    assert len(pages) == 3 and len(reports) == 6
    assert pages[0].total == 6
    assert all(isinstance(r, DiagnosticReport) and r.status == "partial" for r in reports)
    dates = [r.effectiveDateTime.datetime for r in reports]
    assert dates == sorted(dates, reverse=True)
    assert {r.subject.reference for r in reports} == {f"Patient/{pid}"}
    assert [link.relation for link in pages[1].link] == ["self", "next", "previous"]
    # read back through the client
    one = DiagnosticReport.read(reports[0].id, smart.server)
    assert one.id == reports[0].id and one.meta.versionId == "1"


def test_identifier_date_token_and_include_searches(fhir_server: Server) -> None:
    smart = fhir_client(fhir_server)
    d0 = fhir_server.drafts[0]
    uid = d0.study.study_instance_uid
    found = DiagnosticReport.where(struct={"identifier": f"urn:dicom:uid|urn:oid:{uid}"}).perform_resources(smart.server)
    assert [r.id for r in found] == [fhir_server.report_ids[0]]
    acc = fhir_server.drafts[5].study.accession_number
    assert [r.id for r in DiagnosticReport.where(struct={"identifier": acc}).perform_resources(smart.server)] == [fhir_server.report_ids[5]]
    studies = ImagingStudy.where(struct={"identifier": f"urn:dicom:uid|urn:oid:{uid}"}).perform_resources(smart.server)
    assert len(studies) == 1 and studies[0].numberOfInstances == 3
    provs = Provenance.where(struct={"target": f"DiagnosticReport/{fhir_server.report_ids[0]}"}).perform_resources(smart.server)
    assert len(provs) == 1 and provs[0].agent[0].who.reference.startswith("Device/")

    with fhir_server.client() as c:
        def total(**params: Any) -> int:
            r = c.get("/DiagnosticReport", params={**params, "_summary": "count"})
            assert r.status_code == 200, r.text
            return int(r.json()["total"])

        n = len(fhir_server.drafts)
        assert total() == n
        # variants 1..24 start 2003-04-17 minus n days; the three other studies are from 2004 or have no date
        assert total(date="eq2003-04-17") == 1
        assert total(date="ge2003-04-10") == 8 + 2
        assert total(date="lt2003-04-10") == n - 10 - 1
        assert total(date="gt2003-04") == 2
        assert total(date=["ge2003-04-01", "le2003-04-16"]) == 16
        assert total(issued="ge2026-11-01T08:30:00Z") == n
        assert total(issued="gt2026-11-01T08:35:00+00:00") == 19
        assert total(status="partial") == n and total(status="final,cancelled") == 0
        assert total(category="http://terminology.hl7.org/CodeSystem/v2-0074|RAD") == n
        assert total(code="http://loinc.org|18748-4") == n and total(code="http://loinc.org|11111-1") == 0
        assert total(_lastUpdated="ge2020-01-01") == n
        assert total(subject=f"Patient/{patient_id(d0.study.patient)}") == 1

        r = c.get("/DiagnosticReport", params={"_id": fhir_server.report_ids[0], "_include": ["DiagnosticReport:subject",
                  "DiagnosticReport:imaging-study"], "_revinclude": "Provenance:target"})
        bundle = Bundle(r.json())
        modes = sorted((e.resource.resource_type, e.search.mode) for e in bundle.entry)
        assert modes == [("DiagnosticReport", "match"), ("ImagingStudy", "include"), ("Patient", "include"),
                         ("Provenance", "include")]
        assert bundle.total == 1


def test_searches_and_reads_are_audited_with_the_caller(fhir_server: Server) -> None:
    with fhir_server.client(user="dr.audit") as c:
        assert c.get(f"/DiagnosticReport/{fhir_server.report_ids[1]}").status_code == 200
        assert c.get("/DiagnosticReport", params={"status": "partial", "_count": "3"}).status_code == 200
    with session_scope(fhir_server.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.actor == "dr.audit").order_by(AuditRecord.seq)).all()
    assert [r.action for r in rows] == ["fhir.read", "fhir.search"]
    assert rows[0].entity_id == fhir_server.report_ids[1]
    assert "DiagnosticReport/" in rows[1].details


def test_bad_requests_are_operation_outcomes(fhir_server: Server) -> None:
    with fhir_server.client() as c:
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("/DiagnosticReport", {"bogus": "1"}, 400),
            ("/DiagnosticReport", {"date": "yesterday"}, 400),
            ("/DiagnosticReport", {"date": "ge2024-01-01T25:00Z"}, 400),  # (no offset: server zone, item 19)
            ("/DiagnosticReport", {"date": "xx2024"}, 400),
            ("/DiagnosticReport", {"_count": "-1"}, 400),
            ("/DiagnosticReport", {"_count": "abc"}, 400),
            ("/DiagnosticReport", {"_sort": "conclusion"}, 400),
            ("/DiagnosticReport", {"status": "done"}, 400),
            ("/DiagnosticReport", {"_include": "Observation:subject"}, 400),
            ("/DiagnosticReport", {"patient": "Group/1"}, 400),
            ("/DiagnosticReport", {"_summary": "text"}, 400),
            ("/DiagnosticReport/dr-unknown", {}, 404),
            ("/DiagnosticReport/bad id!", {}, 400),
            (f"/DiagnosticReport/{fhir_server.report_ids[0]}/_history/9", {}, 404),
            ("/Observation/1", {}, 404),
            ("/Observation", {}, 404),
        ]
        for path, params, status in cases:
            r = c.get(path, params=params)
            assert r.status_code == status, (path, params, r.status_code, r.text)
            body = r.json()
            assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error", body
        r = httpx.delete(f"{fhir_server.base}/DiagnosticReport/{fhir_server.report_ids[0]}", headers=fhir_server.headers())
        assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"


def test_nothing_is_served_unaudited(fhir_server: Server) -> None:
    from sqlalchemy import text

    with fhir_server.engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    try:
        with fhir_server.client() as c:
            r = c.get(f"/DiagnosticReport/{fhir_server.report_ids[0]}")
            assert r.status_code == 503 and r.json()["resourceType"] == "OperationOutcome"
            assert "DiagnosticReport" not in r.text.replace("OperationOutcome", "")
    finally:
        with fhir_server.engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
