"""The FHIR R4 REST API (FastAPI), mounted at ``/fhir``.

Interactions (R4 http.html): ``GET /metadata``; read, vread and instance ``_history`` of
DiagnosticReport, Patient, ImagingStudy, Device and Provenance; search (see
:mod:`integrations.fhir.search_params`); ``POST /DiagnosticReport/{id}/$review``. Every error is an
OperationOutcome (handlers below are the one place errors become HTTP statuses). Every read and
search is committed to the audit trail with the caller's identity before its response is sent
(:mod:`integrations.fhir.access_log`); a review records in its own transaction.

Reads, vreads, histories and searches are coroutines: parsing, scope checks and the response run on
the event loop, the SQL runs in a worker thread (:meth:`FhirApi.query`, one hop per request) and
the wait for the audit commit holds no thread. The review stays a plain (threadpool) route.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from enum import Enum
from importlib import metadata
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
from fastapi import Body, Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fhir.resources.R4B.parameters import Parameters
from pydantic import ValidationError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool
from sqlmodel import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from reporting.draft import Draft, Language, Sections
from reporting.fhir import Review
from reporting.fhir.timing import instant
from taqrir.db import make_engine, session_scope, utcnow
from taqrir.settings import Settings

from .access_log import AccessAuditor
from .auth import Principal, TokenVerifier
from .capability import capability_statement
from .errors import FhirError, Forbidden, InvalidRequest, PreconditionRequired
from .responses import bundle_body, fhir_response, operation_outcome, resource_body
from .search import run_search
from .search_params import parse_search
from .store import (
    CurrentRow,
    FhirDraft,
    FhirResource,
    VersionRow,
    fetch_current,
    get_current,
    get_version,
    history,
    review_report,
    utc,
)

log = logging.getLogger(__name__)

_ETAG = re.compile(r'^(W/)?"(\d+)"$')
T = TypeVar("T")


class ResourceType(str, Enum):
    """The resource types this server serves."""

    DiagnosticReport = "DiagnosticReport"
    Patient = "Patient"
    ImagingStudy = "ImagingStudy"
    Device = "Device"
    Provenance = "Provenance"


class FhirApi:
    """Dependencies of the routes: settings, engine, token verifier."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.base_url = settings.api.base_url.rstrip("/")
        self.mode = settings.api.response_mode
        self.verifier = TokenVerifier(settings.api, settings.data_dir)
        self.auditor = AccessAuditor(engine)
        try:
            self.study_timezone = ZoneInfo(settings.api.study_timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"api.study_timezone {settings.api.study_timezone!r} is not an IANA zone") from err
        # Reads on PostgreSQL run in autocommit (no BEGIN/COMMIT round trips for a single SELECT) on
        # a pool of their own without pre-ping (a ping is one more round trip per request): a
        # connection that died meanwhile fails its query, is dropped by the pool, and the read is
        # run again once (:meth:`_query_sync`). SQLite keeps its transactions (the engine's BEGIN
        # IMMEDIATE hook owns them).
        self._read_engine: Engine | None = None
        if engine.dialect.name == "postgresql":
            size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 10
            self._read_engine = make_engine(engine.url.render_as_string(hide_password=False), pool_pre_ping=False,
                                            isolation_level="AUTOCOMMIT", pool_size=size, max_overflow=size)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for the read-only work of one request (Core, no ORM unit of work)."""
        if self._read_engine is None:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._read_engine.connect() as conn:
                yield conn

    def close(self) -> None:
        """Close the read pool (the engine passed in belongs to the caller)."""
        if self._read_engine is not None:
            self._read_engine.dispose()

    def _query_sync(self, work: Callable[[Connection], T]) -> T:
        try:
            with self.reading() as conn:
                return work(conn)
        except DBAPIError as err:
            if not err.connection_invalidated:
                raise
        # A pooled connection had died (a database restart); the pool has dropped it. Reads are
        # idempotent: run it again on a fresh connection.
        with self.reading() as conn:
            return work(conn)

    async def query(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` on a read connection in a worker thread (the event loop never blocks on SQL)."""
        return await anyio.to_thread.run_sync(self._query_sync, work)


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
IdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]


def _headers(row_version: int, last_updated: datetime) -> dict[str, str]:
    return {"ETag": f'W/"{row_version}"',
            "Last-Modified": utc(last_updated).strftime("%a, %d %b %Y %H:%M:%S GMT")}


def _check_compartment(principal: Principal, row: FhirResource | CurrentRow, perm: str) -> None:
    if principal.unrestricted(row.resource_type, perm):
        return
    if row.patient_ref != f"Patient/{principal.patient}":
        raise Forbidden(f"{row.resource_type}/{row.id} is outside the token's patient compartment")


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
        yield
        api.auditor.stop()
        api.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Taqrir FHIR R4 API (research drafts)",
        version=metadata.version("taqrir") if _installed() else "0",
        description="Bilingual research drafts of imaging reports. Not for clinical use.",
    )
    app.state.fhir = api
    capability_body = capability_statement(api.base_url, app.version, instant(utcnow())).model_dump_json()

    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, err: FhirError) -> Response:
        headers = {"WWW-Authenticate": 'Bearer realm="taqrir"'} if err.status_code == 401 else {}
        resp = operation_outcome(err.status_code, err.issue_code, str(err))
        resp.headers.update(headers)
        return resp

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
        rtype = resource_type.value
        principal.require(rtype, "s")
        pairs = list(request.query_params.multi_items())
        q = parse_search(rtype, pairs)
        q.count = min(q.count, settings.api.page_max)
        if not principal.unrestricted(rtype, "s"):
            if rtype == "Patient":
                q.ids.append((str(principal.patient),))
            else:
                q.patients.append((f"Patient/{principal.patient}",))
        for inc in q.include:
            principal.require("Patient" if inc.endswith(("subject", "patient")) else "ImagingStudy", "r")
        for _ in q.revinclude:
            principal.require("Provenance", "r")
        result = await api.query(lambda conn: run_search(conn, q))
        links = [("self", _page_url(api.base_url, rtype, pairs, q.offset))]
        if not q.summary_count:
            if q.offset + q.count < result.total and q.count > 0:
                links.append(("next", _page_url(api.base_url, rtype, pairs, q.offset + q.count)))
            if q.offset > 0:
                links.append(("previous", _page_url(api.base_url, rtype, pairs, max(0, q.offset - q.count))))
        entries = [(m.resource_type, m.id, m.json_text, "match") for m in result.matches]
        entries += [(i.resource_type, i.id, i.json_text, "include") for i in result.included]
        await api.auditor.record(action="fhir.search", actor=principal.subject, entity_type=rtype,
                           details={"params": sorted({k for k, _ in pairs}), "total": result.total,
                                    "returned": [f"{m.resource_type}/{m.id}/_history/{m.version_id}" for m in result.matches],
                                    "included": [f"{i.resource_type}/{i.id}" for i in result.included]})
        body = bundle_body(bundle_type="searchset", base_url=api.base_url, total=result.total, links=links,
                           entries=entries, mode=api.mode)
        return fhir_response(body)

    @app.get("/fhir/{resource_type}/{resource_id}", tags=["read"], response_class=Response,
             responses={200: {"content": {"application/fhir+json": {}}}})
    async def read(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep) -> Response:
        """Read the current version."""
        rtype = resource_type.value
        principal.require(rtype, "r")
        row = await api.query(lambda conn: fetch_current(conn, rtype, resource_id))
        _check_compartment(principal, row, "r")
        await api.auditor.record(action="fhir.read", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                           details={"version": row.version_id})
        return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=_headers(row.version_id, row.last_updated))

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
            _check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
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
            _check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
            return get_version(conn, rtype, resource_id, version_id)

        row = await api.query(version)
        await api.auditor.record(action="fhir.vread", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                           details={"version": version_id})
        return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=_headers(row.version_id, row.last_updated))

    @app.post("/fhir/DiagnosticReport/{resource_id}/$review", tags=["review"], response_class=Response,
              responses={200: {"content": {"application/fhir+json": {}}}})
    def review(resource_id: IdPath, session: SessionDep, principal: PrincipalDep,
               body: Annotated[dict[str, Any], Body(media_type="application/fhir+json")],
               if_match: Annotated[str | None, Header()] = None) -> Response:
        """Accept, edit or reject a draft (see the CapabilityStatement for the rules)."""
        principal.require("DiagnosticReport", "u")
        row = get_current(session, "DiagnosticReport", resource_id)
        _check_compartment(principal, row, "u")
        expected = _parse_if_match(if_match)
        drow = session.get(FhirDraft, row.draft_id) if row.draft_id else None
        sections = {} if drow is None else _draft_sections(drow.draft_json)
        rv = _review_from_parameters(body, principal, sections)
        outcome = review_report(session, resource_id, rv, if_match=expected, study_timezone=api.study_timezone)
        current = get_current(session, "DiagnosticReport", resource_id)
        headers = _headers(outcome.version, current.last_updated)
        headers["Location"] = f"{api.base_url}/DiagnosticReport/{resource_id}/_history/{outcome.version}"
        return fhir_response(resource_body("DiagnosticReport", outcome.report_json, api.mode), headers=headers)

    return app


def _draft_sections(draft_json: str) -> dict[Language, Sections]:
    return dict(Draft.model_validate_json(draft_json).sections)


def _page_url(base: str, rtype: str, pairs: list[tuple[str, str]], offset: int) -> str:
    kept = [(k, v) for k, v in pairs if k != "_offset"]
    if offset:
        kept.append(("_offset", str(offset)))
    return f"{base}/{rtype}" + ("?" + urlencode(kept) if kept else "")


def _installed() -> bool:
    try:
        metadata.version("taqrir")
    except metadata.PackageNotFoundError:
        return False
    return True
