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

import errno
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlmodel import select

from audit.chain import ChainEvent, link, record
from ground.clock import as_utc, utcnow
from ground.db import WriterConnection, session_scope
from storage import KeyTaken, Storage, StorageFailure, StoredFile, key_component

from .errors import DicomInputError, IdentifiersMissing, OutOfResources
from .group_commit import GroupCommit
from .headers import DEFAULT_MAX_SEQUENCE_DEPTH, InstanceHeaders, read_headers
from .index import (
    BatchWrites,
    IndexResult,
    IndexSql,
    Instance,
    StoreOutcome,
    index_sql,
    plan_filing,
    read_state,
    read_states,
)
from .intake import Entry, IntakeJournal, Record, Unfileable
from .spool import Placed, Settler, delete_rows, write_back
from .spool import settle as settle_now

log = logging.getLogger(__name__)


def instance_key(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Storage key of one received copy of an instance: its UIDs, its content's hash and a nonce
    of its own. A replacement gets a new file, so the old one stays valid until the index points
    at the new one; and no two copies ever share a file, even with the same bytes: a name taken
    from the bytes alone was reused by a resend of an original while its correction was filed,
    and the correction's filing (or a replay) then removed the resend's file as the original's
    obsolete one, leaving an answered instance with no file."""
    return (f"{key_component(study_uid)}/{key_component(series_uid)}/{key_component(sop_uid)}"
            f".{sha256[:16]}.{os.urandom(4).hex()}.dcm")


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
    #: its bytes are durable in the intake journal (:mod:`.intake`), not as a spool row
    journaled: bool = False
    #: its file is durable under its key already (a large journaled instance): nothing to place
    placed: bool = False
    #: its bytes (``spool``) are only in memory: no file at ``staged`` (the intake journal's path)
    in_memory: bool = False
    #: when its sender was answered, if before filing (the intake journal's record): the row's
    #: ``received_at``, so that the index ends at the copy of a SOP Instance answered last
    answered_at: datetime | None = None

    @property
    def source(self) -> Path | bytes:
        """What placing it puts under its key: its staged file, or its bytes."""
        return self.spool if self.in_memory and self.spool is not None else self.staged


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
    memory_ok: bool = False,
) -> Prepared:
    """Everything before the index transaction: hash, free-space check, header parse, the checks
    against what the C-STORE announced, and the file's fsync (started when it was handed over, so
    it overlaps the rest). An instance of up to ``spool_max_bytes`` that its writer kept in memory
    is not waited for: its bytes go into the index's spool (:mod:`.spool`) or the intake journal;
    with ``memory_ok`` it may have no staged file at all (:attr:`Prepared.in_memory`). Raises what
    :func:`ingest_file` raises; indexes nothing."""
    handed = storage.hand_over(staged, sync_above=spool_max_bytes, memory_ok=memory_ok)
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
        return Prepared(staged, headers, stored, calling_ae, spool=handed.data, spool_id=os.urandom(16).hex(),
                        in_memory=handed.in_memory)
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
    answered_at: datetime | None = None,
) -> IngestResult:
    """Store and index ``staged`` (a complete DICOM file in ``storage``'s filesystem), alone, on a
    connection of the engine's pool (the listener files through :class:`Ingestor` instead).
    ``answered_at``: when its sender was answered, if before (a journaled instance filed again).

    Raises :class:`DicomInputError` subclasses for what the sender must hear about, and
    :class:`OutOfResources`/:class:`StorageFailure` when we cannot store safely. On any error the
    staged file is left for the caller to discard and nothing is indexed.
    """
    item = prepare(storage=storage, staged=staged, calling_ae=calling_ae,
                   announced_sop_instance_uid=announced_sop_instance_uid,
                   announced_sop_class_uid=announced_sop_class_uid, min_free_bytes=min_free_bytes,
                   max_sequence_depth=max_sequence_depth)
    if answered_at is not None:
        item = replace(item, answered_at=answered_at)
    writer = WriterConnection(engine)
    try:
        return file_prepared(engine, storage, writer, [item])[0]
    except BaseException:
        writer.discard()
        raise
    finally:
        writer.close()


def refile(engine: Engine, storage: Storage, record: Record) -> None:
    """File a journaled instance again (:func:`.intake.replay`), as its arrival would have; a
    no-op when it is filed already. Its file is rewritten when missing (a small instance's bytes
    are in the record; a large one's file was durable under its key before it was answered).
    Idempotent: a record whose instance was replaced by a later arrival (the row's
    ``received_at`` is not older than the record) is not filed over it."""
    header = record.header
    data: bytes | None = record.data
    if header.get("placed"):
        path = storage.path(header["key"])
        data = path.read_bytes() if path.exists() else None
    if data is not None and hashlib.sha256(data).hexdigest() != header["sha256"]:
        raise Unfileable(f"journaled bytes of {header['key']} do not match their SHA-256")
    sf = storage.staging_file(delete=False, suffix=".dcm")
    staged = Path(sf.name)
    try:
        if data is not None:
            sf.write(data)
        sf.close()
        sop = header.get("sop") or (read_headers(staged, data=data).sop_instance_uid if data is not None else "")
        with session_scope(engine) as session:
            row = session.exec(select(Instance).where(Instance.sop_instance_uid == sop)).first()
        if row is not None and row.sha256 == header["sha256"]:
            path = storage.path(row.storage_key)
            if data is not None and not _holds(path, data):  # lost, or half-written (write_unsynced)
                storage.put(row.storage_key, data)
            if header["key"] != row.storage_key:
                _remove_quietly(storage, header["key"])  # this copy's own file, if any: nobody else's
            return
        answered_at = datetime.fromisoformat(header["at"])
        if row is not None and as_utc(row.received_at) >= answered_at:
            # replaced by an instance that arrived after this one; a file this one's attempt left
            # under its own key (written before a COMMIT that failed, or placed) is nobody's:
            # no other copy has that name (instance_key)
            if header.get("key") and header["key"] != row.storage_key:
                _remove_quietly(storage, header["key"])
            return
        if data is None:
            raise Unfileable(f"the file of journaled instance {header['key']} is missing and it is not indexed")
        # filed as answered then: a later copy in another record, replayed after, still wins
        result = ingest_file(engine=engine, storage=storage, staged=staged, calling_ae=header["ae"],
                             answered_at=answered_at)
        if result.stored.key != header["key"]:
            _remove_quietly(storage, header["key"])  # filed from a copy, under another name
    finally:
        staged.unlink(missing_ok=True)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


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
    Journaled ones received into memory (:attr:`Prepared.in_memory`) are written under their keys
    before the commit instead (:meth:`storage.FileStorage.write_unsynced`: no reader knows those
    keys before their rows commit) and handed to ``settle`` after it alike.
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
    results, spooled, written = filed
    if spooled or written:
        _place_spooled(engine, storage, spooled, settle, written)
    # A key the batch made obsolete is removed, unless a later instance of the batch filed the
    # same SOP Instance under it again (A, then B, then A's bytes again: A's key is current).
    current = set({item.headers.sop_instance_uid: item.stored.key  # each SOP Instance's last key
                   for item, r in zip(items, results, strict=True)
                   if r.outcome not in (StoreOutcome.duplicate, StoreOutcome.superseded)}.values())
    for result in results:
        if result.obsolete_key and result.obsolete_key not in current:
            _remove_quietly(storage, result.obsolete_key)
    return [IngestResult(item.headers, replace(item.stored, key=r.kept_key) if r.kept_key else item.stored,
                         r.outcome, r.study_version, r.new_version)
            for item, r in zip(items, results, strict=True)]


def _place_spooled(engine: Engine, storage: Storage, spooled: Sequence[Placed],
                   settle: Callable[[Sequence[Placed]], None] | None, written: Sequence[Placed] = ()) -> None:
    """After the commit: spooled instances' files under their keys, then settled with those
    ``written`` under their keys before the commit (their bytes are durable as spool rows or
    journal records meanwhile). A failure to place is logged, not raised: the instances are
    filed and durable, and their files are written back from the spool (the settler's retry, or
    :func:`.spool.recover` when the listener next starts)."""
    try:
        if spooled:
            storage.place([(source, key) for source, key, _ in spooled])
    except StorageFailure:
        # Some may be in place, some not: every one is written back from its spool row (durably;
        # a row whose file cannot be written stays, for the next start), none settled as placed.
        log.exception("could not place %d spooled instance(s); writing them back from the spool", len(spooled))
        write_back(engine, storage, spooled)
        spooled = ()
    placed = [*written, *spooled]
    if not placed:
        return
    if settle is not None:
        settle(placed)
    else:
        settle_now(engine, storage, placed)


def _file_locked(
    cursor: Any,
    sql: IndexSql,
    conn: Connection | None,
    *,
    storage: Storage,
    items: Sequence[Prepared],
) -> tuple[list[IndexResult], list[Placed], list[Placed]] | None:
    """The index transaction's work, once it holds the writer lock, up to (not including) the
    commit; returns each instance's result, the spooled instances to place after the commit and
    those already written under their keys (to settle after it).
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
    written: list[Placed] = []
    # On the hot path, one read for the whole batch (kept current as it files); the ORM path,
    # which creates rows as it goes, reads each instance's state after the previous one's writes.
    batch = read_states(cursor, sql, [item.headers for item in items]) if conn is None and len(items) > 1 else None
    # Its row writes run together too (one statement on PostgreSQL), held until a read needs them.
    pending = BatchWrites(cursor, sql)
    for item in items:
        headers, stored = item.headers, item.stored
        state = batch.state(headers) if batch is not None else None
        if state is None:
            pending.flush()  # read after the writes before it (the ORM path; the same SOP Instance again)
            state = read_state(cursor, sql, headers)
        existing = state.existing
        duplicate = existing is not None and existing.sha256 == stored.sha256
        if not duplicate and state.known is None and conn is None:
            return None
        filing = plan_filing(
            conn, cursor, sql, headers=headers, stored=stored, calling_ae=item.calling_ae,
            existing=existing, known=state.known, answered_at=item.answered_at,
        )
        result = filing.result
        if existing is not None and result.outcome in (StoreOutcome.duplicate, StoreOutcome.superseded) \
                and existing.storage_key != stored.key:
            # the index keeps its file; this copy's own, if placed already (a large journaled
            # one), is removed after the commit: no other copy has its name (instance_key)
            result = replace(result, kept_key=existing.storage_key,
                             obsolete_key=stored.key if item.placed else None)
            filing = replace(filing, result=result)
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
        if batch is not None:
            batch.filed(filing, (audit[-1].seq, audit[-1].hash))
        if result.outcome is StoreOutcome.superseded:  # audited; nothing else written or placed
            pending.add(writes)
            results.append(result)
            continue
        if item.spool is not None and not duplicate:
            if not item.journaled:
                writes.append((sql.insert_spool, (item.spool_id, headers.sop_instance_uid, stored.key, item.spool)))
            (written if item.in_memory else spooled).append((item.source, stored.key, item.spool_id))
        elif item.spool is not None and existing is not None \
                and not os.path.exists(storage.path(existing.storage_key)):
            # a duplicate whose file is missing (a COMMIT reported failed that happened, before
            # its file was placed): placed again; its earlier spool row holds it until settled
            spooled.append((item.source, existing.storage_key, item.spool_id))
        elif not duplicate and not item.placed:
            placements.append((item.staged, stored.key))
        pending.add(writes)
        results.append(result)
    pending.flush()  # a failed write stops the batch before any file is placed
    # Renamed into place and made durable under the lock, after the rows are written and before
    # they commit: each file is in place and durable before its row is. All or nothing: when a
    # rename fails, the files already renamed go back and the transaction rolls back.
    storage.commit_new(placements)
    # Journaled instances received into memory: written straight under their keys before their
    # rows commit (no reader knows the key yet, so no staging file and rename are needed), and
    # made durable by the settler after it (their bytes are durable in the journal meanwhile).
    storage.write_unsynced([(source, key) for source, key, _ in written if isinstance(source, bytes)])
    return results, spooled, written


class CommitFailed(Exception):
    """The COMMIT of a batch failed: it may have happened all the same, so its instances are not
    filed again one by one (a resend finds its row, or files it again)."""


@dataclass(eq=False)
class _Journaled:
    """A journaled instance waiting to be indexed, and who waits for it."""

    item: Prepared
    entry: Entry
    indexed: threading.Event
    #: the order of the answers, which a retry keeps (:meth:`Ingestor._due`)
    seq: int = 0
    attempts: int = 0
    not_before: float = 0.0


class Ingestor:
    """The listener's ingest: each association's thread prepares its instance (:func:`prepare`),
    then files it through a group commit (:mod:`.group_commit`) on one kept connection
    (:class:`ground.db.WriterConnection`): concurrent associations share one transaction, one
    fsync per folder and one WAL flush, and each is answered once its own instance committed.

    With a ``journal`` (:mod:`.intake`), an instance is answered once its record in the journal
    is durable instead (a small one's bytes; a larger one's key, its file durable in place first),
    and indexed after the answer by this ingestor's indexing thread, in batches (``index_wait``
    lets one gather: 50 ms, where 10 ms gave batches of a few CT slices over four associations and
    cost 0.4-0.5 ms of indexing CPU per slice against 0.25 ms, bench/README.md; it delays only
    when an instance appears in the index, and a release waits for it);
    :meth:`wait_indexed` waits for the calling thread's (association's) instances.
    A journaled instance whose indexing fails is retried with backoff while the error is
    transient (the database unreachable, a disk error), and otherwise kept in the journal for
    the next start's replay, logged; it is never lost and never retried in a loop. A later copy
    of the same SOP Instance waits for that retry, so the index ends at the copy sent last.

    When a batch of several fails before its COMMIT, its instances are filed again one at a time,
    so that one instance's failure (a value the index cannot hold, say) is its own and not its
    neighbours'. A failed COMMIT fails the whole batch (:class:`CommitFailed`). After any failure
    the kept connection is dropped and the next batch connects afresh.

    ``after_filing`` is called with each filed instance's result and calling AE (in the
    association's thread, or the indexing thread for a journaled one); its errors are logged.
    """

    def __init__(self, engine: Engine, storage: Storage, *, min_free_bytes: int = 0,
                 max_sequence_depth: int = DEFAULT_MAX_SEQUENCE_DEPTH, group_wait: float = 0.002,
                 max_batch: int = 64, spool_max_bytes: int = 0, journal: IntakeJournal | None = None,
                 index_wait: float = 0.05,
                 after_filing: Callable[[IngestResult, str], None] | None = None) -> None:
        self.engine = engine
        self.storage = storage
        self.min_free_bytes = min_free_bytes
        self.max_sequence_depth = max_sequence_depth
        self.spool_max_bytes = spool_max_bytes
        self.journal = journal
        self.index_wait = index_wait
        self.after_filing = after_filing
        #: makes spooled instances' files durable after their acknowledgement (:mod:`.spool`)
        self.settler = Settler(engine, storage, settled=self._settled if journal is not None else None)
        self._writer = WriterConnection(engine)
        self._writer_lock = threading.Lock()  # the leader's, uncontended; close() waits for it
        self.group: GroupCommit[Prepared, IngestResult] = GroupCommit(self._file_batch, max_wait=group_wait,
                                                                      max_batch=max_batch)
        self._max_batch = max_batch
        self._queue: list[_Journaled] = []  # in the order of ``seq``
        self._seq = itertools.count()
        self._queued = threading.Condition()
        self._placing: dict[str, _Journaled] = {}  # spool id -> journaled instance, until settled
        self._handed: set[str] = set()  # those of them placed and handed to the settler
        self._indexer: threading.Thread | None = None
        self._indexer_pid = 0
        self._closing = False
        self._mine = threading.local()  # the calling thread's journaled instances not yet indexed

    def ingest(self, staged: Path, *, calling_ae: str, announced_sop_instance_uid: str | None = None,
               announced_sop_class_uid: str | None = None) -> IngestResult | None:
        """As :func:`ingest_file`, sharing the commit with concurrent callers; None when the
        instance was journaled (durable, indexed after the return: :meth:`wait_indexed`)."""
        journaled = self.journal is not None
        if not journaled:
            self.group.expect()
        try:
            item = prepare(storage=self.storage, staged=staged, calling_ae=calling_ae,
                           announced_sop_instance_uid=announced_sop_instance_uid,
                           announced_sop_class_uid=announced_sop_class_uid, min_free_bytes=self.min_free_bytes,
                           max_sequence_depth=self.max_sequence_depth, spool_max_bytes=self.spool_max_bytes,
                           memory_ok=journaled)
            if journaled:
                self._journal(item)
                return None
        except BaseException:
            if not journaled:
                self.group.unexpect()
            raise
        result = self.group.submit(item, expected=True)
        self._after(result, calling_ae)
        return result

    def _journal(self, item: Prepared) -> None:
        """Make ``item`` durable in the journal (a small one's bytes; a large one is first renamed
        into place, durably, and journaled by key) and queue it for indexing."""
        assert self.journal is not None
        if item.spool is None:
            item = self._place(item)
        answered_at = utcnow()
        try:
            entry = self.journal.append({"key": item.stored.key, "sha256": item.stored.sha256,
                                         "sop": item.headers.sop_instance_uid, "ae": item.calling_ae,
                                         "at": answered_at.isoformat(), "placed": item.placed}, item.spool or b"")
        except OSError as err:
            if item.placed:  # refused: its file is nobody's (a resend places another)
                _remove_quietly(self.storage, item.stored.key)
            if err.errno == errno.ENOSPC:
                raise OutOfResources(f"no space left for the intake journal in {self.journal.folder}") from err
            raise StorageFailure(f"could not write the intake journal in {self.journal.folder}: {err}") from err
        staged = item.staged
        if not item.placed and not item.in_memory:
            # the network engine deletes the staged file once answered: keep it under a name of its own
            staged = item.staged.with_name(item.staged.name + ".held")
            try:
                os.replace(item.staged, staged)
            except OSError:  # indexed all the same; its file is written from the bytes
                staged = item.staged
        job = _Journaled(replace(item, staged=staged, journaled=True, answered_at=answered_at), entry,
                         threading.Event())
        with self._queued:
            job.seq = next(self._seq)
            self._queue.append(job)
            self._ensure_indexer()
            self._queued.notify()
        mine: list[threading.Event] | None = getattr(self._mine, "events", None)
        if mine is None:
            mine = self._mine.events = []
        mine.append(job.indexed)

    def _place(self, item: Prepared) -> Prepared:
        """A large instance's file, durable under its key (a name no other copy has:
        :func:`instance_key`), before its journal record and its answer."""
        stored = item.stored
        for _ in range(3):
            try:
                self.storage.commit_new([(item.staged, stored.key)])
            except KeyTaken:  # a nonce drawn twice
                h = item.headers
                stored = replace(stored, key=instance_key(h.study_instance_uid, h.series_instance_uid,
                                                          h.sop_instance_uid, stored.sha256))
                continue
            return replace(item, stored=stored, placed=True, spool_id=os.urandom(16).hex())
        raise StorageFailure(f"could not find a free name for {item.stored.key}")

    def wait_indexed(self, timeout: float) -> bool:
        """Wait until the instances this thread journaled are indexed (or given up on: see the
        class); False after ``timeout`` seconds (they are durable all the same)."""
        mine: list[threading.Event] = getattr(self._mine, "events", None) or []
        self._mine.events = []
        deadline = time.monotonic() + timeout
        return all(event.wait(max(0.0, deadline - time.monotonic())) for event in mine)

    def _ensure_indexer(self) -> None:  # under _queued
        if self._indexer is None or self._indexer_pid != os.getpid() or not self._indexer.is_alive():
            self._indexer_pid = os.getpid()
            self._indexer = threading.Thread(target=self._index_loop, name="intake-indexer", daemon=True)
            self._indexer.start()

    def _index_loop(self) -> None:
        while True:
            with self._queued:
                while True:
                    now = time.monotonic()
                    ready = self._due(now)
                    if ready or (self._closing and not self._queue):
                        break
                    later = min((j.not_before for j in self._queue if j.not_before > now), default=None)
                    self._queued.wait(None if later is None else later - now)
                if not ready:
                    return
            if self.index_wait and len(ready) < self._max_batch and not self._closing:
                time.sleep(self.index_wait)  # let the batch gather (other associations, the next PDUs)
            with self._queued:
                now = time.monotonic()
                batch = self._due(now)[:self._max_batch * 4]
                taken = set(map(id, batch))
                self._queue = [j for j in self._queue if id(j) not in taken]
            try:
                self._index(batch)
            except Exception:  # they stay in the journal: filed again at the next start
                log.exception("indexing %d journaled instance(s) failed", len(batch))
                for job in batch:
                    self._placing.pop(job.item.spool_id, None)
                    job.indexed.set()

    def _due(self, now: float) -> list[_Journaled]:  # under _queued
        """The queued instances that may be indexed now, in the order they were answered. One
        waits while an earlier copy of the same SOP Instance waits for its retry: the copy sent
        last must be the one the index ends with (a modality that corrects an instance sends it
        again under the same UID)."""
        due: list[_Journaled] = []
        waiting: set[str] = set()
        for job in self._queue:
            sop = job.item.headers.sop_instance_uid
            if sop in waiting:
                continue
            if self._closing or job.not_before <= now:
                due.append(job)
            else:
                waiting.add(sop)
        return due

    def _index(self, batch: Sequence[_Journaled]) -> None:
        for job in batch:
            self._placing[job.item.spool_id] = job
        outcomes = self._file_batch([job.item for job in batch])
        retry: list[_Journaled] = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._placing.pop(job.item.spool_id, None)
                job.attempts += 1
                if _transient(outcome) and not self._closing:
                    delay = min(60.0, 0.5 * 2 ** job.attempts)
                    log.warning("indexing journaled instance %s failed (%s); retrying in %.0f s",
                                job.item.stored.key, outcome, delay)
                    job.not_before = time.monotonic() + delay
                    retry.append(job)
                else:
                    log.error("indexing journaled instance %s failed: %s; it stays durable in the intake "
                              "journal and is filed again when the listener next starts", job.item.stored.key,
                              outcome, exc_info=outcome)
                job.indexed.set()
                continue
            if outcome.outcome is StoreOutcome.superseded:
                # a copy answered after it is indexed: nothing to write (a large one's own file
                # was removed after the commit, as its result's obsolete_key)
                log.info("journaled instance %s was superseded by a copy answered after it", job.item.stored.key)
                self._done(job)
                job.indexed.set()
                continue
            if job.item.placed and outcome.outcome is StoreOutcome.duplicate:
                self._done(job)  # its file was durable before the answer (and is gone if its own)
            elif job.item.spool_id in self._handed:
                self._handed.discard(job.item.spool_id)  # done once settled
            else:  # a duplicate whose file was there, or placing failed: write it from its bytes
                self._write_and_done(job, outcome)
            job.indexed.set()
            self._after(outcome, job.item.calling_ae)
        if retry:
            with self._queued:
                self._queue = sorted([*self._queue, *retry], key=lambda job: job.seq)
                self._queued.notify()

    def _write_and_done(self, job: _Journaled, result: IngestResult) -> None:
        key, data = result.stored.key, job.item.spool  # a duplicate's: the index's file
        if data is not None and (result.outcome is not StoreOutcome.duplicate
                                 or not os.path.exists(self.storage.path(key))):
            try:
                self.storage.put(key, data)  # durable
            except StorageFailure:
                log.exception("could not write %s; it stays in the intake journal, written when the listener "
                              "next starts", key)
                self._placing.pop(job.item.spool_id, None)
                return
            self._done(job)
            return
        # A duplicate whose file is there: perhaps written (not yet durably) before a COMMIT that
        # reported a failure but happened (write_unsynced). Settled before its record is done.
        self._settle([(job.item.source, key, job.item.spool_id)])

    def _settle(self, placed: Sequence[Placed]) -> None:
        self._handed.update(spool_id for _, _, spool_id in placed if spool_id in self._placing)
        self.settler.add(placed)

    def _settled(self, ids: Sequence[str]) -> None:
        for spool_id in ids:
            job = self._placing.get(spool_id)
            if job is not None:
                self._done(job)

    def _done(self, job: _Journaled) -> None:
        if self._placing.pop(job.item.spool_id, None) is None:
            return
        assert self.journal is not None
        self.journal.done(job.entry)
        if job.item.staged.name.endswith(".held"):
            job.item.staged.unlink(missing_ok=True)  # (placed: renamed away already)

    def _after(self, result: IngestResult, calling_ae: str) -> None:
        if self.after_filing is not None:
            try:
                self.after_filing(result, calling_ae)
            except Exception:
                log.exception("post-store hook failed for an instance from %s", calling_ae)

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
                                     settle=self._settle, spool_deletes=deletes)
            except BaseException:
                self._writer.discard()
                self.settler.give_back(deletes)  # (a COMMIT that failed may have deleted them: harmless)
                raise

    def close(self) -> None:
        """Index what is journaled, settle the spooled instances still pending and give the kept
        connection back (a later instance takes a new one)."""
        with self._queued:
            self._closing = True
            indexer = self._indexer if self._indexer_pid == os.getpid() else None
            self._queued.notify_all()
        if indexer is not None:
            indexer.join(timeout=60)
        self.settler.close()
        with self._writer_lock:
            self._writer.close()
        if self.journal is not None:
            self.journal.close()
        with self._queued:
            self._closing = False


def _transient(err: BaseException) -> bool:
    """Whether filing may succeed when simply tried again: the database or the disk failing, not
    the instance (a value the index cannot hold, a constraint)."""
    if isinstance(err, CommitFailed):
        err = err.__cause__ or err
    # SQLAlchemy's and the drivers' own (the hot path runs on DBAPI cursors) share these names
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"OperationalError", "InterfaceError"}:
        return True
    return not names & {"Error", "DBAPIError"} and isinstance(err, (OSError, StorageFailure, CommitFailed))


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
