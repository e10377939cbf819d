"""The API's hot reads on PostgreSQL, run with asyncpg on the event loop.

Why: a read of the current version and a search of one patient's reports are nearly every request
the API serves. Run through SQLAlchemy in a worker thread, each paid a thread hop, SQLAlchemy's
per-execution work (cache key, execution context, result metadata) and GIL hand-offs between the
loop and the thread: about a fifth of the server's CPU in a profile of ``bench/fhir_api.py``.
Here the same SQL runs on a connection awaited on the event loop. asyncpg rather than psycopg's
async mode because it costs less client CPU per query (psycopg's waiting is Python generators and
futures per round trip; figures in ``bench/README.md``); asyncpg prepares each statement once per
connection and keeps it (statement cache).

The SQL is not written twice: each statement is built by the store's/search's own SQLAlchemy
functions (:data:`integrations.fhir.store._CURRENT`, :func:`integrations.fhir.search.page_statement`,
:func:`~integrations.fhir.search.count_statement`) and rendered once by SQLAlchemy's PostgreSQL
dialect for asyncpg, so it is the text the general path executes, with ``$n`` placeholders.

Only the shapes :meth:`PgReads.serves` accepts are run here; every other search runs the general
:func:`~integrations.fhir.search.run_search` in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from audit.access_writer import CONNECTION_LOST

from .errors import NotFound, QueryTooCostly
from .search import Row, SearchResult, count_statement, page_statement
from .search_params import SearchQuery
from .store import _CURRENT, CurrentRow

log = logging.getLogger(__name__)

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]

class _Rendered:
    """A statement rendered once for asyncpg, and where each of its values goes.

    ``slots`` maps our names to the values the statement was built with (sentinels no real query
    carries, or None for named bind parameters): the positional parameter that carries a slot's
    sentinel is the one that takes that slot's value on execution."""

    def __init__(self, stmt: ClauseElement, slots: Mapping[str, Any]) -> None:
        compiled = stmt.compile(dialect=_DIALECT)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise RuntimeError(f"{stmt} did not render with positional parameters")
        self.sql = str(compiled)
        names = list(compiled.positiontup)
        name_of_slot = {slot: slot if sentinel is None else
                        next((n for n in names if compiled.params[n] == sentinel), "") for slot, sentinel in slots.items()}
        if sorted(name_of_slot.values()) != sorted(names):
            raise RuntimeError(f"parameters {names} of {self.sql!r} do not match the slots {name_of_slot}")
        slot_of_name = {name: slot for slot, name in name_of_slot.items()}
        self._order = [slot_of_name[name] for name in names]

    def args(self, **values: Any) -> list[Any]:
        return [values[slot] for slot in self._order]


# Sentinels: values no real query carries, each distinct.
_TYPE, _PATIENT, _COUNT, _OFFSET = "\x00type", "\x00patient", 2_000_000_011, 2_000_000_013
_CURRENT_SQL = _Rendered(_CURRENT, {"rtype": None, "rid": None})
_TEMPLATE = SearchQuery(_TYPE, patients=[(_PATIENT,)], count=_COUNT, offset=_OFFSET)
_PAGE_SQL = _Rendered(page_statement(_TEMPLATE), {"rtype": _TYPE, "patient": _PATIENT, "count": _COUNT,
                                                  "offset": _OFFSET})
_COUNT_SQL = _Rendered(count_statement(_TEMPLATE), {"rtype": _TYPE, "patient": _PATIENT})


class _Pool:
    """A minimal pool of connections bound to one event loop.

    asyncpg's own pool resets every connection on release (one more round trip per request) and
    psycopg_pool's async pool cost more CPU per checkout (``bench/README.md``); this one is a list
    and a queue of waiters. A connection whose query failed other than with a PostgreSQL error
    (connection lost, cancelled mid-query) is closed rather than returned."""

    def __init__(self, dsn: str, max_size: int, server_settings: dict[str, str] | None = None) -> None:
        self._dsn = dsn
        self._max = max_size
        self._server_settings = server_settings or {}
        self._idle: list[asyncpg.Connection] = []
        self._size = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self.loop = asyncio.get_running_loop()

    async def acquire(self) -> asyncpg.Connection:
        while True:
            if self._idle:
                return self._idle.pop()
            if self._size < self._max:
                self._size += 1
                try:
                    return await asyncpg.connect(self._dsn, server_settings=self._server_settings)
                except BaseException:
                    self._size -= 1
                    self._hand(None)
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self.release(handed, reusable=True)
                    else:
                        self._hand(None)
                raise
            if conn is not None:
                return conn
            # None: a slot was freed; go round and open a connection in it

    def release(self, conn: asyncpg.Connection, *, reusable: bool) -> None:
        if not reusable or conn.is_closed() or conn.is_in_transaction():
            self._size -= 1
            if not conn.is_closed():
                conn.terminate()
            self._hand(None)
            return
        if not self._hand(conn):
            self._idle.append(conn)

    def _hand(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._size -= len(idle)
        for conn in idle:
            await conn.close()


class PgReads:
    """The hot reads of one API process (a pool per event loop, opened on first use)."""

    def __init__(self, dsn: str, max_size: int, statement_timeout_ms: int = 0) -> None:
        self._dsn = dsn
        self._max = max_size
        self._settings = {"statement_timeout": str(statement_timeout_ms)}
        self._pool: _Pool | None = None

    @staticmethod
    def serves(q: SearchQuery) -> bool:
        """Whether ``q`` is the hot search: one patient, default sort, a non-empty page, nothing else."""
        return (len(q.patients) == 1 and len(q.patients[0]) == 1 and q.count > 0 and not q.summary_count
                and not (q.ids or q.statuses or q.targets or q.dates or q.tokens or q.sort or q.include
                         or q.revinclude))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool.loop is not loop:
            self._pool = _Pool(self._dsn, self._max, self._settings)
        pool = self._pool
        conn = await pool.acquire()
        reusable = False
        try:
            yield conn
            reusable = True
        except asyncpg.PostgresError:
            reusable = True  # the server answered with an error: the connection is fine
            raise
        finally:
            pool.release(conn, reusable=reusable)

    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        # A pooled connection that died meanwhile (a database restart) fails its query and is
        # dropped; reads are idempotent, so the query runs again once on a fresh connection.
        for attempt in (1, 2):
            async with self._connection() as conn:
                try:
                    return await conn.fetch(sql, *args)  # type: ignore[no-any-return]
                except asyncpg.QueryCanceledError as err:  # statement_timeout (api.statement_timeout_ms)
                    raise QueryTooCostly("the read ran longer than the server allows (api.statement_timeout_ms) "
                                         "and was stopped") from err
                except CONNECTION_LOST:
                    if attempt == 2:
                        raise
                    log.warning("read connection lost; running the query again on a fresh one")
        raise AssertionError("unreachable")

    async def current(self, resource_type: str, resource_id: str) -> CurrentRow:
        """As :func:`integrations.fhir.store.fetch_current`."""
        rows = await self._fetch(_CURRENT_SQL.sql, _CURRENT_SQL.args(rtype=resource_type, rid=resource_id))
        if not rows:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        r = rows[0]
        return CurrentRow(resource_type, resource_id, r[0], r[1], r[2], r[3])

    async def search(self, q: SearchQuery) -> SearchResult:
        """As :func:`integrations.fhir.search.run_search`, for a query :meth:`serves` accepts."""
        if not self.serves(q):
            raise ValueError("not a query PgReads serves")
        rtype, patient = q.resource_type, q.patients[0][0]
        raw = await self._fetch(_PAGE_SQL.sql, _PAGE_SQL.args(rtype=rtype, patient=patient, count=q.count,
                                                             offset=q.offset))
        matches = [Row(r[0], r[1], r[2], r[3]) for r in raw]
        if raw:
            total = int(raw[0][4])
        elif q.offset == 0:
            total = 0
        else:
            counted = await self._fetch(_COUNT_SQL.sql, _COUNT_SQL.args(rtype=rtype, patient=patient))
            total = int(counted[0][0])
        return SearchResult(total, matches, [])

    async def close(self) -> None:
        """Close the idle connections (at shutdown, on the loop that used them)."""
        pool, self._pool = self._pool, None
        if pool is not None and pool.loop is asyncio.get_running_loop():
            await pool.close()
