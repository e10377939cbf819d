"""The FHIR R4 REST API (FastAPI), mounted at ``/fhir``.

Interactions (R4 http.html): ``GET /metadata``; read, vread and instance ``_history`` of
DiagnosticReport, Patient, ImagingStudy, Device and Provenance; search (see
:mod:`integrations.fhir.search_params`); ``POST /DiagnosticReport/{id}/$review``. Every error is an
OperationOutcome (:func:`~integrations.fhir.interactions.error_response` and the handlers below are
the one place errors become HTTP statuses). Every read and search is committed to the audit trail
with the caller's identity before its response is sent (:mod:`integrations.fhir.access_log`); a
review records in its own transaction.

The hot path. Nearly all traffic is two requests: read a DiagnosticReport, search one patient's
reports. What they do lives once, in :mod:`integrations.fhir.interactions`, and two doors lead
to it:

* :class:`~integrations.fhir.fastpath.FastPath`, an ASGI middleware (``api.fast_path``, on by
  default, so ``taqrir api`` serves with it), takes ``GET /fhir/<type>`` and ``GET
  /fhir/<type>/<valid id>`` itself: a split, a set lookup, the cached token check, then the shared
  interaction. It skips Starlette's route matching over every route, FastAPI's dependency
  resolution and enum/pattern validation, and the handler wrappers. Anything else (other
  methods, invalid ids, unknown types, vread, history, metadata, $review) passes to FastAPI
  unchanged, so the OpenAPI schema and every other behaviour stay as they were.
* the FastAPI routes below, for everything else and with ``api.fast_path`` off.

Both answer with the same status, headers, body and audit record
(``tests/integrations/fhir/test_fastpath.py`` compares two servers, one per door, on SQLite and
PostgreSQL). Under both, on PostgreSQL the current-version read and the one-patient search page
run on the event loop with asyncpg (:mod:`integrations.fhir.pgreads`), rendering the SQL that
SQLAlchemy builds for the general path; other searches, vread and history run SQLAlchemy Core in a
worker thread (:meth:`FhirApi.query <integrations.fhir.interactions.FhirApi.query>`). uvicorn
runs on httptools and uvloop (dependencies it picks up by itself), the audit writer lingers a few
milliseconds to commit more accesses per batch (``api.audit_linger_ms``), and the objects built
at start-up are frozen out of the cyclic garbage collector (below).

Measured effect (``bench/fhir_api.py``: 100,000 drafts in PostgreSQL, 50 clients, half searches by
patient, half reads, 2 uvicorn workers, server, PostgreSQL and load generator on the same 2 cores;
see integrations/fhir/README.md for the table), raw mode: saturation throughput rose from 349-418 to
1,069-1,280 req/s and server CPU per request there from 3.0-3.4 to 0.75-0.89 ms; 500 req/s offered
is now served (before: 274-314 req/s, seconds of queueing), p50 24-27 ms, p99 88-90 ms (target 50
ms: not met; the largest part of a request's time is its wait for the audit commit). The fast path
alone, all else equal (``api.fast_path`` off): 759 req/s at saturation, 1.38 ms server CPU per
request, p99 104 ms at 500 req/s. Later, on a machine about twice as fast per request and with the
audit writer on the event loop (:mod:`integrations.fhir.access_log`): 2,212-2,660 req/s at
saturation, p99 11.6-14.9 ms at 500 req/s (five runs).
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import Enum
from importlib import metadata
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Body, Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fhir.resources.R4B.parameters import Parameters
from pydantic import ValidationError
from sqlalchemy.engine import Connection, Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from reporting.draft import Draft, Language, Sections
from reporting.fhir import Review
from reporting.fhir.timing import instant
from ground.clock import utcnow
from ground.db import session_scope

from .audit_routes import audit_router
from .auth import Principal
from .auth import smart_configuration as smart_configuration_doc
from .capability import capability_statement
from .config import FhirSettings
from .errors import AuditUnavailable, FhirError, InvalidRequest, PreconditionRequired
from .fastpath import ID_PATTERN, FastPath
from .interactions import (
    FhirApi,
    audit_failure,
    check_compartment,
    error_response,
    failure_reason,
    negotiate,
    read_resource,
    search_resources,
    version_headers,
)
from .responses import bundle_body, fhir_response, openapi_responses, operation_outcome, resource_body
from .search_params import MAX_COUNT, parse_int
from .store import (
    FhirDraft,
    VersionRow,
    fetch_current,
    get_current,
    get_version,
    history,
    review_report,
    utc,
)
from .signed import router as signed_router

log = logging.getLogger(__name__)

_ETAG = re.compile(r'^(W/)?"(\d+)"$')


class ResourceType(str, Enum):
    """The resource types this server serves."""

    DiagnosticReport = "DiagnosticReport"
    Patient = "Patient"
    ImagingStudy = "ImagingStudy"
    Device = "Device"
    Provenance = "Provenance"


def _api(request: Request) -> FhirApi:
    api: FhirApi = request.app.state.fhir
    return api


async def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    # async: CPU-only (signature check), so it runs on the event loop without a threadpool hop.
    principal = _api(request).verifier.verify(authorization)
    request.state.fhir_principal = principal  # for the audit record of a refusal that follows
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]
IdPath = Annotated[str, Path(pattern=f"^{ID_PATTERN}$")]


def _parse_if_match(value: str | None) -> int:
    if value is None:
        raise PreconditionRequired('If-Match: W/"<version>" is required to review a report')
    m = _ETAG.match(value.strip())
    if not m:
        raise InvalidRequest(f'If-Match {value!r} is not an ETag like W/"1"')
    return int(m.group(2))


MAX_SECTION_CHARS = 32_768
"""Longest text accepted for one edited section (issue 11, item 15). FHIR strings may hold up to
1 MB (R4 datatypes, string), but a radiology report's findings run to a few thousand characters;
32 KiB leaves room for the longest real report while an edit that is megabytes long (a paste
gone wrong, or an attack that would be stored in every version and copied into four presented
forms, the narrative and the audit trail) is refused with a 400 before anything is written."""

_REVIEW_FIELDS: dict[str, tuple[Language, str]] = {"findings-en": ("en", "findings"), "impression-en": ("en", "impression"),
                  "findings-ar": ("ar", "findings"), "impression-ar": ("ar", "impression")}


def _review_from_parameters(body: dict[str, Any], principal: Principal,
                            draft_sections: dict[Language, Sections]) -> Review:
    try:
        params = Parameters.model_validate(body)
    except (ValidationError, ValueError) as err:
        raise InvalidRequest(f"body is not a valid Parameters resource: {str(err)[:500]}") from err
    action: str | None = None
    edits: dict[Language, dict[str, str]] = {}
    for p in params.parameter or []:
        if p.name == "action":
            action = p.valueCode
        elif p.name in _REVIEW_FIELDS:
            if not isinstance(p.valueString, str) or not p.valueString.strip():
                raise InvalidRequest(f"parameter {p.name} needs a non-empty valueString")
            if "\x00" in p.valueString:  # PostgreSQL text cannot hold NUL: a 400, not a 500 at INSERT
                raise InvalidRequest(f"parameter {p.name} contains a NUL character")
            if len(p.valueString) > MAX_SECTION_CHARS:
                raise InvalidRequest(f"parameter {p.name} is {len(p.valueString)} characters long; a report section "
                                     f"may have at most {MAX_SECTION_CHARS}")
            lang, section = _REVIEW_FIELDS[p.name]
            edits.setdefault(lang, {})[section] = p.valueString
        else:
            raise InvalidRequest(f"unknown parameter {p.name!r}: use action, {', '.join(_REVIEW_FIELDS)}")
    if action not in ("accept", "edit", "reject"):
        raise InvalidRequest("parameter action (valueCode) must be accept, edit or reject")
    if action == "edit" and not edits:
        raise InvalidRequest("action edit needs at least one of " + ", ".join(_REVIEW_FIELDS))
    if action != "edit" and edits:
        raise InvalidRequest(f"action {action} takes no edited text")
    sections: dict[Language, Sections] = {}
    for lang, fields in edits.items():
        base = draft_sections.get(lang)
        sections[lang] = Sections(findings=fields.get("findings", base.findings if base else ""),
                                  impression=fields.get("impression", base.impression if base else ""))
    return Review(action=action, reviewer_id=principal.subject, reviewer_display=principal.name,  # type: ignore[arg-type]
                  reviewed_at=utcnow(), edits=sections)


_PUBLIC_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})


def _document_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's schema as this server really behaves: no 422 (validation errors are answered
    400 with an OperationOutcome by the handler below), and the bearer scheme on every
    interaction but the public discovery documents."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "SMART App Launch v2 scopes: .r read, .s search, .u review "
                       "(see /fhir/.well-known/smart-configuration)"}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.get("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":
                responses.pop("422")  # FastAPI's own: never sent (the handler answers 400)
            if path not in _PUBLIC_PATHS:
                op["security"] = [{"bearer": []}]
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if not components.get("schemas"):
        components.pop("schemas", None)
    return schema


_SEARCH_OPENAPI = [
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


def create_app(settings: FhirSettings, engine: Engine) -> FastAPI:
    """The FastAPI application serving the FHIR API at ``/fhir``."""
    api = FhirApi(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        api.auditor.start()
        # Everything imported and built so far (FastAPI, pydantic and fhir.resources models,
        # SQLAlchemy) lives as long as the process: about 175,000 objects that every full (gen2)
        # collection would walk again, a 100-180 ms pause of the event loop on the benchmark
        # machine, each stalling every request in flight (the p99). Freezing them leaves the
        # collector only what requests allocate.
        gc.collect()
        gc.freeze()
        yield
        api.auditor.stop()
        await api.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="Taqrir FHIR R4 API (research drafts)",
        version=metadata.version("taqrir") if _installed() else "0",
        description="Bilingual research drafts of imaging reports. Not for clinical use.",
    )
    app.state.fhir = api
    if settings.api.fast_path:
        app.add_middleware(FastPath, api=api)
    capability_body = capability_statement(api.base_url, app.version, instant(utcnow())).model_dump_json()
    smart_body = smart_configuration_doc(settings.api)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_openapi(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def _audited(request: Request, resp: Response, status: int, reason: str, *, record: bool = True) -> Response:
        # Every refused or failed access is recorded, by this door as by the fast path (item 23).
        if record:
            await audit_failure(api, principal=getattr(request.state, "fhir_principal", None), method=request.method,
                                path=request.url.path, pairs=list(request.query_params.multi_items()),
                                status=status, reason=reason)
        return resp

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, err: FhirError) -> Response:
        return await _audited(request, error_response(err), err.status_code, failure_reason(err),
                              record=not isinstance(err, AuditUnavailable))  # the trail itself failed

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> Response:
        if any(tuple(e.get("loc", ())) == ("path", "resource_type") for e in err.errors()):
            msg = "unknown resource type: this server serves " + ", ".join(t.value for t in ResourceType)
            return await _audited(request, operation_outcome(404, "not-supported", msg), 404, msg)
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        msg = f"invalid request: {problems}"[:2000]
        return await _audited(request, operation_outcome(400, "invalid", msg), 400, msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(err.status_code, "processing")
        resp = operation_outcome(err.status_code, code, str(err.detail))
        if err.headers:
            resp.headers.update(err.headers)
        return await _audited(request, resp, err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("unhandled error in the FHIR API: %s", type(err).__name__)
        return await _audited(request, operation_outcome(500, "exception", "internal server error"), 500,
                              f"internal server error: {type(err).__name__}")

    @app.get("/fhir/metadata", tags=["capabilities"], response_class=Response, responses=openapi_responses(200, 406))
    def capabilities(request: Request) -> Response:
        """The CapabilityStatement (public, as SMART App Launch requires)."""
        negotiate(request.headers.get("accept"), request.query_params.get("_format"))
        return fhir_response(capability_body)

    @app.get("/fhir/.well-known/smart-configuration", tags=["capabilities"], response_class=Response,
             responses={200: {"description": "SMART configuration", "content": {"application/json": {}}}})
    def smart_configuration() -> Response:
        """How SMART clients get a token (public, SMART App Launch 2.0 conformance.html)."""
        return Response(smart_body, media_type="application/json")
    app.include_router(audit_router(api))  # before /fhir/{resource_type}: AuditEvent is not a stored type

    @app.get("/fhir/{resource_type}", tags=["search"], response_class=Response,
             responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503),
             openapi_extra={"parameters": _SEARCH_OPENAPI})
    async def search(resource_type: ResourceType, request: Request, principal: PrincipalDep) -> Response:
        """Search (R4 http.html#search): Bundle searchset with total and next/previous links."""
        pairs = list(request.query_params.multi_items())
        negotiate(request.headers.get("accept"), next((v for k, v in pairs if k == "_format"), None))
        return await search_resources(api, principal, resource_type.value, pairs, receive=request.receive)

    @app.get("/fhir/{resource_type}/{resource_id}", tags=["read"], response_class=Response,
             responses=openapi_responses(200, 304, 400, 401, 403, 404, 406, 500, 503))
    async def read(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep, request: Request) -> Response:
        """Read the current version."""
        negotiate(request.headers.get("accept"), request.query_params.get("_format"))
        return await read_resource(api, principal, resource_type.value, resource_id,
                                   if_none_match=request.headers.get("if-none-match"))

    @app.get("/fhir/{resource_type}/{resource_id}/_history", tags=["history"], response_class=Response,
             responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503))
    async def instance_history(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep,
                               request: Request) -> Response:
        """Every version, newest first (Bundle history)."""
        rtype = resource_type.value
        negotiate(request.headers.get("accept"), request.query_params.get("_format"))
        principal.require(rtype, "r")
        pairs = list(request.query_params.multi_items())
        count, offset = 50, 0
        for k, v in pairs:
            if k == "_count":
                count = min(parse_int(k, v, 0, MAX_COUNT), 500)
            elif k == "_offset":
                offset = parse_int(k, v, 0, 10_000_000)
            elif k != "_format":
                raise InvalidRequest(f"_history takes _count and _offset (non-negative integers), not {k}={v!r}")

        def page(conn: Connection) -> tuple[int, list[VersionRow]]:
            check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
            return history(conn, rtype, resource_id, count=count, offset=offset)

        total, rows = await api.query(page)
        await api.auditor.record(action="fhir.history", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                           details={"versions": [r.version_id for r in rows]})
        links = [("self", f"{api.base_url}/{rtype}/{resource_id}/_history?" + urlencode({"_count": count, "_offset": offset}))]
        if offset + count < total:
            links.append(("next", f"{api.base_url}/{rtype}/{resource_id}/_history?" + urlencode({"_count": count, "_offset": offset + count})))
        entries = [(rtype, resource_id, r.json_text, None) for r in rows]
        # R4 bdl-3/bdl-4: a history entry says how its version came to be (request) and what the
        # server answered (response): version 1 was created (POST), later ones updated (PUT).
        requests = [{"request": {"method": "POST", "url": rtype} if r.version_id == 1
                     else {"method": "PUT", "url": f"{rtype}/{resource_id}"},
                     "response": {"status": "201 Created" if r.version_id == 1 else "200 OK",
                                  "etag": f'W/"{r.version_id}"', "lastModified": instant(utc(r.last_updated))}}
                    for r in rows]
        body = bundle_body(bundle_type="history", base_url=api.base_url, total=total, links=links, entries=entries,
                           mode=api.mode, entry_extras=requests)
        return fhir_response(body)

    @app.get("/fhir/{resource_type}/{resource_id}/_history/{version_id}", tags=["read"], response_class=Response,
             responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503))
    async def vread(resource_type: ResourceType, resource_id: IdPath,
                    version_id: Annotated[int, Path(ge=1, le=2**31 - 1)], principal: PrincipalDep,
                    request: Request) -> Response:
        """Read one version."""
        rtype = resource_type.value
        negotiate(request.headers.get("accept"), request.query_params.get("_format"))
        principal.require(rtype, "r")

        def version(conn: Connection) -> VersionRow:
            check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
            return get_version(conn, rtype, resource_id, version_id)

        row = await api.query(version)
        await api.auditor.record(action="fhir.vread", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                           details={"version": version_id})
        return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=version_headers(row.version_id, row.last_updated))

    @app.post("/fhir/DiagnosticReport/{resource_id}/$review", tags=["review"], response_class=Response,
              responses=openapi_responses(200, 400, 401, 403, 404, 406, 409, 412, 428, 500, 503))
    def review(resource_id: IdPath, principal: PrincipalDep,
               body: Annotated[dict[str, Any], Body(media_type="application/fhir+json")],
               if_match: Annotated[str | None, Header()] = None) -> Response:
        """Accept, edit or reject a draft (see the CapabilityStatement for the rules)."""
        principal.require("DiagnosticReport", "u")
        expected = _parse_if_match(if_match)
        # The transaction commits before the response is built (issue 11, item 11): a FastAPI
        # ``yield`` dependency would commit in its teardown, after the 200 had been sent, so a read
        # right after could see the old version and a failed commit would still have said 200.
        with session_scope(api.engine) as session:
            row = get_current(session, "DiagnosticReport", resource_id)
            check_compartment(principal, row, "u")
            drow = session.get(FhirDraft, row.draft_id) if row.draft_id else None
            sections = {} if drow is None else _draft_sections(drow.draft_json)
            rv = _review_from_parameters(body, principal, sections)
            outcome = review_report(session, resource_id, rv, if_match=expected, study_timezone=api.study_timezone)
            if drow is not None and rv.action != "reject":  # the verified SR, in this transaction (issue 13)
                from workers.dicom_objects import store_verified_sr
                store_verified_sr(session, api.settings, Draft.model_validate_json(drow.draft_json), rv,
                                  report_version=outcome.version)
            current = get_current(session, "DiagnosticReport", resource_id)
            headers = version_headers(outcome.version, current.last_updated)
        headers["Location"] = f"{api.base_url}/DiagnosticReport/{resource_id}/_history/{outcome.version}"
        return fhir_response(resource_body("DiagnosticReport", outcome.report_json, api.mode), headers=headers)

    app.include_router(signed_router)  # signed reports back from a RIS/EHR: POST, PUT DiagnosticReport
    return app


def _draft_sections(draft_json: str) -> dict[Language, Sections]:
    return dict(Draft.model_validate_json(draft_json).sections)


def _installed() -> bool:
    try:
        metadata.version("taqrir")
    except metadata.PackageNotFoundError:
        return False
    return True
