"""The spool of small instances: one flush before the acknowledgement instead of three.

Filing an instance durably the plain way costs three flushes before Success may be answered: the
file's fsync, its directory's (the rename), and the index's commit. On this VM's ext4 they were
~1.0 ms of the ~3.1 ms a 9 kB instance took on one association (``bench/ingest.py``, tiny-1). A
small instance (up to ``listener.spool_max_bytes``; its writer keeps it in memory anyway) is
instead written into the index transaction that files it, as an :class:`~.index.InstanceSpool`
row: the commit's one flush makes the row and the bytes durable together. Then, before Success is
answered, the staged file is renamed under its key (no flush: readers find it at once), and after
the answer a :class:`Settler` makes the files durable, a batch at a time (``Storage.settle``: one
``syncfs`` on Linux, else each file's fsync and each folder's); their spool rows are then
deleted by the next ingest transaction (or by the settler when none comes).

So an acknowledged instance is always durable: as its file, or as its spool row. A crash (power
loss included) can leave spool rows whose files are missing, torn or not durable; :func:`recover`
writes each one back to its file, durably, and empties the spool. The listener runs it before it
serves (and :meth:`Settler.close` settles what is pending when it stops).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from storage import Storage, StorageFailure

log = logging.getLogger(__name__)

#: (staged path, or the bytes of one that stayed in memory; storage key; spool row id) of a placed
#: instance
Placed = tuple[Path | bytes, str, str]


class Settler:
    """Makes placed instances' files durable after their acknowledgement, then has their spool
    rows deleted, in batches, in a helper thread (per process: a forked child starts its own).

    ``batch_wait`` is how long it lets instances gather before settling them together (one
    ``Storage.settle`` per batch, :func:`settle`). A batch that fails is retried, rewriting the
    files from their spool rows (``retry_after`` seconds later); until then they stay durable as
    those rows.

    The rows of settled instances are not deleted in a transaction of their own: the next ingest
    transaction takes them (:meth:`take_settled`) and deletes them with its own writes, so that
    deleting costs neither a commit nor a wait for the write lock. Measured in-process (2,000
    small instances, SQLite, 2026-12-06): the settler's own delete transactions made every
    ingest wait for the write lock or share a flush with it, ~0.17 ms more per instance.
    Rows nobody takes within ``delete_after`` seconds (no instance arriving) are deleted here,
    as are those still queued when :meth:`flush` or :meth:`close` is called.

    With ``settled``, the instances' bytes are durable elsewhere (the intake journal,
    :mod:`.intake`) rather than as spool rows: the ids of each settled batch go to ``settled``
    instead, and a batch that fails to settle is left to the journal's replay.
    """

    def __init__(self, engine: Engine, storage: Storage, *, batch_wait: float = 0.05,
                 retry_after: float = 5.0, delete_after: float = 1.0,
                 settled: Callable[[Sequence[str]], None] | None = None) -> None:
        self.engine = engine
        self.storage = storage
        self._settled = settled
        self.batch_wait = batch_wait
        self.retry_after = retry_after
        self.delete_after = delete_after
        self._lock = threading.Condition()
        self._pending: list[Placed] = []
        self._settled_ids: list[str] = []  # settled, rows not deleted yet
        self._settled_since = 0.0
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: instances settled so far (the tests read it)
        self.settled = 0

    def add(self, placed: Sequence[Placed]) -> None:
        """Settle these placed instances (soon, in the helper thread)."""
        if not placed:
            return
        with self._lock:
            self._pending.extend(placed)
            self._ensure_thread()
            self._lock.notify_all()

    def take_settled(self) -> list[str]:
        """The spool rows of settled instances, for the caller's transaction to delete (give
        them back with :meth:`give_back` if it does not commit)."""
        with self._lock:
            ids, self._settled_ids = self._settled_ids, []
        return ids

    def give_back(self, ids: Sequence[str]) -> None:
        """Rows from :meth:`take_settled` that the caller's transaction did not delete."""
        if ids:
            with self._lock:
                if not self._settled_ids:
                    self._settled_since = time.monotonic()
                self._settled_ids[:0] = ids
                self._ensure_thread()
                self._lock.notify_all()

    def _queue_deletes(self, ids: Sequence[str]) -> None:
        with self._lock:
            if not self._settled_ids:
                self._settled_since = time.monotonic()
            self._settled_ids.extend(ids)

    def _delete_queued(self) -> None:
        ids = self.take_settled()
        if not ids:
            return
        try:
            delete_spooled(self.engine, ids)
        except Exception:  # they stay durable and settled; the rows go later, or at the next start
            log.exception("could not delete %d settled spool row(s); retried later", len(ids))
            self.give_back(ids)

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._closed = False
            self._thread = threading.Thread(target=self._loop, name="spool-settler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    if self._settled_ids:
                        left = self._settled_since + self.delete_after - time.monotonic()
                        if left <= 0:
                            break
                        self._lock.wait(left)
                    else:
                        self._lock.wait()
                if not self._pending:
                    if self._closed:
                        return
                    stale = True
                else:
                    stale = False
            if stale:  # nobody took them: an idle listener
                self._delete_queued()
                continue
            if self.batch_wait:
                time.sleep(self.batch_wait)
            with self._lock:
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                if settle(self.engine, self.storage, batch, retry_after=self.retry_after,
                          delete=self._settled or self._queue_deletes, rewrite=self._settled is None):
                    self.settled += len(batch)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything added so far is settled and its spool rows deleted (or
        ``timeout``); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return not (self._pending or self._busy)
                self._lock.wait(left)
        self._delete_queued()
        with self._lock:
            return not self._settled_ids

    def close(self, timeout: float = 30.0) -> None:
        """Settle what is pending, then stop the helper (a later :meth:`add` starts another)."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()


def settle(engine: Engine, storage: Storage, placed: Sequence[Placed], *, retry_after: float = 0.0,
           delete: Callable[[Sequence[str]], None] | None = None, rewrite: bool = True) -> bool:
    """Make placed instances' files durable, then delete their spool rows (or hand their ids to
    ``delete``: the :class:`Settler` queues them for the next ingest transaction). On failure,
    after ``retry_after`` seconds, write them back from their rows instead (:func:`write_back`;
    not with ``rewrite=False``: their bytes are durable elsewhere). Never raises; True when
    settled as placed."""
    try:
        storage.settle([(staged, key) for staged, key, _ in placed])
        ids = [spool_id for _, _, spool_id in placed]
        if delete is None:
            delete_spooled(engine, ids)
        else:
            delete(ids)
        return True
    except Exception:
        log.exception("could not settle %d spooled instance(s); they stay durable in the spool "
                      "(written back in %.0f s) or the intake journal (replayed)", len(placed), retry_after)
    if rewrite:
        time.sleep(retry_after)
        write_back(engine, storage, placed)
    return False


def write_back(engine: Engine, storage: Storage, placed: Sequence[Placed]) -> None:
    """Write placed (or meant to be placed) instances back from their spool rows (:func:`recover`),
    when placing or settling them failed. Never raises: what stays in the spool is written back
    when the listener next starts."""
    try:
        recover(engine, storage, ids=[spool_id for _, _, spool_id in placed])
    except Exception:
        log.exception("spooled instances not written back; `taqrir listen` does it when it starts")


def delete_rows(cursor: Any, placeholder: str, ids: Sequence[str]) -> None:
    """Delete these spool rows on a DBAPI cursor, in the caller's transaction (the ingest's:
    :meth:`Settler.take_settled`)."""
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        cursor.execute(f"DELETE FROM instance_spool WHERE id IN ({', '.join([placeholder] * len(chunk))})",
                       tuple(chunk))


def delete_spooled(engine: Engine, ids: Sequence[str]) -> None:
    # Only this row's removal: no other write, so no writer lock (SQLite: BEGIN IMMEDIATE is the
    # engine's; PostgreSQL: row locks suffice, nobody else writes spool rows it did not create).
    with engine.begin() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ", ".join(f":i{n}" for n in range(len(chunk)))
            conn.execute(text(f"DELETE FROM instance_spool WHERE id IN ({marks})"),
                         {f"i{n}": i for n, i in enumerate(chunk)})


def recover(engine: Engine, storage: Storage, *, ids: Sequence[str] | None = None) -> int:
    """Write spooled instances back to their files, durably (``storage.put``: fsync, rename,
    folder fsync), then delete their rows; ``ids`` limits it to those rows, else every row (the
    listener, before it serves). A row whose instance no longer points at its key (replaced since)
    or whose bytes do not hash to the instance's SHA-256 is only deleted. Returns how many files
    were written back."""
    query = ("SELECT sp.id, sp.storage_key, i.sha256 FROM instance_spool sp"
             " LEFT JOIN instance i ON i.sop_instance_uid = sp.sop_instance_uid"
             " AND i.storage_key = sp.storage_key")
    params: dict[str, str] = {}
    if ids is not None:
        if not ids:
            return 0
        query += f" WHERE sp.id IN ({', '.join(f':i{n}' for n in range(len(ids)))})"
        params = {f"i{n}": i for n, i in enumerate(ids)}
    with engine.connect() as conn:
        rows = conn.execute(text(query), params).all()
    restored = 0
    done: list[str] = []
    for spool_id, key, sha256 in rows:
        if sha256 is not None:
            with engine.connect() as conn:  # one blob at a time: a spool may hold many
                data = conn.execute(text("SELECT data FROM instance_spool WHERE id = :i"), {"i": spool_id}).scalar_one()
            if hashlib.sha256(data).hexdigest() == sha256:
                try:
                    storage.put(key, bytes(data))
                except StorageFailure:
                    log.exception("could not write spooled instance %s back; its row stays", key)
                    continue
                restored += 1
            else:
                log.warning("spooled bytes of %s do not match its instance row; row dropped", key)
        done.append(spool_id)
    if done:
        delete_spooled(engine, done)
    if restored:
        log.info("wrote %d spooled instance(s) back to their files", restored)
    return restored
