"""$review accept/edit writes the verified SR (issue 13); reject writes none."""

from __future__ import annotations

from typing import Any

import httpx
import pydicom

from tests.integrations.fhir.conftest import REVIEWER_SCOPES, Server
from tests.reporting.dicom.checks import dciodvfy_errors


def _params(action: str, **text: str) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": action}] + [
        {"name": k.replace("_", "-"), "valueString": v} for k, v in text.items()]}


def test_review_edit_writes_a_verified_sr_and_reject_none(fhir_server: Server) -> None:
    h = fhir_server.headers(REVIEWER_SCOPES, user="dr.amal", name="Dr Amal Haddad")
    edited, rejected = fhir_server.report_ids[0], fhir_server.report_ids[1]
    r = httpx.post(f"{fhir_server.base}/DiagnosticReport/{edited}/$review", headers={**h, "If-Match": 'W/"1"'},
                   json=_params("edit", impression_en="Small left pleural effusion."))
    assert r.status_code == 200, r.text
    draft = fhir_server.drafts[0]
    out = fhir_server.settings.data_dir / "drafts" / draft.study.study_instance_uid / "v1" / "verified-sr-v2.dcm"
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.VerificationFlag == "VERIFIED" and ds.StudyInstanceUID == draft.study.study_instance_uid
    assert str(ds.VerifyingObserverSequence[0].VerifyingObserverName) == "Haddad^Amal^^Dr"
    impressions = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121072"]
    assert str(impressions[0].ContentSequence[1].TextValue) == "Small left pleural effusion."
    r = httpx.post(f"{fhir_server.base}/DiagnosticReport/{rejected}/$review", headers={**h, "If-Match": 'W/"1"'},
                   json=_params("reject"))
    assert r.status_code == 200, r.text
    other = fhir_server.drafts[1]
    assert not list((fhir_server.settings.data_dir / "drafts" / other.study.study_instance_uid).glob("**/verified-sr*"))
