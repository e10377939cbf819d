"""Append-only, hash-chained audit trail.

Every record carries the SHA-256 of the previous record's hash and its own canonical JSON form
(sorted keys, no whitespace, UTF-8), so that changing, removing or reordering any past record is
detected by :func:`verify`. Writers are serialised per database (an advisory lock on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite) so the chain never forks. The record shares the caller's
transaction: the audited change and its record commit together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import Column, Text, text
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlmodel import Field, Session, SQLModel, col, select

from taqrir.db import as_utc, utcnow

GENESIS = "0" * 64
_PG_LOCK_KEY = 0x7A71_2001  # arbitrary constant naming "the audit chain" lock


class AuditRecord(SQLModel, table=True):
    """One audited event. Never updated, never deleted."""

    __tablename__ = "audit_event"

    seq: int = Field(primary_key=True, description="Position in the chain, from 1, without gaps.")
    at: datetime = Field(index=True)
    action: str = Field(index=True, max_length=64, description="e.g. association.accepted, draft.read")
    actor: str = Field(max_length=256, description="Who: a calling AE, a user, a worker.")
    entity_type: str = Field(default="", max_length=64, index=True)
    entity_id: str = Field(default="", max_length=256, index=True)
    outcome: str = Field(default="success", max_length=32)
    details: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


def canonical(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON form hashed into the chain."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def chain_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash and this record's canonical form."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(fields)).hexdigest()


def _hashed_fields(rec: AuditRecord) -> dict[str, Any]:
    return {
        "seq": rec.seq,
        "at": as_utc(rec.at).isoformat(timespec="microseconds"),
        "action": rec.action,
        "actor": rec.actor,
        "entity_type": rec.entity_type,
        "entity_id": rec.entity_id,
        "outcome": rec.outcome,
        "details": json.loads(rec.details),
    }


def lock_chain(session: Session) -> None:
    """Serialise this transaction with every other writer of the chain (PostgreSQL; SQLite's
    BEGIN IMMEDIATE already does). Taking it first also serialises the caller's own upserts."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=_PG_LOCK_KEY))  # type: ignore[call-overload]


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
    # Core statements: this runs for every stored instance, and ORM round trips showed up there.
    head = session.connection().execute(
        sa_select(col(AuditRecord.seq), col(AuditRecord.hash)).order_by(col(AuditRecord.seq).desc()).limit(1)
    ).first()
    prev_hash = head.hash if head else GENESIS
    rec = AuditRecord(
        seq=(head.seq + 1) if head else 1,
        at=utcnow(),
        action=action,
        actor=actor,
        entity_type=entity_type,
        entity_id=entity_id,
        outcome=outcome,
        details=json.dumps(dict(details or {}), sort_keys=True, ensure_ascii=False, default=str),
        prev_hash=prev_hash,
        hash="",
    )
    rec.hash = chain_hash(prev_hash, _hashed_fields(rec))
    session.connection().execute(sa_insert(AuditRecord).values(**rec.model_dump()))
    return rec


@dataclass(frozen=True)
class AuditEvent:
    """One event for :func:`record_many` (the keyword arguments of :func:`record`)."""

    action: str
    actor: str
    entity_type: str = ""
    entity_id: str = ""
    outcome: str = "success"
    details: Mapping[str, Any] = field(default_factory=dict)


def record_many(session: Session, events: Sequence[AuditEvent]) -> list[AuditRecord]:
    """Append ``events`` to the chain, in order, inside the caller's transaction.

    The records are exactly those that calling :func:`record` once per event would write (same
    fields, same hashes), but the chain lock is taken once, the head is read once and the rows go
    in one INSERT: the group-commit writer of the API's access log appends whole batches this way.
    """
    if not events:
        return []
    conn = session.connection()
    if conn.dialect.name == "postgresql":  # lock_chain's lock, taken on the connection (no ORM round trip)
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    head = conn.execute(
        sa_select(col(AuditRecord.seq), col(AuditRecord.hash)).order_by(col(AuditRecord.seq).desc()).limit(1)
    ).first()
    prev_hash = head.hash if head else GENESIS
    seq = head.seq if head else 0
    out: list[AuditRecord] = []
    for event in events:
        seq += 1
        rec = AuditRecord(
            seq=seq,
            at=utcnow(),
            action=event.action,
            actor=event.actor,
            entity_type=event.entity_type,
            entity_id=event.entity_id,
            outcome=event.outcome,
            details=json.dumps(dict(event.details), sort_keys=True, ensure_ascii=False, default=str),
            prev_hash=prev_hash,
            hash="",
        )
        rec.hash = prev_hash = chain_hash(prev_hash, _hashed_fields(rec))
        out.append(rec)
    conn.execute(sa_insert(AuditRecord.__table__), [r.model_dump() for r in out])  # type: ignore[attr-defined]
    return out


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
