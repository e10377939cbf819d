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
from collections.abc import AsyncIterator, Iterator
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
from sqlmodel import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from reporting.draft import Draft, Language, Sections
from reporting.fhir import Review
from reporting.fhir.timing import instant
from taqrir.db import session_scope, utcnow
from taqrir.settings import Settings

from .auth import Principal
from .capability import capability_statement
from .errors import FhirError, InvalidRequest, PreconditionRequired
from .fastpath import ID_PATTERN, FastPath
from .interactions import (
    FhirApi,
    check_compartment,
    error_response,
    read_resource,
    search_resources,
    version_headers,
)
from .responses import bundle_body, fhir_response, operation_outcome, resource_body
from .signed import router as signed_router
from .store import FhirDraft, VersionRow, fetch_current, get_current, get_version, history, review_report

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


def _session(request: Request) -> Iterator[Session]:
    """One transaction per request (for the review: the new version and its audit record commit together)."""
    with session_scope(_api(request).engine) as session:
        yield session


async def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    # async: CPU-only (signature check), so it runs on the event loop without a threadpool hop.
    return _api(request).verifier.verify(authorization)


SessionDep = Annotated[Session, Depends(_session)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
IdPath = Annotated[str, Path(pattern=f"^{ID_PATTERN}$")]


def _parse_if_match(value: str | None) -> int:
    if value is None:
        raise PreconditionRequired('If-Match: W/"<version>" is required to review a report')
    m = _ETAG.match(value.strip())
    if not m:
        raise InvalidRequest(f'If-Match {value!r} is not an ETag like W/"1"')
    return int(m.group(2))


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


def create_app(settings: Settings, engine: Engine) -> FastAPI:
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

    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, err: FhirError) -> Response:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> Response:
        if any(tuple(e.get("loc", ())) == ("path", "resource_type") for e in err.errors()):
            return operation_outcome(404, "not-supported", "unknown resource type: this server serves "
                                     + ", ".join(t.value for t in ResourceType))
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return operation_outcome(400, "invalid", f"invalid request: {problems}"[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(err.status_code, "processing")
        resp = operation_outcome(err.status_code, code, str(err.detail))
        if err.headers:
            resp.headers.update(err.headers)
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> Response:
        log.exception("unhandled error in the FHIR API: %s", type(err).__name__)
        return operation_outcome(500, "exception", "internal server error")

    @app.get("/fhir/metadata", tags=["capabilities"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}})
    def capabilities() -> Response:
        """The CapabilityStatement (public, as SMART App Launch requires)."""
        return fhir_response(capability_body)

    @app.get("/fhir/{resource_type}", tags=["search"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}},
             openapi_extra={"parameters": _SEARCH_OPENAPI})
    async def search(resource_type: ResourceType, request: Request, principal: PrincipalDep) -> Response:
        """Search (R4 http.html#search): Bundle searchset with total and next/previous links."""
        return await search_resources(api, principal, resource_type.value, list(request.query_params.multi_items()))

    @app.get("/fhir/{resource_type}/{resource_id}", tags=["read"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}})
    async def read(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep) -> Response:
        """Read the current version."""
        return await read_resource(api, principal, resource_type.value, resource_id)

    @app.get("/fhir/{resource_type}/{resource_id}/_history", tags=["history"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}})
    async def instance_history(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep,
                               request: Request) -> Response:
        """Every version, newest first (Bundle history)."""
        rtype = resource_type.value
        principal.require(rtype, "r")
        pairs = list(request.query_params.multi_items())
        count, offset = 50, 0
        for k, v in pairs:
            if k not in ("_count", "_offset") or not v.isdigit():
                raise InvalidRequest(f"_history takes _count and _offset (non-negative integers), not {k}={v!r}")
            count, offset = (min(int(v), 500), offset) if k == "_count" else (count, int(v))

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
        body = bundle_body(bundle_type="history", base_url=api.base_url, total=total, links=links, entries=entries,
                           mode=api.mode)
        return fhir_response(body)

    @app.get("/fhir/{resource_type}/{resource_id}/_history/{version_id}", tags=["read"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}})
    async def vread(resource_type: ResourceType, resource_id: IdPath,
                    version_id: Annotated[int, Path(ge=1, le=2**31 - 1)], principal: PrincipalDep) -> Response:
        """Read one version."""
        rtype = resource_type.value
        principal.require(rtype, "r")

        def version(conn: Connection) -> VersionRow:
            check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
            return get_version(conn, rtype, resource_id, version_id)

        row = await api.query(version)
        await api.auditor.record(action="fhir.vread", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                           details={"version": version_id})
        return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=version_headers(row.version_id, row.last_updated))

    @app.post("/fhir/DiagnosticReport/{resource_id}/$review", tags=["review"], response_class=Response,
              responses={200: {"content": {"application/fhir+json": {}}}})
    def review(resource_id: IdPath, session: SessionDep, principal: PrincipalDep,
               body: Annotated[dict[str, Any], Body(media_type="application/fhir+json")],
               if_match: Annotated[str | None, Header()] = None) -> Response:
        """Accept, edit or reject a draft (see the CapabilityStatement for the rules)."""
        principal.require("DiagnosticReport", "u")
        row = get_current(session, "DiagnosticReport", resource_id)
        check_compartment(principal, row, "u")
        expected = _parse_if_match(if_match)
        drow = session.get(FhirDraft, row.draft_id) if row.draft_id else None
        sections = {} if drow is None else _draft_sections(drow.draft_json)
        rv = _review_from_parameters(body, principal, sections)
        outcome = review_report(session, resource_id, rv, if_match=expected, study_timezone=api.study_timezone)
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
