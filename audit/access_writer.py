"""Audit records of accesses (reads, searches), written by group commit.

Every access the FHIR API serves is recorded in the audit chain *before* its response is sent:
the request hands its event to an :class:`AccessRecorder` and waits until the transaction holding
it has committed; if that fails, :class:`AccessNotRecorded` is raised (the API answers 503) and
nothing is returned unaudited.

Events that arrive while a batch is being written form the next batch (group commit, as
PostgreSQL does for WAL): one chain lock and one commit serve many requests instead of serialising
every request on the chain lock. Within a batch, the events of one caller, action and outcome
become one chain record (:func:`chain_events`): ``entity_type`` the resource type (``*`` when
mixed), ``entity_id`` the id when the record holds one event, and ``details.events`` every event.
At low load that is one record per request; under load a busy caller's concurrent requests share
a record. The writer lingers ``linger_s`` after the first event of a batch for others to join it,
because a batch costs about the same whatever it holds (measurements: ``bench/README.md``).

There is one batching loop (:class:`_Batcher`, a task on the event loop of the requests that
record); the databases differ only in how a batch is appended (:class:`BatchAppender`):

- PostgreSQL (:class:`AsyncpgAppender`): awaited on the event loop over one asyncpg connection of
  its own (chain lock, head read, INSERT, commit), so no thread takes the GIL back from the busy
  loop for each round trip.
- SQLite (:class:`SessionAppender`): :func:`audit.chain.record_many` in an ORM session, in a worker
  thread (SQLite is a blocking library; its ``BEGIN IMMEDIATE`` hook serialises writers).

State changes (publish, review) do not come here: they record in their own transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import anyio.to_thread
import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import Engine

from ground.clock import utcnow
from ground.db import session_scope
from ground.errors import TransientError
from reporting.fhir.timing import instant

from .chain import ChainEvent, chain_sql, link, record_many

log = logging.getLogger(__name__)

#: What asyncpg raises when a connection is lost (a database restart, a killed backend) rather
#: than when the server answers with an error: the connection is dropped and the work run again.
CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError, OSError)


def asyncpg_dsn(engine: Engine) -> str:
    """The libpq-style URL asyncpg connects with, for the database of a SQLAlchemy engine."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class AccessNotRecorded(TransientError):
    """An access could not be committed to the audit trail (the caller must not answer it)."""


class AccessRecorder(Protocol):
    """Where the API records accesses: :meth:`record` returns once the record is committed."""

    async def record(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
                     details: dict[str, Any] | None = None, outcome: str = "success") -> None:
        """Record one access; raises :class:`AccessNotRecorded` if it could not be committed."""

    async def aclose(self) -> None:
        """Write what is pending and release the writer's connection (on the loop that used it)."""


class BatchAppender(Protocol):
    """How one database appends a batch of chain events in one transaction (bound to one event loop)."""

    async def append(self, events: Sequence[ChainEvent]) -> None:
        """Append ``events`` in order and commit (raise on failure: every waiter hears of it)."""

    async def aclose(self) -> None:
        """Release what the appender holds."""


@dataclass
class _Event:
    fields: dict[str, Any]
    done: asyncio.Future[None]
    queued_at: float = field(default_factory=time.monotonic)


def chain_events(fields: Sequence[dict[str, Any]]) -> list[ChainEvent]:
    """The chain records of a batch: one per (caller, action, outcome), each listing its events in order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for f in fields:
        groups.setdefault((f["actor"], f["action"], f["outcome"]), []).append(f)
    events = []
    for (actor, action, outcome), items in groups.items():
        types = {i["entity_type"] for i in items}
        events.append(ChainEvent(
            action=action,
            actor=actor,
            entity_type=types.pop() if len(types) == 1 else "*",
            entity_id=items[0]["entity_id"] if len(items) == 1 else "",
            outcome=outcome,
            details={"events": [
                {"at": i["at"], "entity_type": i["entity_type"], "entity_id": i["entity_id"], **i["details"]}
                for i in items
            ]},
        ))
    return events


class _Batcher:
    """The batching loop of one event loop: a task that appends what is pending, batch by batch."""

    def __init__(self, appender: BatchAppender, *, max_batch: int, linger_s: float, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._appender = appender
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._timeout_s = timeout_s
        self._pending: list[_Event] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, event: _Event) -> None:
        self._pending.append(event)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="access-audit")

    async def _run(self) -> None:
        while self._pending:
            # Linger: let the events of the next few milliseconds join this batch.
            delay = self._pending[0].queued_at + self._linger_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            batch = self._pending[:self._max_batch]
            del self._pending[:len(batch)]
            failure: BaseException | None = None
            try:
                await self._appender.append(chain_events([e.fields for e in batch]))
            except Exception as err:
                log.error("could not write %d access audit records: %s", len(batch), type(err).__name__)
                failure = err
            for event in batch:
                if event.done.done():  # a waiter that gave up
                    continue
                if failure is None:
                    event.done.set_result(None)
                else:
                    event.done.set_exception(failure)

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task], timeout=self._timeout_s)
        await self._appender.aclose()


class AccessWriter:
    """The :class:`AccessRecorder` of one API process: a batching loop per event loop that records
    (in practice the server's one loop; a server restarted in the same process gets a new one)."""

    def __init__(self, new_appender: Callable[[], BatchAppender], *, max_batch: int = 500,
                 timeout_s: float = 30.0, linger_s: float = 0.0) -> None:
        self._new_appender = new_appender
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        self._batcher: _Batcher | None = None

    async def record(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
                     details: dict[str, Any] | None = None, outcome: str = "success") -> None:
        """Record one access and return once it is committed (raises :class:`AccessNotRecorded`)."""
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = _Batcher(self._new_appender(), max_batch=self._max_batch, linger_s=self._linger_s,
                                     timeout_s=self._timeout_s)
        event = _Event({"action": action, "actor": actor, "entity_type": entity_type, "entity_id": entity_id,
                        "details": details or {}, "at": instant(utcnow()), "outcome": outcome}, loop.create_future())
        self._batcher.submit(event)
        try:
            async with asyncio.timeout(self._timeout_s):
                await event.done
        except Exception as err:
            raise AccessNotRecorded("the access could not be recorded in the audit trail; try again") from err

    async def aclose(self) -> None:
        """Write what is pending and close the writer's connection (on the loop that used it)."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None and batcher.loop is asyncio.get_running_loop():
            await batcher.aclose()


class SessionAppender:
    """Appends a batch with :func:`audit.chain.record_many` in an ORM session, in a worker thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _append_sync(self, events: Sequence[ChainEvent]) -> None:
        with session_scope(self._engine) as session:
            record_many(session, events)

    async def append(self, events: Sequence[ChainEvent]) -> None:
        await anyio.to_thread.run_sync(self._append_sync, events)

    async def aclose(self) -> None:
        return None


_ASYNCPG_CHAIN = chain_sql(asyncpg_dialect())  # type: ignore[no-untyped-call]


class AsyncpgAppender:
    """Appends a batch over one asyncpg connection of its own, awaited on the event loop.

    The connection is not pinged (a ping is a round trip per batch). A batch that finds it dead
    (a database restart) is written again on a fresh one; should the first commit have got
    through, the accesses are recorded twice, never lost. A batch whose prepared statements a
    schema change invalidated is written again once as well."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def append(self, events: Sequence[ChainEvent]) -> None:
        sql = _ASYNCPG_CHAIN
        for attempt in (1, 2):
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn)
            conn = self._conn
            try:
                async with conn.transaction():
                    await conn.execute(sql.lock, *sql.lock_params)
                    head = await conn.fetchrow(sql.head)
                    rows = link((head[0], head[1]) if head else None, events)
                    await conn.executemany(sql.insert, [sql.params(r) for r in rows])
                return
            except asyncpg.InvalidCachedStatementError:
                if attempt == 2:
                    raise
            except CONNECTION_LOST:
                self._conn = None
                if not conn.is_closed():
                    conn.terminate()
                if attempt == 2:
                    raise
                log.warning("audit connection lost; writing the batch again on a fresh one")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()


def access_writer(engine: Engine, *, linger_s: float = 0.0, max_batch: int = 500,
                  timeout_s: float = 30.0) -> AccessWriter:
    """The access writer for ``engine``'s database: asyncpg on PostgreSQL, the ORM session elsewhere."""
    new_appender: Callable[[], BatchAppender]
    if engine.dialect.name == "postgresql":
        new_appender = partial(AsyncpgAppender, asyncpg_dsn(engine))
    else:
        new_appender = partial(SessionAppender, engine)
    return AccessWriter(new_appender, max_batch=max_batch, timeout_s=timeout_s, linger_s=linger_s)
