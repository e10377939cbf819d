"""What the read and search interactions do, once, whichever door the request came in by.

The FastAPI routes (:mod:`~integrations.fhir.read_routes`, :mod:`~integrations.fhir.search_routes`)
and :mod:`integrations.fhir.fastpath` (the ASGI layer in front of them for the hot requests) both
call :func:`read_resource` and :func:`search_resources` and turn errors into responses with
:func:`error_response`: the scope
checks, patient compartment, SQL, audit record, body and headers cannot drift apart between the
two paths because there is only one of each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool
from starlette.responses import Response
from starlette.types import Receive

from audit.access_writer import AccessNotRecorded, AccessRecorder, access_writer, asyncpg_dsn

from .auth import Principal, TokenVerifier
from .config import FhirSettings
from .errors import AuditUnavailable, ClientGone, FhirError, NotAcceptable, NotFound, QueryTooCostly
from .pgreads import PgReads
from .responses import bundle_body, fhir_response, operation_outcome, resource_body
from .search import SearchResult, run_search
from .search_params import parse_search
from .store import CurrentRow, FhirResource, fetch_current, utc

log = logging.getLogger(__name__)

T = TypeVar("T")


class FhirApi:
    """What the interactions need: settings, engine, token verifier, access recorder and the read paths.

    One path per database and direction (integrations/fhir/README.md, "Database access"): reads on
    PostgreSQL take asyncpg on the event loop for the two hot shapes (:class:`PgReads`) and
    SQLAlchemy Core on the engine given here, in a worker thread, for the rest (:meth:`query`);
    SQLite reads all go through :meth:`query`. Access records go through the one access writer
    (:mod:`audit.access_writer`); state changes (review, signed reports) through the ORM session
    on the same engine. No engine is built here: the caller's engine serves every SQLAlchemy path."""

    def __init__(self, settings: FhirSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.base_url = settings.api.base_url.rstrip("/")
        self.mode = settings.api.response_mode
        self.verifier = TokenVerifier(settings.api, settings.data_dir)
        self.access: AccessRecorder = access_writer(engine, linger_s=settings.api.audit_linger_ms / 1000)
        try:
            self.study_timezone = ZoneInfo(settings.api.study_timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"api.study_timezone {settings.api.study_timezone!r} is not an IANA zone") from err
        # statement_timeout bounds every read on PostgreSQL (issue 11, item 14): the server cancels
        # a query that runs longer, whoever waits for it.
        self._statement_timeout_ms = int(settings.api.statement_timeout_ms)
        self.pg: PgReads | None = None
        if engine.dialect.name == "postgresql":
            size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 10
            self.pg = PgReads(asyncpg_dsn(engine), max_size=size, statement_timeout_ms=self._statement_timeout_ms)

    async def record_access(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
                            details: dict[str, Any] | None = None, outcome: str = "success") -> None:
        """Record an access before its answer is sent (:class:`AuditUnavailable`, a 503, if it cannot be)."""
        try:
            await self.access.record(action=action, actor=actor, entity_type=entity_type, entity_id=entity_id,
                                     details=details, outcome=outcome)
        except AccessNotRecorded as err:
            raise AuditUnavailable(str(err)) from err

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for the read-only work of one request (Core, no ORM unit of work), in a
        transaction of the engine given to the API; on PostgreSQL bounded by ``statement_timeout``."""
        with self.engine.begin() as conn:
            if self.pg is not None:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {self._statement_timeout_ms}")
            yield conn

    async def aclose(self) -> None:
        """Close the hot-read pool and the access writer's connection (the engine belongs to the caller)."""
        await self.access.aclose()
        if self.pg is not None:
            await self.pg.close()

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

    async def query(self, work: Callable[[Connection], T], *, receive: Receive | None = None) -> T:
        """Run ``work`` on a read connection in a worker thread (the event loop never blocks on SQL).

        With ``receive`` (the request's ASGI receive), a client that disconnects meanwhile cancels
        the statement in the database (PostgreSQL: psycopg's cancel request, the protocol's own
        way; SQLite: ``interrupt()``) and the request ends with :class:`ClientGone`."""
        try:
            return await self._query(work, receive)
        except DBAPIError as err:
            if type(err.orig).__name__ == "QueryCanceled":
                raise QueryTooCostly("the search ran longer than the server allows (api.statement_timeout_ms) and "
                                     "was stopped; narrow it (patient, date, identifier)") from err
            raise

    async def _query(self, work: Callable[[Connection], T], receive: Receive | None) -> T:
        if receive is None:
            return await anyio.to_thread.run_sync(self._query_sync, work)
        running: list[Any] = []

        def tracked(conn: Connection) -> T:
            running.append(conn.connection.dbapi_connection)
            try:
                return work(conn)
            finally:
                running.clear()

        job = asyncio.ensure_future(anyio.to_thread.run_sync(self._query_sync, tracked, abandon_on_cancel=True))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if job.done():
            return job.result()
        for dbapi_conn in running[:]:  # a copy: the worker thread clears it when the query ends
            try:
                (dbapi_conn.cancel if hasattr(dbapi_conn, "cancel") else dbapi_conn.interrupt)()
            except Exception as err:
                log.warning("could not cancel an abandoned query: %s", type(err).__name__)
        job.cancel()
        log.info("client went away; its search was cancelled")
        raise ClientGone("the client closed the connection before the answer")

    async def current(self, resource_type: str, resource_id: str) -> CurrentRow:
        """The current version (:func:`~integrations.fhir.store.fetch_current`), or NotFound."""
        if self.pg is not None:
            return await self.pg.current(resource_type, resource_id)
        return await self.query(lambda conn: fetch_current(conn, resource_type, resource_id))


class OutsideCompartment(NotFound):
    """A resource outside a patient/ token's compartment: answered exactly as an unknown id (404),
    so that a patient-scoped client cannot learn which ids exist (issue 11, item 22; SMART App
    Launch leaves the choice to the server, and HAPI's consent interceptors answer 404 too). The
    real reason goes to the audit trail only."""

    def __init__(self, resource_type: str, resource_id: str) -> None:
        super().__init__(f"{resource_type}/{resource_id} is not known")
        self.audit_reason = f"{resource_type}/{resource_id} is outside the token's patient compartment"


async def _disconnected(receive: Receive) -> None:
    """Return when the ASGI server reports that the client went away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def check_compartment(principal: Principal, row: FhirResource | CurrentRow, perm: str) -> None:
    """:class:`OutsideCompartment` (404) unless a user/system scope grants ``perm`` or the row is in
    the token's patient compartment."""
    if principal.unrestricted(row.resource_type, perm):
        return
    if row.patient_ref != f"Patient/{principal.patient}":
        raise OutsideCompartment(row.resource_type, row.id)


_JSON_TYPES = frozenset({"*/*", "application/*", "application/fhir+json", "application/json", "application/json+fhir"})
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})


def negotiate(accept: str | None, fmt: str | None) -> None:
    """:class:`NotAcceptable` (406) unless the client accepts JSON (R4 http.html#mime-type: the
    ``_format`` parameter overrides ``Accept``; this server produces JSON only, so an XML or
    Turtle request is refused instead of being answered in JSON with 200)."""
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise NotAcceptable(f"_format={fmt!r}: this server produces application/fhir+json only")
        return
    if not accept or not accept.strip():
        return
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media.lower() in _JSON_TYPES:
            return
    raise NotAcceptable(f"Accept: {accept[:200]!r}: this server produces application/fhir+json only")


def not_modified(if_none_match: str | None, version: int) -> bool:
    """Whether ``If-None-Match`` names ``version`` (weak comparison, RFC 9110 13.1.2; ``*`` matches)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{version}"':
            return True
    return False


MAX_AUDITED_PARAMS = 64
MAX_AUDITED_VALUE = 512


def audited_params(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Query parameters with their values, for the audit trail (who searched for what is what an
    auditor asks; the trail, not the logs, is the place for it). Bounded: a request with thousands
    of parameters is refused, and its record keeps the first :data:`MAX_AUDITED_PARAMS`."""
    return [[k[:MAX_AUDITED_VALUE], v[:MAX_AUDITED_VALUE]] for k, v in pairs[:MAX_AUDITED_PARAMS]]


async def audit_failure(api: FhirApi, *, principal: Principal | None, method: str, path: str,
                        pairs: list[tuple[str, str]], status: int, reason: str) -> None:
    """Record a refused or failed access (401, 403, 400, 404, 5xx...) before its answer is sent
    (issue 11, item 23: an audit trail that misses refusals misses attacks). ``actor`` is the
    token's subject, or ``anonymous`` when no token verified. A failure to record is logged and
    the error answer is still sent (there is nothing to withhold)."""
    parts = path.removeprefix("/fhir/").split("/")
    details: dict[str, object] = {"method": method, "path": path[:MAX_AUDITED_VALUE], "status": status,
                                  "reason": reason[:1000], "params": audited_params(pairs)}
    if len(pairs) > MAX_AUDITED_PARAMS:
        details["params_dropped"] = len(pairs) - MAX_AUDITED_PARAMS
    try:
        await api.record_access(action="fhir.refused" if status < 500 else "fhir.failed",
                                 actor=principal.subject if principal else "anonymous",
                                 entity_type=parts[0][:64] if parts and parts[0] else "",
                                 entity_id=parts[1][:64] if len(parts) > 1 else "", outcome="failure",
                                 details=details)
    except AuditUnavailable:
        log.error("could not record a refused access (%d) in the audit trail", status)


def failure_reason(err: Exception) -> str:
    """What the audit trail records as the reason of an error (the real one, e.g. for a 404 that hides a refusal)."""
    return str(getattr(err, "audit_reason", None) or err)


def version_headers(row_version: int, last_updated: datetime) -> dict[str, str]:
    """ETag and Last-Modified of one version."""
    return {"ETag": f'W/"{row_version}"',
            "Last-Modified": utc(last_updated).strftime("%a, %d %b %Y %H:%M:%S GMT")}


def page_url(base: str, rtype: str, pairs: list[tuple[str, str]], offset: int) -> str:
    """The URL of a search page: the request's parameters with ``_offset`` replaced."""
    kept = [(k, v) for k, v in pairs if k != "_offset"]
    if offset:
        kept.append(("_offset", str(offset)))
    return f"{base}/{rtype}" + ("?" + urlencode(kept) if kept else "")


def error_response(err: FhirError) -> Response:
    """The OperationOutcome of an error (the one place a FhirError becomes an HTTP status)."""
    resp = operation_outcome(err.status_code, err.issue_code, str(err))
    if err.status_code == 401:
        resp.headers.update({"WWW-Authenticate": 'Bearer realm="taqrir"'})
    return resp


async def read_resource(api: FhirApi, principal: Principal, rtype: str, resource_id: str, *,
                        if_none_match: str | None = None) -> Response:
    """Read the current version of ``rtype/resource_id`` (scope ``r``, compartment, audited).
    ``If-None-Match`` naming the current version gets 304 without a body (R4 http.html#cread)."""
    principal.require(rtype, "r")
    row = await api.current(rtype, resource_id)
    check_compartment(principal, row, "r")
    await api.record_access(action="fhir.read", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                             details={"version": row.version_id})
    headers = version_headers(row.version_id, row.last_updated)
    if not_modified(if_none_match, row.version_id):
        return Response(status_code=304, headers=headers)
    return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=headers)


async def search_resources(api: FhirApi, principal: Principal, rtype: str, pairs: list[tuple[str, str]], *,
                           receive: Receive | None = None) -> Response:
    """Search ``rtype`` (scope ``s``): Bundle searchset with total and next/previous links, audited.

    A general search (SQL in a worker thread) is cancelled in the database when the client goes
    away (``receive`` reports ``http.disconnect``): without that, an abandoned search ran on for
    minutes (issue 11, item 14). The hot one-patient search is bounded and fast, and skips the watch."""
    principal.require(rtype, "s")
    q = parse_search(rtype, pairs, local_zone=api.study_timezone)
    q.count = min(q.count, api.settings.api.page_max)
    if not principal.unrestricted(rtype, "s"):
        if rtype == "Patient":
            q.ids.append((str(principal.patient),))
        else:
            q.patients.append((f"Patient/{principal.patient}",))
    for inc in q.include:
        principal.require("Patient" if inc.endswith(("subject", "patient")) else "ImagingStudy", "r")
    for _ in q.revinclude:
        principal.require("Provenance", "r")
    result: SearchResult
    if api.pg is not None and api.pg.serves(q):
        result = await api.pg.search(q)
    else:
        result = await api.query(lambda conn: run_search(conn, q), receive=receive)
    links = [("self", page_url(api.base_url, rtype, pairs, q.offset))]
    if not q.summary_count:
        if q.offset + q.count < result.total and q.count > 0:
            links.append(("next", page_url(api.base_url, rtype, pairs, q.offset + q.count)))
        if q.offset > 0:
            links.append(("previous", page_url(api.base_url, rtype, pairs, max(0, q.offset - q.count))))
    entries = [(m.resource_type, m.id, m.json_text, "match") for m in result.matches]
    entries += [(i.resource_type, i.id, i.json_text, "include") for i in result.included]
    await api.record_access(action="fhir.search", actor=principal.subject, entity_type=rtype,
                             details={"params": audited_params(pairs), "total": result.total,
                                      "returned": [f"{m.resource_type}/{m.id}/_history/{m.version_id}"
                                                   for m in result.matches],
                                      "included": [f"{i.resource_type}/{i.id}" for i in result.included]})
    body = bundle_body(bundle_type="searchset", base_url=api.base_url, total=result.total, links=links,
                       entries=entries, mode=api.mode)
    return fhir_response(body)
