"""``GET /fhir/{type}``: search (R4 http.html#search), the FastAPI door.

The work is :func:`~integrations.fhir.interactions.search_resources`, which the fast path
(:mod:`integrations.fhir.fastpath`) calls too; this route adds FastAPI's validation and schema."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from .deps import ApiDep, PrincipalDep, ResourceType
from .interactions import negotiate, search_resources
from .responses import openapi_responses

SEARCH_OPENAPI = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
     "description": desc}
    for name, desc in [
        ("patient", "Patient/{id} or {id} (DiagnosticReport, ImagingStudy)"),
        ("subject", "Patient/{id} (DiagnosticReport, ImagingStudy)"),
        ("status", "DiagnosticReport status codes, comma = OR"),
        ("date", "[eq|ne|gt|lt|ge|le|sa|eb]date: clinically relevant time (effectiveDateTime)"),
        ("issued", "[prefix]dateTime: when the report was issued"),
        ("identifier", "[system|]value: study UID (urn:dicom:uid|urn:oid:...), accession, draft id"),
        ("category", "[system|]code, e.g. http://terminology.hl7.org/CodeSystem/v2-0074|RAD"),
        ("code", "[system|]code, e.g. http://loinc.org|18748-4"),
        ("target", "Provenance: DiagnosticReport/{id}"),
        ("_id", "logical ids, comma = OR"),
        ("_lastUpdated", "[prefix]dateTime"),
        ("_count", "page size (0-500)"),
        ("_offset", "page start (links next/previous carry it)"),
        ("_sort", "comma-separated, '-' for descending: date, issued, _lastUpdated, _id, status"),
        ("_include", "DiagnosticReport:subject, DiagnosticReport:imaging-study"),
        ("_revinclude", "Provenance:target"),
        ("_summary", "count or false"),
    ]
]
"""The search parameters in the OpenAPI schema (the route reads them from the query string itself)."""

router = APIRouter(tags=["search"])


@router.get("/fhir/{resource_type}", response_class=Response,
            responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503),
            openapi_extra={"parameters": SEARCH_OPENAPI})
async def search(resource_type: ResourceType, request: Request, principal: PrincipalDep, api: ApiDep) -> Response:
    """Search (R4 http.html#search): Bundle searchset with total and next/previous links."""
    pairs = list(request.query_params.multi_items())
    negotiate(request.headers.get("accept"), next((v for k, v in pairs if k == "_format"), None))
    return await search_resources(api, principal, resource_type.value, pairs, receive=request.receive)
