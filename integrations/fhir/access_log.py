"""Audit records of reads and searches, written by group commit.

Every read, vread, history and search is recorded in the audit chain (:func:`audit.chain.record`)
*before* its response is sent: the request thread hands its event to :class:`AccessAuditor` and
waits until the transaction holding it has committed; if that fails, the request fails (503) and
nothing is returned unaudited.

Events that arrive while a batch is being written form the next batch (group commit, as
PostgreSQL does for WAL): one chain lock and one commit serve many requests instead of serialising
every request on the chain lock. Within a batch, the events of one caller and one action become
one chain record: ``actor`` = the caller, ``action`` = ``fhir.read`` / ``fhir.vread`` /
``fhir.history`` / ``fhir.search``, ``entity_type`` the resource type (``*`` when mixed),
``entity_id`` the id when the record holds one event, and ``details.events`` every event (what was
returned, which versions, when). At low load that is one record per request; under load a busy
caller's concurrent requests share a record. A batch is appended as :func:`audit.chain.record_many`
does it (one chain lock, one head read, one INSERT, one commit; records built by
:func:`audit.chain.link`).

The writer lingers: after the first event of a batch it waits ``linger_s`` (``api.audit_linger_ms``,
5 ms by default) for others to join it. A batch costs about the same whatever it holds (chain
lock, head read, INSERT, commit, in the API process and in PostgreSQL), and at a paced load most
requests arrive while the writer is idle, so without it nearly every request paid for a batch of
its own. A response still waits for the commit of its record, so the linger is a floor under
every read's latency: at 500 req/s, 10 ms gave p50 10.4-10.7 ms and p99 17.1-17.5 ms, 5 ms gave
7.3-7.7 and 11.4-13.5 ms, 2 and 0 ms no better p99 for more CPU per request.

Where the writer runs depends on the database:

- PostgreSQL: on the event loop itself (:class:`_LoopWriter`), a task that appends each batch
  over one asyncpg connection of its own (lock, head, INSERT, commit, awaited like the hot reads
  of :mod:`~integrations.fhir.pgreads`). It used to be a thread with a SQLAlchemy connection, where
  each of a batch's five round trips ended with the thread taking the GIL back from the busy event
  loop, and each batch woke the loop from another thread. Measured in ``bench/fhir_api.py`` on the
  same database at 500 req/s, the loop writer costs less server CPU per request (0.94 against 1.09
  ms with a 2 ms linger, 1.13 against 1.25 ms with none); p99 was the same within run-to-run noise
  on that machine. (On a slower machine, earlier, requests waited a median 19-32 ms for the
  thread's commit; how much of that was GIL hand-offs was not measured there.)
- SQLite: a thread (SQLite is a blocking library; its ``BEGIN IMMEDIATE`` hook serialises writers).
  Requests wait on the event loop (:meth:`AccessAuditor.record` is a coroutine) and the thread
  wakes each loop once per batch.

State changes (publish, review) do not come here: they record in their own transaction.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import Engine

from audit.chain import ChainEvent, chain_sql, link, record_many
from reporting.fhir.timing import instant
from ground.clock import utcnow
from ground.db import session_scope

from .errors import AuditUnavailable
from .pgreads import CONNECTION_LOST, asyncpg_dsn

log = logging.getLogger(__name__)


@dataclass
class _Event:
    fields: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None] = field(init=False)
    queued_at: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()


def chain_events(batch: Sequence[_Event]) -> list[ChainEvent]:
    """The chain records of a batch: one per (caller, action), each listing its events in order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for event in batch:
        f = event.fields
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


def _settle(futures: list[asyncio.Future[None]], err: BaseException | None) -> None:
    """Runs on the waiters' loop: wake every waiter of a batch (a waiter that gave up is skipped)."""
    for fut in futures:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


class AccessAuditor:
    """Group-commit writer of access events for one engine (one per API process)."""

    def __init__(self, engine: Engine, *, max_batch: int = 500, timeout_s: float = 30.0, linger_s: float = 0.0) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        # PostgreSQL: a writer on each event loop that records (in practice the server's one loop).
        self._dsn: str | None = None
        if engine.dialect.name == "postgresql":
            self._dsn = asyncpg_dsn(engine)
        self._loop_writer: _LoopWriter | None = None
        # SQLite: the writer thread.
        self._queue: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the writer thread (SQLite; idempotent). PostgreSQL's writer starts on the first record."""
        if self._dsn is not None:
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fhir-access-audit", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Write what is pending, then stop the writer thread (SQLite; PostgreSQL: :meth:`aclose`)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=self._timeout_s)

    async def aclose(self) -> None:
        """Write what is pending and close the PostgreSQL writer's connection (on the loop that used it)."""
        writer, self._loop_writer = self._loop_writer, None
        if writer is not None and writer.loop is asyncio.get_running_loop():
            await writer.aclose()

    async def record(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
                     details: dict[str, Any] | None = None, outcome: str = "success") -> None:
        """Record one access and return once it is committed (raises :class:`AuditUnavailable`)."""
        loop = asyncio.get_running_loop()
        event = _Event({"action": action, "actor": actor, "entity_type": entity_type, "entity_id": entity_id,
                        "details": details or {}, "at": instant(utcnow()), "outcome": outcome}, loop)
        if self._dsn is not None:
            if self._loop_writer is None or self._loop_writer.loop is not loop:
                self._loop_writer = _LoopWriter(self._dsn, max_batch=self._max_batch, linger_s=self._linger_s,
                                                timeout_s=self._timeout_s)
            self._loop_writer.submit(event)
        else:
            if self._thread is None or not self._thread.is_alive():
                self.start()
            self._queue.put(event)
        try:
            async with asyncio.timeout(self._timeout_s):
                await event.done
        except Exception as err:
            raise AuditUnavailable("the access could not be recorded in the audit trail; try again") from err

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            # Linger: let the events of the next few milliseconds join this batch. Sleeping, not
            # waiting on the queue, so that each arrival does not wake this thread (and take the
            # GIL from the event loop) only to wait again.
            delay = first.queued_at + self._linger_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[_Event]) -> None:
        failure: BaseException | None = None
        try:
            with session_scope(self._engine) as session:
                record_many(session, chain_events(batch))
        except Exception as err:  # noqa: BLE001 - every waiter must hear about any failure
            log.error("could not write %d access audit records: %s", len(batch), type(err).__name__)
            failure = err
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for event in batch:
            by_loop.setdefault(event.loop, []).append(event.done)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, futures, failure)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                continue


_ASYNCPG_CHAIN = chain_sql(asyncpg_dialect())  # type: ignore[no-untyped-call]


class _LoopWriter:
    """The PostgreSQL writer of one event loop: a task appends each batch over asyncpg.

    It keeps one connection of its own (not pinged: a ping is a round trip per batch). A batch
    that finds it dead (a database restart) is written again on a fresh one; should the first
    commit have got through, the accesses are recorded twice, never lost. A batch whose prepared
    statements a schema change invalidated is written again once as well."""

    def __init__(self, dsn: str, *, max_batch: int, linger_s: float, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._dsn = dsn
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._timeout_s = timeout_s
        self._pending: list[_Event] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    def submit(self, event: _Event) -> None:
        self._pending.append(event)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="fhir-access-audit")

    async def _run(self) -> None:
        while self._pending:
            delay = self._pending[0].queued_at + self._linger_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            batch = self._pending[:self._max_batch]
            del self._pending[:len(batch)]
            failure: BaseException | None = None
            try:
                await self._append(chain_events(batch))
            except Exception as err:  # noqa: BLE001 - every waiter must hear about any failure
                log.error("could not write %d access audit records: %s", len(batch), type(err).__name__)
                failure = err
            _settle([e.done for e in batch], failure)

    async def _append(self, events: list[ChainEvent]) -> None:
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
        if self._task is not None:
            await asyncio.wait([self._task], timeout=self._timeout_s)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()
