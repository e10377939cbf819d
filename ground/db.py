"""Database engine and sessions: a SQLite file by default, PostgreSQL by URL.

Engines are built by :func:`make_engine` from settings and passed to what needs them; nothing here
connects at import time. Tables are SQLModel classes that live beside the room that owns them
(index in ``integrations.dicom.index``, audit in ``audit.chain``, pipeline state in
``workers.state``, FHIR resources in ``integrations.fhir.store``); the roof's ``taqrir.schema``
imports them all so that one metadata holds the whole schema for Alembic's autogenerate.

The writer lock
---------------
Writers of the study index and of the audit chain are serialised per database by one lock, the
*writer lock* (:func:`writer_lock` in a session; :func:`writer_lock_sql` for driver SQL on a DBAPI
cursor): a transaction-scoped advisory lock on PostgreSQL (``pg_advisory_xact_lock``, released at
commit or rollback), and on SQLite the ``BEGIN IMMEDIATE`` that :func:`make_engine` begins every
transaction with (SQLite has one writer at a time anyway; IMMEDIATE takes the write lock at BEGIN,
so two transactions cannot both read the same chain head or study row and then race). The audit
chain relies on it for the order of its records (``audit.chain``), the study lifecycle for its
compare-and-sets (``integrations.dicom.lifecycle``), ingest for its upserts of patient, study and
series.

Lock order (the rule that keeps PostgreSQL free of deadlocks): **the writer lock first, then
rows** — a transaction that will write a study row (or any row another writer-lock holder writes)
takes the writer lock *before* its first write or ``SELECT ... FOR UPDATE``, and never after.
Ingest takes it as its first statement; :mod:`integrations.dicom.lifecycle` takes it before its
compare-and-set (and before flushing anything); :func:`audit.chain.record` takes it before reading
the chain head. A transaction that wrote a study row first and then asked for the lock would wait
for an ingest that holds the lock and waits for that row: a deadlock that PostgreSQL breaks by
aborting one of them.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Dialect, Engine
from sqlmodel import Session, create_engine

from ground import migrations

log = logging.getLogger(__name__)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and foreign keys, so that the
    listener, workers and API can share one file; PostgreSQL gets a pre-pinged pool."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Take transactions into our hands: pysqlite's deferred BEGIN lets two processes read
            # the same audit chain head and then race; BEGIN IMMEDIATE serialises every
            # transaction, read-only ones included (a long read such as `audit-export` makes
            # writers wait up to the busy timeout). Acceptable for the embedded single-host
            # default; PostgreSQL, the production database, has no such limit.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


#: The PostgreSQL advisory lock key of the writer lock (an arbitrary constant; unchanged since it
#: was the audit chain's, so that processes of the previous release still serialise with these).
WRITER_LOCK_KEY = 0x7A71_2001


@dataclass(frozen=True)
class WriterLockSql:
    """The writer lock as driver SQL for one dialect, for code that runs on a DBAPI cursor (the
    ingest hot path, the API's asyncpg audit writer)."""

    #: Takes the lock (PostgreSQL); None on SQLite, where ``begin`` already holds it.
    lock: str | None
    #: The parameters of ``lock``.
    params: tuple[int, ...]
    #: How a transaction on a raw DBAPI connection must begin to hold the lock: SQLite's
    #: connections are in autocommit mode here (see :func:`make_engine`), so a raw one would not
    #: begin a transaction at all; None where the driver begins one itself.
    begin: str | None


@functools.lru_cache(maxsize=16)  # one per (dialect, paramstyle); a process has one or two
def _writer_lock_sql(dialect_name: str, paramstyle: str) -> WriterLockSql:
    if dialect_name == "postgresql":
        mark = "$1" if paramstyle == "numeric_dollar" else "?" if paramstyle == "qmark" else "%s"
        return WriterLockSql(f"SELECT pg_advisory_xact_lock({mark})", (WRITER_LOCK_KEY,), None)
    if dialect_name == "sqlite":
        return WriterLockSql(None, (), "BEGIN IMMEDIATE")
    raise ValueError(f"no writer lock for {dialect_name!r}: use SQLite or PostgreSQL")


def writer_lock_sql(dialect: Dialect) -> WriterLockSql:
    """The writer lock's driver SQL for ``dialect`` (in its parameter style)."""
    return _writer_lock_sql(dialect.name, dialect.paramstyle)


def writer_lock(session: Session) -> None:
    """Take the writer lock in ``session``'s transaction (held until it ends). Call it before the
    transaction's first write: see the lock order in this module's docstring. On SQLite the
    transaction already holds it (``BEGIN IMMEDIATE``)."""
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=WRITER_LOCK_KEY))  # type: ignore[call-overload]


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (``taqrir db upgrade``)."""
    migrations.upgrade(engine)


class WriterConnection:
    """One DBAPI connection kept by a writer for its hot path (the listener's ingest), whose
    transactions begin holding the writer lock in one round trip.

    Each transaction through the pool cost PostgreSQL three round trips before the first row was
    read (the pool's pre-ping, psycopg's BEGIN, the lock) and SQLite a pool checkout and a
    reset-on-return; here the connection is checked out once and kept, and a transaction is
    ``BEGIN IMMEDIATE`` on SQLite, and on PostgreSQL ``BEGIN; SELECT pg_advisory_xact_lock(...)``
    sent as one simple-protocol query on a connection in autocommit mode (so the driver sends no
    BEGIN of its own). After any error the caller calls :meth:`discard`: the next transaction
    gets a fresh connection, as a pre-ping would have given it. Not thread-safe: one transaction
    at a time (the ingest's group commit has one leader at a time). A forked child never uses its
    parent's connection.

    On SQLite, several processes (``listener.processes``) each keep one: a transaction first
    takes an exclusive ``flock`` on a lock file beside the database, then ``BEGIN IMMEDIATE``.
    SQLite's own wait for its write lock is a busy handler that sleeps (1, 2, 5, 10... ms) and
    polls, so two receiving processes handing the write lock back and forth hundreds of times a
    second slept more than they wrote (``listener.processes=2`` gained nothing in
    ``bench/ingest.py``); the kernel wakes a ``flock`` waiter the moment the holder lets go. Other
    writers (the API, the workers) keep SQLite's wait: the flock only orders these connections.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._lock_path: str | None = None
        self._lock_fd = -1
        self._lock_pid = 0
        self._locked = False
        name = engine.dialect.name
        if name == "postgresql":
            self._begin = f"BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})"
        elif name == "sqlite":
            self._begin = "BEGIN IMMEDIATE"
            database = engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                self._lock_path = database + ".writer-lock"
        else:
            raise ValueError(f"no writer connection for {name!r}: use SQLite or PostgreSQL")
        self._raw: Any = None
        self._pid = 0
        self._cursor: Any = None

    def _connection(self) -> Any:
        if self._raw is not None and self._pid != os.getpid():
            self._raw = None  # the parent's: neither used nor closed here
        if self._raw is None:
            raw = self.engine.raw_connection()
            if self.dialect.name == "postgresql":
                raw.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            self._raw, self._pid = raw, os.getpid()
        return self._raw

    def begin(self) -> Any:
        """Begin a transaction holding the writer lock; returns its DBAPI cursor."""
        cursor = self._connection().cursor()
        try:
            self._take_flock()
            cursor.execute(self._begin)
        except BaseException:
            cursor.close()
            self._release_flock()
            raise
        self._cursor = cursor
        return cursor

    def _take_flock(self) -> None:
        if self._lock_path is None:
            return
        if self._lock_pid != os.getpid():  # a forked child's own open file: a flock is per open file
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._locked = True

    def _release_flock(self) -> None:
        if self._locked:
            self._locked = False
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def commit(self) -> None:
        self._end("COMMIT")

    def rollback(self) -> None:
        self._end("ROLLBACK")

    def _end(self, statement: str) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is None:
            raise RuntimeError(f"{statement} outside a transaction")
        try:
            cursor.execute(statement)
        finally:
            cursor.close()
            self._release_flock()

    def discard(self) -> None:
        """Drop the connection (after an error: its state is unknown); the next :meth:`begin`
        connects afresh."""
        self._release_flock()
        raw, self._raw, self._cursor = self._raw, None, None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # already broken: nothing to give back
                log.debug("invalidating a broken writer connection failed", exc_info=True)

    def close(self) -> None:
        """Give the connection back to the pool (as the pool expects it: not in autocommit)."""
        self._release_flock()
        if self._lock_pid == os.getpid():
            os.close(self._lock_fd)
            self._lock_pid, self._lock_fd = 0, -1
        raw, self._raw, self._cursor = self._raw, None, None
        if raw is None:
            return
        try:
            if self.dialect.name == "postgresql":
                raw.dbapi_connection.autocommit = False
            raw.close()
        except Exception:
            raw.invalidate()
