"""Store one received instance: parse, hash, make durable, index, audit — in that order.

This is the service function behind the C-STORE handler; it knows nothing of pynetdicom. The
order is what makes an acknowledgement mean something: the file is durable and renamed into place
before the index row and its audit record commit, and only then does the caller answer Success.
A crash before the commit leaves at most an unindexed file that the sender will send again.

Where the time goes (300-slice CT, 0.5 MB per instance, one association, this shared 2-core VM,
``bench/ingest_index.py``, medians of one run with the previous version alongside): ingest_file
takes ~3.0 ms on SQLite and ~5.6 ms on PostgreSQL, down from ~10.9 and ~15.2 ms. What is left is
mostly the disk, fsyncs measured at the same time: the file's fsync (~1.1 ms; the storage starts
it while it hashes the file, ~0.5 ms), the rename and directory fsync (~0.4 ms), the commit (SQLite:
one WAL fsync with ``synchronous=FULL``, ~0.6 ms, kept: in WAL mode NORMAL may lose the last
commits on power loss, i.e. acknowledged instances would vanish from the index; PostgreSQL: its
WAL flush and six round trips: pool pre-ping, BEGIN, lock, read, writes, COMMIT). The CPU part is
the header parse, ~0.2-0.3 ms (a raw walk, :mod:`.walk`, where the full pydicom parse took
~2 ms), and the index transaction, ~0.2 ms of driver SQL on a pooled DBAPI connection
(:mod:`.index`, :mod:`audit.chain`), where SQLAlchemy's session, statement construction, cache
keys and parameter processing took ~5 ms. Tried and left out: running the header parse beside
the fsync and hashing, and the rename beside the row writes, in helper threads (on two cores the
parse ran twice as slow and the hand-offs cost the rest: no gain), and psycopg's pipeline mode
(slower here than plain statements; one statement of data-modifying WITH clauses is what paid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from audit.chain import ChainEvent, link, record
from ground.db import session_scope
from storage import Storage, StorageFailure, StoredFile, key_component

from .errors import DicomInputError, IdentifiersMissing, OutOfResources
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
    """Store and index ``staged`` (a complete DICOM file in ``storage``'s filesystem).

    Raises :class:`DicomInputError` subclasses for what the sender must hear about, and
    :class:`OutOfResources`/:class:`StorageFailure` when we cannot store safely. On any error the
    staged file is left for the caller to discard and nothing is indexed.
    """
    size, sha = storage.staged_digest(staged)
    if min_free_bytes and storage.free_bytes() - size < min_free_bytes:
        raise OutOfResources(
            f"only {storage.free_bytes() // (1 << 20)} MiB free in {storage.root}, below the "
            f"{min_free_bytes // (1 << 20)} MiB threshold; free space or raise listener.min_free_bytes"
        )
    headers = read_headers(staged, max_sequence_depth=max_sequence_depth)
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
    # The file's fsync (the slowest step) happens before the index lock, so that concurrent
    # associations overlap it; deciding whether to rename it into place, the rename and the
    # directory fsync stay under the lock (a replacement's obsolete file is removed by key).
    storage.sync_staged(staged)
    key = instance_key(headers.study_instance_uid, headers.series_instance_uid,
                       headers.sop_instance_uid, sha)
    stored = StoredFile(key=key, size=size, sha256=sha)

    sql = index_sql(engine.dialect)
    # The hot path (an instance of a known series, a duplicate, a replacement) runs on a DBAPI
    # connection straight from the pool: a SQLAlchemy Connection's begin/commit machinery alone
    # cost ~0.1 ms. The first instance of a series needs the ORM upserts: that transaction is
    # rolled back before writing anything and done again on a SQLAlchemy Connection.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            if sql.chain.begin:  # ground.db begins SQLAlchemy transactions so; raw ones begin here
                cursor.execute(sql.chain.begin)
            result = _file_locked(cursor, sql, None, storage=storage, staged=staged, headers=headers,
                                  stored=stored, calling_ae=calling_ae)
        finally:
            cursor.close()
        if result is None:
            raw.rollback()
        else:
            raw.commit()
    except BaseException:
        try:
            raw.rollback()
        except Exception:
            log.warning("rollback failed after an ingest error", exc_info=True)
        raise
    finally:
        raw.close()
    if result is None:
        with engine.connect() as conn, conn.begin():  # SQLite: BEGIN IMMEDIATE (ground.db)
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                result = _file_locked(cursor, sql, conn, storage=storage, staged=staged, headers=headers,
                                      stored=stored, calling_ae=calling_ae)
            finally:
                cursor.close()
        assert result is not None
    if result.obsolete_key:
        storage.remove(result.obsolete_key)
    return IngestResult(headers, stored, result.outcome, result.study_version, result.new_version)


def _file_locked(
    cursor: Any,
    sql: IndexSql,
    conn: Connection | None,
    *,
    storage: Storage,
    staged: Path,
    headers: InstanceHeaders,
    stored: StoredFile,
    calling_ae: str,
) -> IndexResult | None:
    """The index transaction's work, from taking the index lock to (not including) the commit.
    Returns None, having written nothing, when the instance opens a new series and ``conn`` is
    None: that needs the ORM upserts, on a SQLAlchemy connection."""
    # Serialise index writers first (ground.db's writer lock; lock, then rows): two associations
    # filing the first instances of one patient or study would otherwise race to insert the same
    # rows, and the study's state read below decides the lifecycle's arrival.
    if sql.chain.lock:
        cursor.execute(sql.chain.lock, sql.chain.lock_params)
    state = read_state(cursor, sql, headers)
    existing = state.existing
    duplicate = existing is not None and existing.sha256 == stored.sha256
    if not duplicate and state.known is None and conn is None:
        return None
    try:
        if not duplicate:
            # Renamed into place (and its directory fsynced) under the lock, before the rows are
            # written and committed: the file is in place and durable before its row is.
            storage.commit(staged, stored.key, synced=True)
        filing = plan_filing(
            conn, cursor, sql, headers=headers, stored=stored, calling_ae=calling_ae,
            existing=existing, known=state.known,
        )
        result = filing.result
        audit = link(state.chain_head, [ChainEvent(
            action=f"instance.{result.outcome.value}",
            actor=calling_ae,
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
        run_writes(cursor, sql, [*filing.writes, *(sql.chain.write(row) for row in audit)])
    except BaseException:
        # Nothing will point at the file (if it got there): the transaction rolls back, and it
        # was never committed (unlike a commit that fails, which may have happened all the same).
        if not duplicate and (existing is None or existing.storage_key != stored.key):
            _remove_quietly(storage, stored.key)
        raise
    return result


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
