"""$review: accept/edit/reject as new versions, conflicts 409, stale If-Match 412."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from reporting.labels import has_labels
from tests.fhir_validator.validator import assert_valid_r4
from tests.integrations.fhir.conftest import REVIEWER_SCOPES, Server


def _params(action: str, **text: str) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": action}] + [
        {"name": k.replace("_", "-"), "valueString": v} for k, v in text.items()]}


def test_edit_keeps_the_machine_version_and_records_who(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[0]
    h = fhir_server.headers(REVIEWER_SCOPES, user="dr.amal", name="Dr Amal Haddad")
    url = f"{fhir_server.base}/DiagnosticReport/{rid}"
    machine = httpx.get(url, headers=h).json()
    r = httpx.post(f"{url}/$review", headers={**h, "If-Match": 'W/"1"'},
                   json=_params("edit", impression_en="Small left pleural effusion.", impression_ar="انصباب جنبي أيسر صغير."))
    assert r.status_code == 200, r.text
    reviewed = r.json()
    assert r.headers["ETag"] == 'W/"2"' and r.headers["Location"].endswith("/_history/2")
    assert reviewed["status"] == "final" and reviewed["meta"]["versionId"] == "2"
    assert reviewed["conclusion"] == "Small left pleural effusion."
    assert reviewed["_conclusion"]["extension"][0]["extension"][1]["valueString"] == "انصباب جنبي أيسر صغير."
    assert reviewed["resultsInterpreter"][0] == {"identifier": {"system": "urn:taqrir:user", "value": "dr.amal"},
                                                 "display": "Dr Amal Haddad"}
    assert has_labels(reviewed["meta"])
    v1 = httpx.get(f"{url}/_history/1", headers=h).json()
    assert v1 == machine and v1["status"] == "partial"
    hist = httpx.get(f"{url}/_history", headers=h).json()
    assert hist["type"] == "history" and [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]
    provs = httpx.get(f"{fhir_server.base}/Provenance", params={"target": rid}, headers=h).json()
    kinds = sorted(e["resource"]["agent"][0]["type"]["coding"][0]["code"] for e in provs["entry"])
    assert kinds == ["author", "verifier"]
    assert_valid_r4(reviewed, v1, hist, provs)
    with session_scope(fhir_server.engine) as s:
        rec = s.exec(select(AuditRecord).where(AuditRecord.action == "fhir.review.edit")).one()
        assert rec.actor == "dr.amal" and rec.entity_id == rid
        details = json.loads(rec.details)
        assert sorted(details["changed"]) == ["ar.impression", "en.impression"]
        assert (details["from_version"], details["to_version"], details["new_status"]) == (1, 2, "final")
        assert verify(s).ok


def test_conflicts_and_preconditions(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[1]
    h = fhir_server.headers(REVIEWER_SCOPES, user="dr.omar")
    url = f"{fhir_server.base}/DiagnosticReport/{rid}/$review"

    def post(body: dict[str, Any], if_match: str | None) -> httpx.Response:
        headers = dict(h)
        if if_match is not None:
            headers["If-Match"] = if_match
        return httpx.post(url, headers=headers, json=body)

    for body, if_match, status in [
        (_params("accept"), None, 428),
        (_params("accept"), "garbage", 400),
        (_params("approve"), 'W/"1"', 400),
        (_params("edit"), 'W/"1"', 400),
        (_params("accept", impression_en="x"), 'W/"1"', 400),
        ({"resourceType": "Patient"}, 'W/"1"', 400),
        (_params("accept"), 'W/"7"', 412),
    ]:
        r = post(body, if_match)
        assert r.status_code == status, (body, if_match, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    r = post(_params("reject"), 'W/"1"')
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # a rejected report cannot be reviewed again: 409; a stale version still answers 412 first
    r = post(_params("accept"), 'W/"2"')
    assert r.status_code == 409 and r.json()["issue"][0]["code"] == "conflict"
    assert post(_params("accept"), 'W/"1"').status_code == 412
    r = httpx.post(f"{fhir_server.base}/DiagnosticReport/dr-nope/$review", headers={**h, "If-Match": 'W/"1"'},
                   json=_params("accept"))
    assert r.status_code == 404
