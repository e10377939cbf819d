"""Store one received instance: parse, hash, make durable, index, audit — in that order.

This is the service function behind the C-STORE handler; it knows nothing of pynetdicom. The
order is what makes an acknowledgement mean something: the file is durable and renamed into place
before the index row and its audit record commit, and only then does the caller answer Success.
A crash before the commit leaves at most an unindexed file that the sender will send again. (A
small instance the listener spools is the exception, with the same guarantee: its bytes commit
with its row, and its file is made durable after the answer; :mod:`.spool`.)

Where the time goes (300-slice CT, 0.5 MB per instance, one association, this shared 2-core VM,
``bench/ingest_index.py``, medians of one run with the previous version alongside): ingest_file
takes ~3.0 ms on SQLite and ~5.6 ms on PostgreSQL, down from ~10.9 and ~15.2 ms. What is left is
mostly the disk, fsyncs measured at the same time: the file's fsync (~1.1 ms; the storage starts
it while it hashes the file, ~0.5 ms), the rename and directory fsync (~0.4 ms), the commit (SQLite:
one WAL fsync with ``synchronous=FULL``, ~0.6 ms, kept: in WAL mode NORMAL may lose the last
commits on power loss, i.e. acknowledged instances would vanish from the index; PostgreSQL: its
WAL flush and, then, six round trips: pool pre-ping, BEGIN, lock, read, writes, COMMIT; four since the kept
connection of :class:`ground.db.WriterConnection`). The CPU part is
the header parse, ~0.2-0.3 ms (a raw walk, :mod:`.walk`, where the full pydicom parse took
~2 ms), and the index transaction, ~0.2 ms of driver SQL on a pooled DBAPI connection
(:mod:`.index`, :mod:`audit.chain`), where SQLAlchemy's session, statement construction, cache
keys and parameter processing took ~5 ms. Tried and left out: running the header parse beside
the fsync and hashing, and the rename beside the row writes, in helper threads (on two cores the
parse ran twice as slow and the hand-offs cost the rest: no gain), and psycopg's pipeline mode
(slower here than plain statements; one statement of data-modifying WITH clauses is what paid).

The listener files through :class:`Ingestor`: each association's thread does :func:`prepare`
(everything before the index lock) and hands the result to a group commit, so that concurrent
associations share one transaction, one fsync per folder and one WAL flush
(:func:`file_prepared`). Measured beside Orthanc in ``bench/ingest.py``; figures in
``bench/README.md``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from audit.chain import ChainEvent, link, record
from ground.db import WriterConnection, session_scope
from storage import Storage, StorageFailure, StoredFile, key_component

from .errors import DicomInputError, IdentifiersMissing, OutOfResources
from .group_commit import GroupCommit
from .headers import DEFAULT_MAX_SEQUENCE_DEPTH, InstanceHeaders, read_headers
from .index import (
    IndexResult,
    IndexSql,
    StoreOutcome,
    index_sql,
    plan_filing,
    read_state,
    run_writes,
)
from .spool import Placed, Settler, delete_rows, write_back
from .spool import settle as settle_now

log = logging.getLogger(__name__)


def instance_key(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Storage key of a received instance, by its UIDs and content: a replacement gets a new file,
    so the old one stays valid until the index points at the new one (no window where the row and
    the file disagree)."""
    return f"{key_component(study_uid)}/{key_component(series_uid)}/{key_component(sop_uid)}.{sha256[:16]}.dcm"


@dataclass(frozen=True)
class IngestResult:
    headers: InstanceHeaders
    stored: StoredFile
    outcome: StoreOutcome
    study_version: int
    new_version: bool


@dataclass(frozen=True)
class Prepared:
    """A received instance ready to be filed: parsed, checked, and its bytes durable (not yet
    visible under its key)."""

    staged: Path
    headers: InstanceHeaders
    stored: StoredFile
    calling_ae: str
    #: the bytes, when they go into the index's spool (:mod:`.spool`) instead of being fsynced
    #: before the commit; and that spool row's id
    spool: bytes | None = None
    spool_id: str = ""


def prepare(
    *,
    storage: Storage,
    staged: Path,
    calling_ae: str,
    announced_sop_instance_uid: str | None = None,
    announced_sop_class_uid: str | None = None,
    min_free_bytes: int = 0,
    max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH,
    spool_max_bytes: int = 0,
) -> Prepared:
    """Everything before the index transaction: hash, free-space check, header parse, the checks
    against what the C-STORE announced, and the file's fsync (started when it was handed over, so
    it overlaps the rest). An instance of up to ``spool_max_bytes`` that its writer kept in memory
    is not waited for: its bytes go into the index's spool (:mod:`.spool`). Raises what
    :func:`ingest_file` raises; indexes nothing."""
    handed = storage.hand_over(staged, sync_above=spool_max_bytes)
    size = handed.size
    if min_free_bytes and storage.free_bytes() - size < min_free_bytes:
        raise OutOfResources(
            f"only {storage.free_bytes() // (1 << 20)} MiB free in {storage.root}, below the "
            f"{min_free_bytes // (1 << 20)} MiB threshold; free space or raise listener.min_free_bytes"
        )
    headers = read_headers(staged, max_sequence_depth=max_sequence_depth, data=handed.data)
    if announced_sop_instance_uid and headers.sop_instance_uid != announced_sop_instance_uid:
        raise IdentifiersMissing(
            f"dataset SOP Instance UID {headers.sop_instance_uid} differs from the announced "
            f"{announced_sop_instance_uid}"
        )
    if announced_sop_class_uid and headers.sop_class_uid != announced_sop_class_uid:
        raise IdentifiersMissing(
            f"dataset SOP Class UID {headers.sop_class_uid} differs from the announced "
            f"{announced_sop_class_uid}"
        )
    key = instance_key(headers.study_instance_uid, headers.series_instance_uid,
                       headers.sop_instance_uid, handed.sha256)
    stored = StoredFile(key=key, size=size, sha256=handed.sha256)
    if handed.data is not None and size <= spool_max_bytes:
        return Prepared(staged, headers, stored, calling_ae, spool=handed.data, spool_id=os.urandom(16).hex())
    # The file's fsync (the slowest step) happens before the index lock, so that concurrent
    # associations overlap it; deciding whether to rename it into place, the rename and the
    # directory fsync stay under the lock (a replacement's obsolete file is removed by key).
    storage.sync_staged(staged)
    return Prepared(staged, headers, stored, calling_ae)


def ingest_file(
    *,
    engine: Engine,
    storage: Storage,
    staged: Path,
    calling_ae: str,
    announced_sop_instance_uid: str | None = None,
    announced_sop_class_uid: str | None = None,
    min_free_bytes: int = 0,
    max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH,
) -> IngestResult:
    """Store and index ``staged`` (a complete DICOM file in ``storage``'s filesystem), alone, on a
    connection of the engine's pool (the listener files through :class:`Ingestor` instead).

    Raises :class:`DicomInputError` subclasses for what the sender must hear about, and
    :class:`OutOfResources`/:class:`StorageFailure` when we cannot store safely. On any error the
    staged file is left for the caller to discard and nothing is indexed.
    """
    item = prepare(storage=storage, staged=staged, calling_ae=calling_ae,
                   announced_sop_instance_uid=announced_sop_instance_uid,
                   announced_sop_class_uid=announced_sop_class_uid, min_free_bytes=min_free_bytes,
                   max_sequence_depth=max_sequence_depth)
    writer = WriterConnection(engine)
    try:
        return file_prepared(engine, storage, writer, [item])[0]
    except BaseException:
        writer.discard()
        raise
    finally:
        writer.close()


def file_prepared(engine: Engine, storage: Storage, writer: WriterConnection,
                  items: Sequence[Prepared], *,
                  commit_error: type[Exception] | None = None,
                  settle: Callable[[Sequence[Placed]], None] | None = None,
                  spool_deletes: Sequence[str] = ()) -> list[IngestResult]:
    """File prepared instances in one index transaction, in order, and commit once: each row and
    audit record is written, then every new file is renamed into place and the renames made
    durable (each folder fsynced once), then the transaction commits. So every file is in place
    and durable before its row is, and a batch of N instances costs one lock wait, one fsync per
    folder and one WAL flush.

    The hot path (instances of known series, duplicates, replacements) runs on ``writer``'s DBAPI
    connection. When an instance opens a new series, which needs the ORM upserts of patient,
    study and series, the transaction is rolled back before anything was placed and the batch
    runs again on a SQLAlchemy connection. Raises whatever stops the transaction; nothing of the
    batch is then indexed, and no file placed (unless the COMMIT itself failed, which may have
    happened all the same: the files stay, and a resend finds its row or files it again; that
    failure is raised as ``commit_error`` when given, chained to its cause).

    Spooled instances (:attr:`Prepared.spool`) are written into the transaction as spool rows
    instead of being placed before it; after the commit their files are renamed into place (no
    flush) and handed to ``settle`` (:meth:`.spool.Settler.add`), or, without one, settled here.
    ``spool_deletes`` are spool rows of instances already settled, deleted in this transaction
    (:meth:`.spool.Settler.take_settled`).
    """
    sql = index_sql(engine.dialect)
    cursor = writer.begin()
    try:
        filed = _file_locked(cursor, sql, None, storage=storage, items=items)
        if filed is not None and spool_deletes:
            delete_rows(cursor, sql.placeholder, spool_deletes)
    except BaseException:
        try:
            writer.rollback()
        except Exception:
            log.warning("rollback failed after an ingest error", exc_info=True)
        raise
    if filed is None:
        writer.rollback()
        with engine.connect() as conn, conn.begin():  # SQLite: BEGIN IMMEDIATE (ground.db)
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                if sql.chain.lock:
                    cursor.execute(sql.chain.lock, sql.chain.lock_params)
                filed = _file_locked(cursor, sql, conn, storage=storage, items=items)
                if spool_deletes:
                    delete_rows(cursor, sql.placeholder, spool_deletes)
            finally:
                cursor.close()
        assert filed is not None
    else:
        try:
            writer.commit()
        except Exception as err:
            if commit_error is None:
                raise
            raise commit_error(f"the index commit failed: {err}") from err
    results, spooled = filed
    if spooled:
        _place_spooled(engine, storage, spooled, settle)
    for result in results:
        if result.obsolete_key:
            _remove_quietly(storage, result.obsolete_key)
    return [IngestResult(item.headers, item.stored, r.outcome, r.study_version, r.new_version)
            for item, r in zip(items, results, strict=True)]


def _place_spooled(engine: Engine, storage: Storage, spooled: Sequence[Placed],
                   settle: Callable[[Sequence[Placed]], None] | None) -> None:
    """After the commit: spooled instances' files under their keys, then settled (their bytes are
    durable as spool rows meanwhile). A failure is logged, not raised: the instances are filed
    and durable, and their files are written back from the spool (the settler's retry, or
    :func:`.spool.recover` when the listener next starts)."""
    try:
        storage.place([(staged, key) for staged, key, _ in spooled])
    except StorageFailure:
        # Some may be in place, some not: every one is written back from its spool row (durably;
        # a row whose file cannot be written stays, for the next start), none settled as placed.
        log.exception("could not place %d spooled instance(s); writing them back from the spool", len(spooled))
        write_back(engine, storage, spooled)
        return
    if settle is not None:
        settle(spooled)
    else:
        settle_now(engine, storage, spooled)


def _file_locked(
    cursor: Any,
    sql: IndexSql,
    conn: Connection | None,
    *,
    storage: Storage,
    items: Sequence[Prepared],
) -> tuple[list[IndexResult], list[Placed]] | None:
    """The index transaction's work, once it holds the writer lock, up to (not including) the
    commit; returns each instance's result and the spooled instances to place after the commit.
    Returns None, having written and placed nothing, when an instance opens a new series and
    ``conn`` is None: that needs the ORM upserts, on a SQLAlchemy connection."""
    # The writer lock serialises index writers (lock, then rows): two associations filing the
    # first instances of one patient or study would otherwise race to insert the same rows, and
    # the study's state read below decides the lifecycle's arrival. Each instance's state is read
    # after the previous one's writes, in this transaction: a batch files as its instances would
    # one after another (the same SOP Instance twice in one batch is a duplicate the second time).
    results: list[IndexResult] = []
    placements: list[tuple[Path, str]] = []
    spooled: list[Placed] = []
    for item in items:
        headers, stored = item.headers, item.stored
        state = read_state(cursor, sql, headers)
        existing = state.existing
        duplicate = existing is not None and existing.sha256 == stored.sha256
        if not duplicate and state.known is None and conn is None:
            return None
        filing = plan_filing(
            conn, cursor, sql, headers=headers, stored=stored, calling_ae=item.calling_ae,
            existing=existing, known=state.known,
        )
        result = filing.result
        audit = link(state.chain_head, [ChainEvent(
            action=f"instance.{result.outcome.value}",
            actor=item.calling_ae,
            entity_type="Instance",
            entity_id=headers.sop_instance_uid,
            details={
                "study": headers.study_instance_uid,
                "series": headers.series_instance_uid,
                "sop_class": headers.sop_class_uid,
                "transfer_syntax": headers.transfer_syntax_uid,
                "size": stored.size,
                "sha256": stored.sha256,
                "study_version": result.study_version,
            },
        ), *filing.events])  # the study's state change, if the instance made one (lifecycle)
        writes = [*filing.writes, *(sql.chain.write(row) for row in audit)]
        if item.spool is not None and not duplicate:
            writes.append((sql.insert_spool, (item.spool_id, headers.sop_instance_uid, stored.key, item.spool)))
            spooled.append((item.staged, stored.key, item.spool_id))
        elif item.spool is not None and not os.path.exists(storage.path(stored.key)):
            # a duplicate whose file is missing (a COMMIT reported failed that happened, before
            # its file was placed): placed again; its earlier spool row holds it until settled
            spooled.append((item.staged, stored.key, item.spool_id))
        elif not duplicate:
            placements.append((item.staged, stored.key))
        run_writes(cursor, sql, writes)
        results.append(result)
    # Renamed into place and made durable under the lock, after the rows are written and before
    # they commit: each file is in place and durable before its row is. All or nothing: when a
    # rename fails, the files already renamed go back and the transaction rolls back.
    storage.commit_synced(placements)
    return results, spooled


class CommitFailed(Exception):
    """The COMMIT of a batch failed: it may have happened all the same, so its instances are not
    filed again one by one (a resend finds its row, or files it again)."""


class Ingestor:
    """The listener's ingest: each association's thread prepares its instance (:func:`prepare`),
    then files it through a group commit (:mod:`.group_commit`) on one kept connection
    (:class:`ground.db.WriterConnection`): concurrent associations share one transaction, one
    fsync per folder and one WAL flush, and each is answered once its own instance committed.

    When a batch of several fails before its COMMIT, its instances are filed again one at a time,
    so that one instance's failure (a value the index cannot hold, say) is its own and not its
    neighbours'. A failed COMMIT fails the whole batch (:class:`CommitFailed`). After any failure
    the kept connection is dropped and the next batch connects afresh.
    """

    def __init__(self, engine: Engine, storage: Storage, *, min_free_bytes: int = 0,
                 max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH, group_wait: float = 0.002,
                 max_batch: int = 64, spool_max_bytes: int = 0) -> None:
        self.engine = engine
        self.storage = storage
        self.min_free_bytes = min_free_bytes
        self.max_sequence_depth = max_sequence_depth
        self.spool_max_bytes = spool_max_bytes
        #: makes spooled instances' files durable after their acknowledgement (:mod:`.spool`)
        self.settler = Settler(engine, storage)
        self._writer = WriterConnection(engine)
        self._writer_lock = threading.Lock()  # the leader's, uncontended; close() waits for it
        self.group: GroupCommit[Prepared, IngestResult] = GroupCommit(self._file_batch, max_wait=group_wait,
                                                                      max_batch=max_batch)

    def ingest(self, staged: Path, *, calling_ae: str, announced_sop_instance_uid: str | None = None,
               announced_sop_class_uid: str | None = None) -> IngestResult:
        """As :func:`ingest_file`, sharing the commit with concurrent callers."""
        self.group.expect()
        try:
            item = prepare(storage=self.storage, staged=staged, calling_ae=calling_ae,
                           announced_sop_instance_uid=announced_sop_instance_uid,
                           announced_sop_class_uid=announced_sop_class_uid, min_free_bytes=self.min_free_bytes,
                           max_sequence_depth=self.max_sequence_depth, spool_max_bytes=self.spool_max_bytes)
        except BaseException:
            self.group.unexpect()
            raise
        return self.group.submit(item, expected=True)

    def _file_batch(self, items: Sequence[Prepared]) -> list[IngestResult | BaseException]:
        try:
            return list(self._file(items))
        except CommitFailed as err:
            return [err] * len(items)
        except Exception as err:
            if len(items) == 1:
                return [err]
        out: list[IngestResult | BaseException] = []
        for item in items:
            try:
                out.extend(self._file([item]))
            except Exception as err:
                out.append(err)
        return out

    def _file(self, items: Sequence[Prepared]) -> list[IngestResult]:
        with self._writer_lock:
            deletes = self.settler.take_settled()
            try:
                return file_prepared(self.engine, self.storage, self._writer, items, commit_error=CommitFailed,
                                     settle=self.settler.add, spool_deletes=deletes)
            except BaseException:
                self._writer.discard()
                self.settler.give_back(deletes)  # (a COMMIT that failed may have deleted them: harmless)
                raise

    def close(self) -> None:
        """Settle the spooled instances still pending and give the kept connection back (a later
        instance takes a new one)."""
        self.settler.close()
        with self._writer_lock:
            self._writer.close()


def _remove_quietly(storage: Storage, key: str) -> None:
    try:
        storage.remove(key)
    except StorageFailure:
        log.warning("could not remove %s, left unindexed by a failed ingest", key)


def record_rejection(engine: Engine, *, calling_ae: str, sop_instance_uid: str | None, err: DicomInputError | OutOfResources | Exception, status: int) -> None:
    """Audit a refused instance (its status and reason). Never raises: the listener must answer."""
    try:
        with session_scope(engine) as session:
            record(
                session,
                action="instance.rejected",
                actor=calling_ae,
                entity_type="Instance",
                entity_id=sop_instance_uid or "",
                outcome="failure",
                details={"status": f"0x{status:04X}", "reason": str(err)[:500]},
            )
    except Exception:
        log.exception("could not audit a rejected instance")
