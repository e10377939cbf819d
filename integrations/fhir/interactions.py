"""What the read and search interactions do, once, whichever door the request came in by.

:mod:`integrations.fhir.app` (FastAPI routes) and :mod:`integrations.fhir.fastpath` (the ASGI
layer in front of them for the hot requests) both call :func:`read_resource` and
:func:`search_resources` and turn errors into responses with :func:`error_response`: the scope
checks, patient compartment, SQL, audit record, body and headers cannot drift apart between the
two paths because there is only one of each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool
from starlette.responses import Response

from taqrir.db import make_engine
from taqrir.settings import Settings

from .access_log import AccessAuditor
from .auth import Principal, TokenVerifier
from .errors import FhirError, Forbidden
from .pgreads import PgReads
from .responses import bundle_body, fhir_response, operation_outcome, resource_body
from .search import SearchResult, run_search
from .search_params import parse_search
from .store import CurrentRow, FhirResource, fetch_current, utc

log = logging.getLogger(__name__)

T = TypeVar("T")


class FhirApi:
    """What the interactions need: settings, engine, token verifier, auditor and the read paths."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.base_url = settings.api.base_url.rstrip("/")
        self.mode = settings.api.response_mode
        self.verifier = TokenVerifier(settings.api, settings.data_dir)
        self.auditor = AccessAuditor(engine, linger_s=settings.api.audit_linger_ms / 1000)
        try:
            self.study_timezone = ZoneInfo(settings.api.study_timezone)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"api.study_timezone {settings.api.study_timezone!r} is not an IANA zone") from err
        # Reads on PostgreSQL run in autocommit (no BEGIN/COMMIT round trips for a single SELECT) on
        # a pool of their own without pre-ping (a ping is one more round trip per request): a
        # connection that died meanwhile fails its query, is dropped by the pool, and the read is
        # run again once (:meth:`_query_sync`). SQLite keeps its transactions (the engine's BEGIN
        # IMMEDIATE hook owns them). The hot reads (current version, one patient's search page)
        # run on the event loop instead (:class:`~integrations.fhir.pgreads.PgReads`).
        self._read_engine: Engine | None = None
        self.pg: PgReads | None = None
        if engine.dialect.name == "postgresql":
            size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 10
            self._read_engine = make_engine(engine.url.render_as_string(hide_password=False), pool_pre_ping=False,
                                            isolation_level="AUTOCOMMIT", pool_size=size, max_overflow=size)
            self.pg = PgReads(engine, max_size=size)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for the read-only work of one request (Core, no ORM unit of work)."""
        if self._read_engine is None:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._read_engine.connect() as conn:
                yield conn

    async def aclose(self) -> None:
        """Close the read pools and the audit writer's connection (the engine passed in belongs to the caller)."""
        await self.auditor.aclose()
        if self.pg is not None:
            await self.pg.close()
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

    async def current(self, resource_type: str, resource_id: str) -> CurrentRow:
        """The current version (:func:`~integrations.fhir.store.fetch_current`), or NotFound."""
        if self.pg is not None:
            return await self.pg.current(resource_type, resource_id)
        return await self.query(lambda conn: fetch_current(conn, resource_type, resource_id))


def check_compartment(principal: Principal, row: FhirResource | CurrentRow, perm: str) -> None:
    """:class:`Forbidden` unless a user/system scope grants ``perm`` or the row is in the token's patient compartment."""
    if principal.unrestricted(row.resource_type, perm):
        return
    if row.patient_ref != f"Patient/{principal.patient}":
        raise Forbidden(f"{row.resource_type}/{row.id} is outside the token's patient compartment")


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


async def read_resource(api: FhirApi, principal: Principal, rtype: str, resource_id: str) -> Response:
    """Read the current version of ``rtype/resource_id`` (scope ``r``, compartment, audited)."""
    principal.require(rtype, "r")
    row = await api.current(rtype, resource_id)
    check_compartment(principal, row, "r")
    await api.auditor.record(action="fhir.read", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                             details={"version": row.version_id})
    return fhir_response(resource_body(rtype, row.json_text, api.mode),
                         headers=version_headers(row.version_id, row.last_updated))


async def search_resources(api: FhirApi, principal: Principal, rtype: str, pairs: list[tuple[str, str]]) -> Response:
    """Search ``rtype`` (scope ``s``): Bundle searchset with total and next/previous links, audited."""
    principal.require(rtype, "s")
    q = parse_search(rtype, pairs)
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
        result = await api.query(lambda conn: run_search(conn, q))
    links = [("self", page_url(api.base_url, rtype, pairs, q.offset))]
    if not q.summary_count:
        if q.offset + q.count < result.total and q.count > 0:
            links.append(("next", page_url(api.base_url, rtype, pairs, q.offset + q.count)))
        if q.offset > 0:
            links.append(("previous", page_url(api.base_url, rtype, pairs, max(0, q.offset - q.count))))
    entries = [(m.resource_type, m.id, m.json_text, "match") for m in result.matches]
    entries += [(i.resource_type, i.id, i.json_text, "include") for i in result.included]
    await api.auditor.record(action="fhir.search", actor=principal.subject, entity_type=rtype,
                             details={"params": sorted({k for k, _ in pairs}), "total": result.total,
                                      "returned": [f"{m.resource_type}/{m.id}/_history/{m.version_id}"
                                                   for m in result.matches],
                                      "included": [f"{i.resource_type}/{i.id}" for i in result.included]})
    body = bundle_body(bundle_type="searchset", base_url=api.base_url, total=result.total, links=links,
                       entries=entries, mode=api.mode)
    return fhir_response(body)
