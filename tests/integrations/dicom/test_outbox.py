"""The outbox table and its state machine, on SQLite and PostgreSQL (no network)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import select, update

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import session_scope
from integrations.dicom.destinations import Destination, ExportSettings, ObjectKind
from integrations.dicom.outbox import (
    OutboxItem,
    OutboxObject,
    OutboxState,
    claim,
    due_rows,
    enqueue_objects,
    expire_commitments,
    mark_dead,
    mark_failed,
    mark_sent,
    note_commitment_requested,
    record_commitment,
    replay,
)

PACS = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
ARCHIVE = Destination(name="archive", ae_title="ARCH", host="127.0.0.1", port=4243, kinds=[ObjectKind.pdf])
OBJECTS = [
    OutboxObject(kind=ObjectKind.sr, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22", sop_instance_uid="2.25.1",
                 location="exports/d1/sr.dcm"),
    OutboxObject(kind=ObjectKind.pdf, sop_class_uid="1.2.840.10008.5.1.4.1.1.104.1", sop_instance_uid="2.25.2",
                 location="/abs/report.dcm"),
]


def test_enqueue_is_idempotent_and_follows_kinds(engine: Engine) -> None:
    with session_scope(engine) as s:
        first = enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS,
                                destinations=[PACS, ARCHIVE])
    with session_scope(engine) as s:
        again = enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS,
                                destinations=[PACS, ARCHIVE])
        rows = s.exec(select(OutboxItem)).all()
        queued = s.exec(select(AuditRecord).where(AuditRecord.action == "export.queued")).all()
    assert len(first) == 3 and sorted(first) == sorted(again)
    assert sorted((r.destination, r.kind) for r in rows) == [("archive", "pdf"), ("pacs", "pdf"), ("pacs", "sr")]
    assert all(r.state == "pending" and r.attempts == 0 for r in rows)
    assert len(queued) == 3
    row = next(r for r in rows if r.kind == "sr")
    assert str(row.path(None)) == "exports/d1/sr.dcm"
    assert str(next(r for r in rows if r.kind == "pdf").path(None)) == "/abs/report.dcm"


def test_disabled_destination_queues_nothing(engine: Engine) -> None:
    off = PACS.model_copy(update={"enabled": False})
    with session_scope(engine) as s:
        assert enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS, destinations=[off]) == []


def test_state_machine(engine: Engine) -> None:
    cfg = ExportSettings(destinations=[PACS])
    with session_scope(engine) as s:
        [sr_id, pdf_id] = enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS,
                                          destinations=[PACS])
    with session_scope(engine) as s:
        assert sorted(due_rows(s, lease_s=60)) == sorted([sr_id, pdf_id])
        row = claim(s, sr_id, lease_s=60)
        assert row is not None and row.state == "sending" and row.attempts == 1
        assert claim(s, sr_id, lease_s=60) is None  # held by the first claim
        assert mark_failed(s, row, reason="connection refused", status=None, retry_in_s=cfg.backoff(1),
                           give_up_after_s=3600) is OutboxState.failed
    with session_scope(engine) as s:
        assert due_rows(s, lease_s=60) == [pdf_id]  # the failed one waits its backoff
        assert claim(s, sr_id, lease_s=60) is None
        s.exec(update(OutboxItem).where(OutboxItem.id == sr_id).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    with session_scope(engine) as s:
        row = claim(s, sr_id, lease_s=60)
        assert row is not None and row.attempts == 2
        assert mark_sent(s, row, status=0)
        pdf = claim(s, pdf_id, lease_s=60)
        assert pdf is not None
        assert mark_dead(s, pdf, reason="0xA900 refused", status=0xA900)
    with session_scope(engine) as s:
        sr, pdf_row = s.get(OutboxItem, sr_id), s.get(OutboxItem, pdf_id)
        assert sr is not None and sr.state == "sent" and sr.sent_at is not None and sr.last_error is None
        assert pdf_row is not None and pdf_row.state == "dead" and pdf_row.last_status == 0xA900
        assert due_rows(s, lease_s=60) == []
        assert replay(s, dead=True) == [pdf_id]
    with session_scope(engine) as s:
        assert due_rows(s, lease_s=60) == [pdf_id]
        actions = [r.action for r in s.exec(select(AuditRecord).order_by(AuditRecord.seq)).all()]
        assert actions.count("export.attempt") == 3
        assert {"export.sent", "export.failed", "export.dead", "export.replayed"} <= set(actions)
        assert verify(s).ok


def test_lost_worker_lease_and_give_up(engine: Engine) -> None:
    with session_scope(engine) as s:
        [row_id] = enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS[:1],
                                   destinations=[PACS])
    with session_scope(engine) as s:
        assert claim(s, row_id, lease_s=60) is not None
    with session_scope(engine) as s:  # the worker died: its lease runs out, the row is due again
        assert due_rows(s, lease_s=60) == []
        s.exec(update(OutboxItem).where(OutboxItem.id == row_id).values(claimed_at=utcnow() - timedelta(seconds=61)))
    with session_scope(engine) as s:
        assert due_rows(s, lease_s=60) == [row_id]
        row = claim(s, row_id, lease_s=60)
        assert row is not None and row.attempts == 2
        row.first_failure_at = utcnow() - timedelta(days=15)
        assert mark_failed(s, row, reason="timed out", status=None, retry_in_s=60,
                           give_up_after_s=14 * 86400) is OutboxState.dead
    with session_scope(engine) as s:
        dead = s.get(OutboxItem, row_id)
        assert dead is not None and dead.state == "dead" and "gave up after 2 attempts" in (dead.last_error or "")


def test_backoff_is_capped() -> None:
    cfg = ExportSettings(backoff_initial=30, backoff_factor=2, backoff_max=3600)
    assert [cfg.backoff(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert cfg.backoff(50) == 3600


def test_unanswered_commitment_times_out_answered_ones_stay(engine: Engine) -> None:
    with session_scope(engine) as s:
        ids = enqueue_objects(s, draft_id="d1", study_instance_uid="1.2.3", objects=OBJECTS, destinations=[PACS])
    with session_scope(engine) as s:
        note_commitment_requested(s, [ids[0]], "2.25.100")
        note_commitment_requested(s, [ids[1]], "2.25.200")
        assert record_commitment(s, transaction_uid="2.25.200", committed=["2.25.2"], failed=[], peer="ORTHANC") == 1
    with session_scope(engine) as s:  # not yet due
        assert expire_commitments(s, timeout_s=300) == 0
    with session_scope(engine) as s:
        s.exec(update(OutboxItem).where(OutboxItem.id == ids[0])  # type: ignore[arg-type]
               .values(commitment_at=utcnow() - timedelta(seconds=301)))
    with session_scope(engine) as s:
        assert expire_commitments(s, timeout_s=300) == 1
        assert expire_commitments(s, timeout_s=300) == 0  # once
        rows = {r.id: r for r in s.exec(select(OutboxItem)).all()}
        recs = s.exec(select(AuditRecord).where(AuditRecord.action == "export.commitment",
                                                AuditRecord.entity_id == "2.25.100")).all()
        assert verify(s).ok
    assert rows[ids[0]].commitment == "timed_out" and rows[ids[1]].commitment == "committed"
    assert len(recs) == 1 and recs[0].outcome == "failure"
