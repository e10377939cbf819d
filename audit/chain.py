"""Append-only, hash-chained audit trail.

Every record carries the SHA-256 of the previous record's hash and its own canonical JSON form
(sorted keys, no whitespace, UTF-8), so that changing, removing or reordering any past record is
detected by :func:`verify`. Writers are serialised per database by the database layer's writer
lock (:func:`ground.db.writer_lock`: an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), taken before the head is read, so the chain never forks. The record shares the caller's
transaction: the audited change and its record commit together or not at all.

Records are built and hashed in one place, :func:`link`, and written by one statement per dialect
(:class:`ChainSql`) on the DBAPI cursor of the caller's transaction: :func:`record` and
:func:`record_many` do so in a session; the ingest path (a record per stored instance) reads the
head in its own query and adds the INSERT to its batch of writes (:meth:`ChainSql.write`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

from sqlalchemy import Column, Text
from sqlalchemy.engine import Dialect
from sqlmodel import Field, Session, SQLModel, select

from ground.clock import as_utc, utcnow
from ground.db import writer_lock, writer_lock_sql

GENESIS = "0" * 64


class AuditRecord(SQLModel, table=True):
    """One audited event. Never updated, never deleted."""

    __tablename__ = "audit_event"

    seq: int = Field(primary_key=True, description="Position in the chain, from 1, without gaps.")
    at: datetime = Field(index=True)
    action: str = Field(index=True, max_length=64, description="e.g. association.accepted, draft.read")
    actor: str = Field(max_length=256, index=True, description="Who: a calling AE, a user, a worker.")
    entity_type: str = Field(default="", max_length=64, index=True)
    entity_id: str = Field(default="", max_length=256, index=True)
    outcome: str = Field(default="success", max_length=32)
    details: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


def _encoder(separators: tuple[str, str]) -> Callable[[Any], str]:
    """``json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=...)`` as a
    function built once: ``json.dumps`` with any option builds a new encoder per call, which was
    most of the JSON's cost on the ingest path (three encodings per stored instance). The C
    encoder, where the interpreter has it, without the circular-reference check (audit details
    are built here from plain values, never self-referencing); else ``json.dumps`` itself."""
    item_sep, key_sep = separators
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return functools.partial(json.dumps, sort_keys=True, separators=separators, ensure_ascii=False, default=str)
    encode = make(None, str, json.encoder.encode_basestring, None, key_sep, item_sep, True, False, True)

    def dumps(obj: Any) -> str:
        return "".join(encode(obj, 0))

    return dumps


_canonical = _encoder((",", ":"))
#: The ``details`` column's form (``json.dumps``' default separators).
_details_json = _encoder((", ", ": "))
_PLAIN = (str, int, float, bool, type(None))


def canonical(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON form hashed into the chain."""
    return _canonical(fields).encode()


def chain_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash and this record's canonical form."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(fields)).hexdigest()


def _fields(seq: int, at: datetime, action: str, actor: str, entity_type: str, entity_id: str,
            outcome: str, details: str, parsed: Any = None) -> dict[str, Any]:
    """The hashed fields of a record, from its column values (the one definition, for writing
    and for :func:`verify`). ``parsed``, when given, is what ``json.loads(details)`` gives (the
    writer knows it without parsing)."""
    return {
        "seq": seq,
        "at": as_utc(at).isoformat(timespec="microseconds"),
        "action": action,
        "actor": actor,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "outcome": outcome,
        "details": json.loads(details) if parsed is None else parsed,
    }


def _hashed_fields(rec: AuditRecord) -> dict[str, Any]:
    return _fields(rec.seq, rec.at, rec.action, rec.actor, rec.entity_type, rec.entity_id,
                   rec.outcome, rec.details)


@dataclass(frozen=True)
class ChainEvent:
    """One event to append (the keyword arguments of :func:`record`)."""

    action: str
    actor: str
    entity_type: str = ""
    entity_id: str = ""
    outcome: str = "success"
    details: Mapping[str, Any] = field(default_factory=dict)


class ChainRecord(Protocol):
    """What readers of a record need (:class:`AuditRecord` and :class:`ChainRow` have it): the
    FHIR AuditEvent view and the ATNA sender take this, not the ORM class."""

    seq: int
    at: datetime
    action: str
    actor: str
    entity_type: str
    entity_id: str
    outcome: str
    details: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class ChainRow:
    """The column values of one new record (what :class:`AuditRecord` holds, without the ORM)."""

    seq: int
    at: datetime
    action: str
    actor: str
    entity_type: str
    entity_id: str
    outcome: str
    details: str
    prev_hash: str
    hash: str

    def record(self) -> AuditRecord:
        return AuditRecord(seq=self.seq, at=self.at, action=self.action, actor=self.actor,
                           entity_type=self.entity_type, entity_id=self.entity_id, outcome=self.outcome,
                           details=self.details, prev_hash=self.prev_hash, hash=self.hash)


def link(head: tuple[int, str] | None, events: Sequence[ChainEvent]) -> list[ChainRow]:
    """The records that append ``events``, in order, after ``head`` ((seq, hash) of the last
    record, None for an empty chain): the one place records are built and hashed."""
    seq, prev_hash = head if head else (0, GENESIS)
    rows = []
    for event in events:
        seq += 1
        at = utcnow()
        values = dict(event.details)
        details = _details_json(values)
        # A flat object of text keys and plain values reads back as itself: no need to parse
        # the JSON just written (anything else is hashed as it reads back, as verify() does).
        flat = all(type(k) is str and isinstance(v, _PLAIN) and not isinstance(v, float) for k, v in values.items())
        hashed = chain_hash(prev_hash, _fields(seq, at, event.action, event.actor, event.entity_type,
                                               event.entity_id, event.outcome, details,
                                               values if flat else None))
        rows.append(ChainRow(seq, at, event.action, event.actor, event.entity_type, event.entity_id,
                             event.outcome, details, prev_hash, hashed))
        prev_hash = hashed
    return rows


class ChainSql:
    """The chain's statements as driver SQL for one dialect, built once.

    Appending runs for every stored instance, where SQLAlchemy's statement compilation, cache
    keys and parameter processing cost more than the statements (~40 us each through
    ``exec_driver_sql``, ~3 us on the DBAPI cursor with SQLite), so the writers below use the
    DBAPI cursor of the caller's connection, inside its transaction. Values are bound through the
    column types' own bind processors, so rows are stored exactly as the ORM stores them.
    """

    def __init__(self, dialect: Dialect) -> None:
        style = dialect.paramstyle
        if style not in ("qmark", "format", "pyformat", "numeric_dollar"):
            raise ValueError(f"the audit chain's driver SQL needs a qmark/format/pyformat/numeric_dollar driver, "
                             f"not {style!r} ({dialect.name}); use SQLite, or PostgreSQL through psycopg or asyncpg")
        marks = [f"${i}" if style == "numeric_dollar" else "?" if style == "qmark" else "%s" for i in range(1, 11)]
        #: The placeholder for the ingest path's own statements (it runs on qmark/format drivers only).
        self.placeholder = "?" if style == "qmark" else "%s"
        lock = writer_lock_sql(dialect)
        #: The writer lock (ground.db) that orders the chain; None on SQLite, whose BEGIN
        #: IMMEDIATE (``begin``) already holds it.
        self.lock = lock.lock
        #: How a transaction on a raw DBAPI connection must begin to hold the writer lock.
        self.begin = lock.begin
        self.lock_params = lock.params
        #: (seq, hash) of the last record; no row for an empty chain.
        self.head = "SELECT seq, hash FROM audit_event WHERE seq = (SELECT max(seq) FROM audit_event)"
        self.insert = (
            "INSERT INTO audit_event (seq, at, action, actor, entity_type, entity_id, outcome, details, "
            f"prev_hash, hash) VALUES ({', '.join(marks)})"
        )
        self.bind_at = bind_processor(AuditRecord.__table__.c.at, dialect)  # type: ignore[attr-defined]

    def params(self, row: ChainRow) -> tuple[Any, ...]:
        return (row.seq, self.bind_at(row.at), row.action, row.actor, row.entity_type, row.entity_id,
                row.outcome, row.details, row.prev_hash, row.hash)

    def write(self, row: ChainRow) -> tuple[str, tuple[Any, ...]]:
        """The INSERT of ``row`` and its parameters, for a caller that batches its writes."""
        return self.insert, self.params(row)


def bind_processor(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """How SQLAlchemy turns a Python value into a driver value for ``column`` on ``dialect``
    (e.g. an aware datetime into SQLite's text form), as a plain function."""
    proc = column.type.dialect_impl(dialect).bind_processor(dialect)
    return proc if proc is not None else _identity


def _identity(value: Any) -> Any:
    return value


@functools.lru_cache(maxsize=16)  # one per engine's dialect; a process has one or two
def chain_sql(dialect: Dialect) -> ChainSql:
    """The (cached) :class:`ChainSql` for ``dialect``."""
    return ChainSql(dialect)


def append(
    cursor: Any, sql: ChainSql, head: tuple[int, str] | None, events: Sequence[ChainEvent]
) -> list[ChainRow]:
    """Append ``events`` after ``head`` on a DBAPI cursor, in the caller's transaction.

    The caller holds the chain lock (:func:`lock_chain`, or ``sql.lock`` on the same connection)
    and read ``head`` (``sql.head``) after taking it: the ingest path folds that read into its own
    query. :func:`record` and :func:`record_many` go through here too.
    """
    rows = link(head, events)
    if len(rows) == 1:
        cursor.execute(sql.insert, sql.params(rows[0]))
    elif rows:
        cursor.executemany(sql.insert, [sql.params(r) for r in rows])
    return rows


def lock_chain(session: Session) -> None:
    """Serialise this transaction with every other writer of the chain: the chain's order is the
    database layer's writer lock (:func:`ground.db.writer_lock`, whose docstring gives the lock
    order), which also serialises the caller's own writes that follow."""
    writer_lock(session)


def _append_in_session(session: Session, events: Sequence[ChainEvent], *, lock: bool) -> list[ChainRow]:
    conn = session.connection()
    sql = chain_sql(conn.dialect)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if lock and sql.lock:
            cursor.execute(sql.lock, sql.lock_params)
        cursor.execute(sql.head)
        head = cursor.fetchone()
        return append(cursor, sql, (head[0], head[1]) if head else None, events)
    finally:
        cursor.close()


def record(
    session: Session,
    *,
    action: str,
    actor: str,
    entity_type: str = "",
    entity_id: str = "",
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
) -> AuditRecord:
    """Append one event to the chain inside the caller's transaction (the one entry point).

    ``details`` must hold no PHI beyond identifiers: it is exported to researchers.
    """
    lock_chain(session)
    event = ChainEvent(action, actor, entity_type, entity_id, outcome, details or {})
    return _append_in_session(session, [event], lock=False)[0].record()


def record_many(session: Session, events: Sequence[ChainEvent]) -> list[AuditRecord]:
    """Append ``events`` to the chain, in order, inside the caller's transaction.

    The records are exactly those that calling :func:`record` once per event would write (same
    fields, same hashes), but the chain lock is taken once, the head is read once and the rows go
    in one INSERT: the group-commit writer of the API's access log appends whole batches this way.
    """
    if not events:
        return []
    # lock_chain's lock, taken on the connection (no ORM round trip)
    return [row.record() for row in _append_in_session(session, events, lock=True)]


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def iter_records(session: Session, *, batch: int = 1000) -> Iterator[AuditRecord]:
    """All records in chain order, fetched in batches."""
    last = 0
    while True:
        rows = session.exec(
            select(AuditRecord).where(AuditRecord.seq > last).order_by(AuditRecord.seq).limit(batch)  # type: ignore[arg-type]
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify(session: Session) -> Verification:
    """Recompute the chain; report the first record that does not match."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for rec in iter_records(session):
        if rec.seq != expected_seq:
            return Verification(False, count, rec.seq, f"gap: expected seq {expected_seq}, found {rec.seq}")
        if rec.prev_hash != prev:
            return Verification(False, count, rec.seq, "prev_hash does not match the previous record")
        if chain_hash(prev, _hashed_fields(rec)) != rec.hash:
            return Verification(False, count, rec.seq, "record content does not match its hash")
        prev = rec.hash
        expected_seq += 1
        count += 1
    return Verification(True, count)


def export_jsonl(session: Session, out: TextIO) -> int:
    """Write the chain as JSON Lines (one record a line, with its hashes) for analysis."""
    n = 0
    for rec in iter_records(session):
        out.write(json.dumps({**_hashed_fields(rec), "prev_hash": rec.prev_hash, "hash": rec.hash}, ensure_ascii=False))
        out.write("\n")
        n += 1
    return n
