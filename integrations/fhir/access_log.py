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
caller's concurrent requests share a record. A batch is appended with
:func:`audit.chain.record_many` (one chain lock, one head read, one INSERT, one commit).

The writer lingers: after the first event of a batch it waits ``linger_s`` (``api.audit_linger_ms``,
10 ms by default) for others to join it. A batch costs about the same whatever it holds (chain
lock, head read, INSERT, commit: 1.5-4 ms of the API process's CPU on the benchmark machine, and
PostgreSQL's), and at a paced load most requests arrive while the writer is idle, so without it
nearly every request paid for a batch of its own. A response still waits for the commit of its record; the
linger bounds what that adds. On PostgreSQL the writer keeps one connection checked out and runs
each batch as a transaction on it.

Requests wait on the event loop (:meth:`AccessAuditor.record` is a coroutine): no thread is held
while a batch commits, and the writer thread wakes each loop once per batch. State changes
(publish, review) do not come here: they record in their own transaction.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from audit.chain import AuditEvent, record_many
from reporting.fhir.timing import instant
from taqrir.db import make_engine, session_scope, utcnow

from .errors import AuditUnavailable

log = logging.getLogger(__name__)


@dataclass
class _Event:
    fields: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None] = field(init=False)
    queued_at: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()


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
        # PostgreSQL: the one writer thread keeps one connection of its own, not pinged before each
        # batch (a ping is a round trip per batch); a batch that finds it dead is written again on a
        # fresh one (_write). SQLite: the engine as given (its BEGIN IMMEDIATE hook serialises writers).
        self._engine = engine
        self._own_engine = engine.dialect.name == "postgresql"
        if self._own_engine:
            self._engine = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1,
                                       max_overflow=0, pool_pre_ping=False)
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        self._queue: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: Connection | None = None  # PostgreSQL: the writer thread's own

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fhir-access-audit", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Write what is pending, then stop the writer thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=self._timeout_s)
        if self._own_engine:
            self._engine.dispose()

    async def record(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
                     details: dict[str, Any] | None = None) -> None:
        """Record one access and return once it is committed (raises :class:`AuditUnavailable`)."""
        if self._thread is None or not self._thread.is_alive():
            self.start()
        event = _Event({"action": action, "actor": actor, "entity_type": entity_type, "entity_id": entity_id,
                        "details": details or {}, "at": instant(utcnow())}, asyncio.get_running_loop())
        self._queue.put(event)
        try:
            async with asyncio.timeout(self._timeout_s):
                await event.done
        except Exception as err:
            raise AuditUnavailable("the access could not be recorded in the audit trail; try again") from err

    def _run(self) -> None:
        try:
            self._run_batches()
        finally:
            self._drop_connection()

    def _run_batches(self) -> None:
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

    def _append(self, events: list[AuditEvent]) -> None:
        if not self._own_engine:
            with session_scope(self._engine) as session:
                record_many(session, events)
            return
        # PostgreSQL: the writer thread's connection stays checked out, and each batch is a
        # transaction on it with a Session joined to it; a Session, pool checkout and ORM
        # transaction per batch (session_scope) cost about a quarter of a small batch's CPU.
        if self._conn is None:
            self._conn = self._engine.connect()
        with self._conn.begin(), Session(bind=self._conn) as session:
            record_many(session, events)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                log.debug("closing a dead audit connection failed", exc_info=True)

    def _write(self, batch: list[_Event]) -> None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for event in batch:
            f = event.fields
            groups.setdefault((f["actor"], f["action"]), []).append(f)
        events = []
        for (actor, action), items in groups.items():
            types = {i["entity_type"] for i in items}
            events.append(AuditEvent(
                action=action,
                actor=actor,
                entity_type=types.pop() if len(types) == 1 else "*",
                entity_id=items[0]["entity_id"] if len(items) == 1 else "",
                details={"events": [
                    {"at": i["at"], "entity_type": i["entity_type"], "entity_id": i["entity_id"], **i["details"]}
                    for i in items
                ]},
            ))
        failure: BaseException | None = None
        try:
            try:
                self._append(events)
            except DBAPIError as err:
                if not err.connection_invalidated:
                    raise
                # The connection had died (a database restart) and has been dropped: write the batch
                # on a fresh one. Should the commit itself have got through, the accesses are
                # recorded twice, never lost.
                self._drop_connection()
                self._append(events)
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
