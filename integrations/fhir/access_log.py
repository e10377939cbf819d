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
caller's concurrent requests share a record. State changes (publish, review) do not come here:
they record in their own transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from audit.chain import record
from reporting.fhir.timing import instant
from taqrir.db import session_scope, utcnow

from .errors import AuditUnavailable

log = logging.getLogger(__name__)


@dataclass
class _Event:
    fields: dict[str, Any]
    done: Future[None] = field(default_factory=Future)


class AccessAuditor:
    """Group-commit writer of access events for one engine (one per API process)."""

    def __init__(self, engine: Engine, *, max_batch: int = 500, timeout_s: float = 30.0) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._queue: queue.Queue[_Event | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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

    def record(self, *, action: str, actor: str, entity_type: str, entity_id: str = "",
               details: dict[str, Any] | None = None) -> None:
        """Record one access and return once it is committed (raises :class:`AuditUnavailable`)."""
        self.start()
        event = _Event({"action": action, "actor": actor, "entity_type": entity_type, "entity_id": entity_id,
                        "details": details or {}, "at": instant(utcnow())})
        self._queue.put(event)
        try:
            event.done.result(timeout=self._timeout_s)
        except Exception as err:
            raise AuditUnavailable("the access could not be recorded in the audit trail; try again") from err

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
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
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for event in batch:
            f = event.fields
            groups.setdefault((f["actor"], f["action"]), []).append(f)
        try:
            with session_scope(self._engine) as session:
                for (actor, action), items in groups.items():
                    types = {i["entity_type"] for i in items}
                    record(
                        session,
                        action=action,
                        actor=actor,
                        entity_type=types.pop() if len(types) == 1 else "*",
                        entity_id=items[0]["entity_id"] if len(items) == 1 else "",
                        details={"events": [
                            {"at": i["at"], "entity_type": i["entity_type"], "entity_id": i["entity_id"], **i["details"]}
                            for i in items
                        ]},
                    )
        except Exception as err:  # noqa: BLE001 - every waiter must hear about any failure
            log.error("could not write %d access audit records: %s", len(batch), type(err).__name__)
            for event in batch:
                event.done.set_exception(err)
            return
        for event in batch:
            event.done.set_result(None)
