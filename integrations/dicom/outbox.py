"""The durable outbox: one row per (DICOM object, destination), and its state machine.

Publishing a draft writes its DICOM objects (``reporting/dicom`` builds them) and calls
:func:`enqueue_objects` in the same transaction, so an object is either queued for every
destination that takes its kind or not written at all. Delivery (:mod:`.export`) then moves each
row on its own, so one destination that is down or refuses us never delays another::

    pending --claim--> sending --C-STORE ok--> sent
                          |--transient--> failed --(next_attempt_at due)--> sending ...
                          |--permanent--> dead   (reason kept; `taqrir outbox retry --dead` replays)
    sending (worker died, lease expired) --sweep--> sending again (same SOP Instance UID)

The database, not the broker, says what is due: :func:`due_rows` lists rows whose next attempt has
come, and every state change is a compare-and-set on (id, state, attempts) so two workers that got
the same message never both send. Re-sending is harmless: a PACS stores an instance once per SOP
Instance UID, and the builders derive that UID from the draft id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Column, Text, UniqueConstraint
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col, func, or_, select, update

from audit.chain import record
from ground.clock import utcnow

from .destinations import Destination, ObjectKind

log = logging.getLogger(__name__)

ACTOR = "taqrir-export"


class OutboxState(StrEnum):
    """Where one (object, destination) row stands."""

    pending = "pending"
    """Queued, never tried."""
    sending = "sending"
    """A worker holds it (since ``claimed_at``)."""
    sent = "sent"
    """The PACS answered C-STORE success (or a warning)."""
    failed = "failed"
    """The last attempt failed transiently; tried again at ``next_attempt_at``."""
    dead = "dead"
    """Refused for good, or transient for longer than ``export.give_up_after``; see ``last_error``."""


class CommitmentState(StrEnum):
    """Storage Commitment (PS3.4 Annex J) of one sent object, when its destination asks for it."""

    requested = "requested"
    committed = "committed"
    failed = "failed"
    timed_out = "timed_out"
    unsupported = "unsupported"


class OutboxObject(BaseModel):
    """One DICOM object to send: what publishing hands to :func:`enqueue_objects`."""

    model_config = ConfigDict(frozen=True)

    kind: ObjectKind = Field(description="sr, pdf, kos or verified_sr: destinations choose by kind.")
    sop_class_uid: str = Field(min_length=1, max_length=64)
    sop_instance_uid: str = Field(min_length=1, max_length=64, description="Derived from the draft id: stable.")
    location: str = Field(
        min_length=1, max_length=1024,
        description="Where the Part 10 file is: a key in Taqrir's storage, or an absolute path.",
    )


class OutboxItem(SQLModel, table=True):
    """One object for one destination."""

    __tablename__ = "dicom_outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_instance_destination"),)

    id: int | None = SQLField(default=None, primary_key=True)
    destination: str = SQLField(max_length=64, index=True, description="Destination.name in the settings.")
    kind: str = SQLField(max_length=16)
    draft_id: str = SQLField(max_length=64, index=True)
    study_instance_uid: str = SQLField(max_length=64, index=True)
    sop_class_uid: str = SQLField(max_length=64)
    sop_instance_uid: str = SQLField(max_length=64, index=True)
    location: str = SQLField(max_length=1024, description="Storage key or absolute path of the Part 10 file.")
    state: str = SQLField(default=OutboxState.pending.value, max_length=16, index=True)
    attempts: int = SQLField(default=0, description="Attempts started (each claim counts).")
    next_attempt_at: datetime = SQLField(default_factory=utcnow, index=True)
    claimed_at: datetime | None = SQLField(default=None, description="When the current 'sending' began.")
    dispatched_at: datetime | None = SQLField(default=None, description="When the sweep last sent its task.")
    first_failure_at: datetime | None = SQLField(default=None, description="Start of the current run of failures.")
    last_error: str | None = SQLField(default=None, sa_column=Column(Text))
    last_status: int | None = SQLField(default=None, description="Last DIMSE status the PACS answered.")
    created_at: datetime = SQLField(default_factory=utcnow)
    updated_at: datetime = SQLField(default_factory=utcnow)
    sent_at: datetime | None = None
    commitment: str | None = SQLField(default=None, max_length=16, description="CommitmentState, when asked for.")
    commitment_uid: str | None = SQLField(default=None, max_length=64, description="Transaction UID of the N-ACTION.")
    commitment_at: datetime | None = None

    def path(self, storage_root: Path | None) -> Path:
        """The file to send: ``location`` as an absolute path, or under the storage root."""
        p = Path(self.location)
        if p.is_absolute() or storage_root is None:
            return p
        return storage_root / self.location


# -- enqueue ---------------------------------------------------------------------------------

def enqueue_objects(
    session: Session,
    *,
    draft_id: str,
    study_instance_uid: str,
    objects: Sequence[OutboxObject],
    destinations: Sequence[Destination],
) -> list[int]:
    """Queue every object for every destination that takes its kind, inside the caller's
    transaction (commit it with the objects' files written). Returns the outbox row ids, existing
    ones included: calling twice for the same object and destination makes one row.

    ``destinations`` are ``export.destinations`` of the caller's settings.
    """
    ids: list[int] = []
    for obj in objects:
        for dest in destinations:
            if not dest.takes(obj.kind):
                continue
            existing = session.exec(select(OutboxItem.id).where(
                OutboxItem.sop_instance_uid == obj.sop_instance_uid, OutboxItem.destination == dest.name)).first()
            if existing is not None:
                ids.append(existing)
                continue
            row = OutboxItem(destination=dest.name, kind=obj.kind.value, draft_id=draft_id,
                             study_instance_uid=study_instance_uid, sop_class_uid=obj.sop_class_uid,
                             sop_instance_uid=obj.sop_instance_uid, location=obj.location)
            try:
                with session.begin_nested():
                    session.add(row)
                    session.flush()
            except IntegrityError:  # a concurrent publish of the same draft queued it first
                again = session.exec(select(OutboxItem.id).where(
                    OutboxItem.sop_instance_uid == obj.sop_instance_uid, OutboxItem.destination == dest.name)).one()
                assert again is not None
                ids.append(again)
                continue
            assert row.id is not None
            ids.append(row.id)
            record(session, action="export.queued", actor=ACTOR, entity_type="DicomObject",
                   entity_id=obj.sop_instance_uid,
                   details={"outbox_id": row.id, "destination": dest.name, "kind": obj.kind.value,
                            "draft_id": draft_id, "study": study_instance_uid})
    return ids


# -- the state machine -------------------------------------------------------------------------

def claim(session: Session, row_id: int, *, lease_s: float) -> OutboxItem | None:
    """pending/failed (due) or sending (lease expired) -> sending, attempts + 1 (audited).

    None when the row is not due, already sent or dead, or another worker holds it: the caller
    does nothing. The compare-and-set includes ``attempts``, so of two workers that read the
    same row only one moves it.
    """
    row = session.get(OutboxItem, row_id)
    if row is None:
        return None
    now = utcnow()
    state = OutboxState(row.state)
    if state in (OutboxState.pending, OutboxState.failed):
        if row.next_attempt_at > now:
            return None
    elif state is OutboxState.sending:
        if row.claimed_at is not None and row.claimed_at > now - timedelta(seconds=lease_s):
            return None
    else:
        return None
    res = session.exec(update(OutboxItem).where(col(OutboxItem.id) == row_id, col(OutboxItem.state) == row.state,
                                                col(OutboxItem.attempts) == row.attempts)
                       .values(state=OutboxState.sending.value, attempts=row.attempts + 1, claimed_at=now,
                               dispatched_at=None, updated_at=now))
    if not res.rowcount:
        return None
    session.refresh(row)
    record(session, action="export.attempt", actor=ACTOR, entity_type="DicomObject", entity_id=row.sop_instance_uid,
           details={"outbox_id": row.id, "destination": row.destination, "attempt": row.attempts,
                    "kind": row.kind, "resent_after_lost_worker": state is OutboxState.sending})
    return row


def _finish(session: Session, row: OutboxItem, *, action: str, outcome: str, details: dict[str, object],
            **values: object) -> bool:
    now = utcnow()
    res = session.exec(update(OutboxItem).where(col(OutboxItem.id) == row.id,
                                                col(OutboxItem.state) == OutboxState.sending.value,
                                                col(OutboxItem.attempts) == row.attempts)
                       .values(updated_at=now, claimed_at=None, **values))
    if not res.rowcount:
        log.info("outbox row %s changed under attempt %d; result not recorded", row.id, row.attempts)
        return False
    record(session, action=action, actor=ACTOR, entity_type="DicomObject", entity_id=row.sop_instance_uid,
           outcome=outcome, details={"outbox_id": row.id, "destination": row.destination, "attempt": row.attempts,
                                     **details})
    return True


def mark_sent(session: Session, row: OutboxItem, *, status: int, comment: str = "",
              commitment: CommitmentState | None = None, commitment_uid: str | None = None) -> bool:
    """sending -> sent (audited). A commitment still ``requested`` is left as it is on the row (the
    PACS's report may already have arrived); a request that failed is recorded."""
    now = utcnow()
    extra: dict[str, object] = {}
    if commitment is not None and commitment is not CommitmentState.requested:
        extra = {"commitment": commitment.value, "commitment_uid": commitment_uid, "commitment_at": now}
    return _finish(session, row, action="export.sent", outcome="success",
                   details={"status": f"0x{status:04X}", "comment": comment[:200],
                            "commitment": commitment.value if commitment else None},
                   state=OutboxState.sent.value, sent_at=now, last_status=status, last_error=None,
                   first_failure_at=None, **extra)


def note_commitment_requested(session: Session, row_ids: Sequence[int], transaction_uid: str) -> None:
    """Storage Commitment about to be asked for these rows under ``transaction_uid``."""
    now = utcnow()
    session.exec(update(OutboxItem).where(col(OutboxItem.id).in_(list(row_ids)))
                 .values(commitment=CommitmentState.requested.value, commitment_uid=transaction_uid,
                         commitment_at=now))


def mark_failed(session: Session, row: OutboxItem, *, reason: str, status: int | None, retry_in_s: float,
                give_up_after_s: float) -> OutboxState:
    """sending -> failed (transient, retried in ``retry_in_s``), or dead when failures have
    lasted longer than ``give_up_after_s``. Returns the new state."""
    now = utcnow()
    first = row.first_failure_at or now
    if (now - first).total_seconds() >= give_up_after_s:
        mark_dead(session, row, reason=f"gave up after {row.attempts} attempts over "
                                       f"{(now - first).total_seconds() / 3600:.1f} h; last: {reason}",
                  status=status, first_failure_at=first)
        return OutboxState.dead
    _finish(session, row, action="export.failed", outcome="failure",
            details={"reason": reason[:500], "status": None if status is None else f"0x{status:04X}",
                     "retry_in_s": round(retry_in_s, 1)},
            state=OutboxState.failed.value, last_error=reason[:4000], last_status=status,
            first_failure_at=first, next_attempt_at=now + timedelta(seconds=retry_in_s))
    return OutboxState.failed


def mark_dead(session: Session, row: OutboxItem, *, reason: str, status: int | None,
              first_failure_at: datetime | None = None) -> bool:
    """sending -> dead, with the reason (audited). Nothing retries it but a person."""
    return _finish(session, row, action="export.dead", outcome="failure",
                   details={"reason": reason[:500], "status": None if status is None else f"0x{status:04X}"},
                   state=OutboxState.dead.value, last_error=reason[:4000], last_status=status,
                   first_failure_at=first_failure_at or row.first_failure_at or utcnow())


def record_commitment(session: Session, *, transaction_uid: str, committed: Sequence[str],
                      failed: Sequence[tuple[str, int]], peer: str) -> int:
    """Storage Commitment results (an N-EVENT-REPORT) onto the rows of that transaction; returns
    how many rows changed. Unknown transaction UIDs change nothing (and are audited as such)."""
    rows = session.exec(select(OutboxItem).where(OutboxItem.commitment_uid == transaction_uid)).all()
    now = utcnow()
    failed_uids = {uid: reason for uid, reason in failed}
    changed = 0
    for row in rows:
        if row.sop_instance_uid in committed:
            row.commitment = CommitmentState.committed.value
        elif row.sop_instance_uid in failed_uids:
            row.commitment = CommitmentState.failed.value
            row.last_error = f"storage commitment refused: failure reason 0x{failed_uids[row.sop_instance_uid]:04X}"
        else:
            continue
        row.commitment_at = now
        row.updated_at = now
        session.add(row)
        changed += 1
    record(session, action="export.commitment", actor=peer, entity_type="StorageCommitment", entity_id=transaction_uid,
           outcome="success" if not failed and rows else "failure",
           details={"committed": len(committed), "failed": [[u, f"0x{r:04X}"] for u, r in failed],
                    "rows": changed, "known_transaction": bool(rows)})
    return changed


def expire_commitments(session: Session, *, timeout_s: float) -> int:
    """Storage Commitment requests left unanswered for ``timeout_s`` become ``timed_out`` (audited,
    one record per transaction). The object itself was stored (C-STORE success); only the PACS's
    promise to keep it is missing, so the row stays ``sent`` and a person decides (``taqrir outbox
    retry ID`` sends it again). Returns how many rows changed."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    rows = session.exec(select(OutboxItem).where(col(OutboxItem.commitment) == CommitmentState.requested.value,
                                                 col(OutboxItem.commitment_at) < cutoff)).all()
    by_uid: dict[str, list[OutboxItem]] = {}
    for row in rows:
        by_uid.setdefault(row.commitment_uid or "", []).append(row)
    now = utcnow()
    changed = 0
    for uid, group in by_uid.items():
        res = session.exec(update(OutboxItem).where(col(OutboxItem.id).in_([r.id for r in group]),
                                                    col(OutboxItem.commitment) == CommitmentState.requested.value)
                           .values(commitment=CommitmentState.timed_out.value, commitment_at=now, updated_at=now))
        if res.rowcount:
            changed += res.rowcount
            record(session, action="export.commitment", actor=ACTOR, entity_type="StorageCommitment",
                   entity_id=uid, outcome="failure",
                   details={"timed_out_after_s": timeout_s, "rows": [r.id for r in group],
                            "destinations": sorted({r.destination for r in group})})
    return changed


def read_commitment_report(path: Path, event_type_id: int) -> tuple[str, list[str], list[tuple[str, int]]]:
    """(transaction UID, committed SOP Instance UIDs, (failed UID, failure reason)) from an
    N-EVENT-REPORT dataset (PS3.4 J.3.3.1: event type 1 all committed, 2 some failed). Raises
    ValueError when it is not one."""
    from pydicom import dcmread

    if event_type_id not in (1, 2):
        raise ValueError(f"event type {event_type_id} is not a storage commitment result")
    try:
        ds = dcmread(path)
    except Exception as err:
        raise ValueError(f"dataset unreadable: {type(err).__name__}") from err
    uid = str(ds.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("no Transaction UID")
    committed = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    failed = [(str(i.ReferencedSOPInstanceUID), int(i.get("FailureReason", 0x0110) or 0x0110))
              for i in ds.get("FailedSOPSequence", [])]
    return uid, committed, failed


# -- what is due, what is lost, what a person replays -----------------------------------------

def due_rows(session: Session, *, lease_s: float, limit: int = 500) -> list[int]:
    """Rows whose attempt is due: pending/failed with ``next_attempt_at`` passed, and sending rows
    whose worker has held them longer than the lease (it died). Oldest first."""
    now = utcnow()
    stmt = (select(OutboxItem.id)
            .where(or_(
                col(OutboxItem.state).in_([OutboxState.pending.value, OutboxState.failed.value])
                & (col(OutboxItem.next_attempt_at) <= now),
                (col(OutboxItem.state) == OutboxState.sending.value)
                & (col(OutboxItem.claimed_at) <= now - timedelta(seconds=lease_s)),
            ))
            .order_by(col(OutboxItem.next_attempt_at)).limit(limit))
    return [i for i in session.exec(stmt).all() if i is not None]


def take_due(session: Session, *, lease_s: float, redispatch_after_s: float, limit: int = 500) -> list[int]:
    """The sweep's share of :func:`due_rows`: rows whose task was not sent in the last
    ``redispatch_after_s`` (a message may sit in a busy queue), stamped as sent now so that
    concurrent sweepers and the next sweep do not send it again."""
    now = utcnow()
    out = []
    for row_id in due_rows(session, lease_s=lease_s, limit=limit):
        res = session.exec(update(OutboxItem).where(
            col(OutboxItem.id) == row_id,
            or_(col(OutboxItem.dispatched_at).is_(None),
                col(OutboxItem.dispatched_at) <= now - timedelta(seconds=redispatch_after_s)))
            .values(dispatched_at=now))
        if res.rowcount:
            out.append(row_id)
    return out


def with_siblings(session: Session, row_id: int) -> list[int]:
    """``row_id`` and the other due rows of the same draft and destination (pending, or failed
    with the retry due): sent together on one association, they cost one association setup
    instead of three. Their own tasks then find them sent and do nothing."""
    row = session.get(OutboxItem, row_id)
    if row is None:
        return [row_id]
    stmt = select(OutboxItem.id).where(
        OutboxItem.draft_id == row.draft_id, OutboxItem.destination == row.destination, OutboxItem.id != row_id,
        col(OutboxItem.state).in_([OutboxState.pending.value, OutboxState.failed.value]),
        col(OutboxItem.next_attempt_at) <= utcnow())
    return [row_id, *(i for i in session.exec(stmt.order_by(col(OutboxItem.id))).all() if i is not None)]


def rows_of_draft(session: Session, draft_id: str) -> list[int]:
    """Pending rows of one draft (to send at once after publishing)."""
    stmt = select(OutboxItem.id).where(OutboxItem.draft_id == draft_id,
                                       OutboxItem.state == OutboxState.pending.value)
    return [i for i in session.exec(stmt).all() if i is not None]


def replay(session: Session, *, ids: Sequence[int] = (), dead: bool = False, actor: str = "cli") -> list[int]:
    """``taqrir outbox retry``: the named rows (any state but sending/sent), or every dead row with
    ``dead``, or every failed row when neither is given, become pending and due now (audited)."""
    stmt = select(OutboxItem)
    if ids:
        stmt = stmt.where(col(OutboxItem.id).in_(list(ids)),
                          col(OutboxItem.state).in_([OutboxState.failed.value, OutboxState.dead.value,
                                                     OutboxState.pending.value]))
    elif dead:
        stmt = stmt.where(OutboxItem.state == OutboxState.dead.value)
    else:
        stmt = stmt.where(OutboxItem.state == OutboxState.failed.value)
    rows = session.exec(stmt).all()
    now = utcnow()
    out = []
    for row in rows:
        before = row.state
        row.state = OutboxState.pending.value
        row.next_attempt_at = now
        row.first_failure_at = None
        row.updated_at = now
        session.add(row)
        assert row.id is not None
        out.append(row.id)
        record(session, action="export.replayed", actor=actor, entity_type="DicomObject",
               entity_id=row.sop_instance_uid, details={"outbox_id": row.id, "destination": row.destination,
                                                        "was": before, "last_error": (row.last_error or "")[:300]})
    return out


def list_rows(session: Session, *, states: Sequence[str] = (), limit: int = 100) -> list[OutboxItem]:
    """Newest first, optionally only some states."""
    stmt = select(OutboxItem)
    if states:
        stmt = stmt.where(col(OutboxItem.state).in_(list(states)))
    return list(session.exec(stmt.order_by(col(OutboxItem.id).desc()).limit(limit)).all())


def counts(session: Session) -> dict[tuple[str, str], tuple[int, int]]:
    """(destination, state) -> (rows, attempts): what the metrics export."""
    stmt = select(OutboxItem.destination, OutboxItem.state, func.count(), func.coalesce(func.sum(OutboxItem.attempts), 0)
                  ).group_by(OutboxItem.destination, OutboxItem.state)
    return {(d, s): (int(n), int(a)) for d, s, n, a in session.exec(stmt).all()}
