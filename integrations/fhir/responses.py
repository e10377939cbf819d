"""FHIR JSON responses: resources, Bundles and OperationOutcomes.

Two modes (``api.response_mode``): ``model`` parses each stored resource into its fhir.resources
class and serialises the Bundle from models (every response is checked against the R4B models);
``raw`` splices the stored JSON, which was validated by the models when it was written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.resource import Resource
from starlette.responses import Response

from ground.clock import utcnow
from reporting.fhir.timing import instant

FHIR_JSON: Final = "application/fhir+json"
FHIR_JSON_UTF8: Final = "application/fhir+json; charset=utf-8"
"""The Content-Type of every FHIR body: R4 http.html#mime-type says servers SHALL send the charset."""
MODELS: Final[dict[str, type[Resource]]] = {
    "DiagnosticReport": DiagnosticReport,
    "Patient": Patient,
    "ImagingStudy": ImagingStudy,
    "Device": Device,
    "Provenance": Provenance,
}


def fhir_response(body: str | bytes, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A response with the FHIR JSON media type (R4 http.html#mime-type)."""
    return Response(content=body, status_code=status_code, media_type=FHIR_JSON_UTF8, headers=dict(headers or {}))


def operation_outcome(status_code: int, code: str, message: str, severity: str = "error") -> Response:
    """An OperationOutcome with one issue (R4 operationoutcome.html)."""
    oo = OperationOutcome.model_validate({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    })
    return fhir_response(oo.model_dump_json(), status_code)


def resource_body(resource_type: str, json_text: str, mode: str) -> str:
    """One stored resource as the response body."""
    if mode == "raw":
        return json_text
    return MODELS[resource_type].model_validate_json(json_text).model_dump_json()


def bundle_body(
    *,
    bundle_type: str,
    base_url: str,
    total: int | None,
    links: Iterable[tuple[str, str]],
    entries: Iterable[tuple[str, str, str, str | None]],
    mode: str,
    entry_extras: list[dict[str, Any]] | None = None,
) -> str:
    """A Bundle; ``entries`` are ``(type, id, stored JSON, search mode or None)``; ``entry_extras``
    (one per entry) adds elements to each entry (a history's ``request`` and ``response``)."""
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"lastUpdated": instant(utcnow())},
        "type": bundle_type,
    }
    if total is not None:
        head["total"] = total
    link_list = [{"relation": rel, "url": url} for rel, url in links]
    if link_list:
        head["link"] = link_list
    if mode == "raw":
        parts = []
        for n, (rtype, rid, text, search_mode) in enumerate(entries):
            extra = f',"search":{{"mode":"{search_mode}"}}' if search_mode else ""
            if entry_extras:
                extra += "," + json.dumps(entry_extras[n], ensure_ascii=False, separators=(",", ":"))[1:-1]
            parts.append(f'{{"fullUrl":{json.dumps(f"{base_url}/{rtype}/{rid}")},"resource":{text}{extra}}}')
        head_text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
        if not parts:
            return head_text
        return head_text[:-1] + ',"entry":[' + ",".join(parts) + "]}"
    entry_list = []
    for n, (rtype, rid, text, search_mode) in enumerate(entries):
        entry: dict[str, Any] = {"fullUrl": f"{base_url}/{rtype}/{rid}",
                                 "resource": MODELS[rtype].model_validate_json(text)}
        if search_mode:
            entry["search"] = {"mode": search_mode}
        if entry_extras:
            entry.update(entry_extras[n])
        entry_list.append(entry)
    if entry_list:
        head["entry"] = entry_list
    return str(Bundle.model_validate(head).model_dump_json())


STATUS_DOC: dict[int, str] = {
    200: "OK", 201: "Created",
    304: "Not Modified: If-None-Match names the current version",
    400: "Bad Request: invalid or unsupported parameters, headers or body (OperationOutcome)",
    401: "Unauthorized: no valid bearer token (WWW-Authenticate: Bearer)",
    403: "Forbidden: the token's scopes do not allow the interaction",
    404: "Not Found: unknown type, id or version, or outside a patient token's compartment",
    406: "Not Acceptable: a format other than JSON was asked for (_format or Accept)",
    409: "Conflict: the report is not an unreviewed current draft (reviewed, rejected or superseded)",
    412: "Precondition Failed: If-Match names a version that is no longer current",
    422: "Unprocessable Entity: a valid resource that breaks a business rule (e.g. no matching study)",
    428: "Precondition Required: If-Match is missing",
    500: "Internal Server Error (OperationOutcome; recorded in the audit trail)",
    503: "Service Unavailable: the access could not be recorded in the audit trail; try again",
}


def openapi_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route: the statuses it really answers (issue 11, item 24)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": STATUS_DOC[code]}
        if code != 304:
            entry["content"] = {"application/fhir+json": {}}
        out[code] = entry
    return out
