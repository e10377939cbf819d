"""The study lifecycle: its pure rules, exhaustively (every state, every event), and its
compare-and-set with the audit record in one transaction, on both databases."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import WRITER_LOCK_KEY, session_scope
from ground.errors import PermanentError
from integrations.dicom.index import Patient, Study
from integrations.dicom.lifecycle import (
    ArrivalSql,
    Decision,
    StudyEvent,
    StudyState,
    arrival,
    count_attempt,
    decide,
    on_instance,
    transition,
)

R, ST, Q, RE, INF, D, F = (StudyState.receiving, StudyState.stable, StudyState.queued, StudyState.rendering,
                         StudyState.inferring, StudyState.drafted, StudyState.failed)
E = StudyEvent

#: The specification, written out independently of the module's table: event -> (sources, target).
SPEC: dict[StudyEvent, tuple[set[StudyState], StudyState]] = {
    E.arrived: ({R, ST, Q, RE, INF, D, F}, R),
    E.quiet: ({R}, ST),
    E.enqueue: ({ST, Q, F}, Q),
    E.render: ({ST, Q, RE}, RE),
    E.infer: ({ST, Q, RE, INF}, INF),
    E.draft_found: ({ST, Q, RE, INF}, D),
    E.drafted: ({INF}, D),
    E.fail: ({ST, Q, RE, INF}, F),
    E.redraft: ({F, D}, Q),
}
NEW_VERSION_ON_ARRIVAL = {Q, RE, INF, D, F}

CT = "1.2.840.10008.5.1.4.1.1.2"
REPORT_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.104.1")


def test_every_event_is_specified() -> None:
    assert set(SPEC) == set(StudyEvent)


@pytest.mark.parametrize(("state", "event", "version"),
                         list(itertools.product(StudyState, StudyEvent, (1, 7))))
def test_decide(state: StudyState, event: StudyEvent, version: int) -> None:
    sources, target = SPEC[event]
    got = decide(state, version, event)
    assert decide(state.value, version, event) == got  # the stored string decides the same
    if state not in sources:
        assert got is None
    elif event is E.arrived and state in NEW_VERSION_ON_ARRIVAL:
        assert got == Decision(target, version + 1, True)
    else:
        assert got == Decision(target, version, False)


@pytest.mark.parametrize("state", list(StudyState))
def test_instances(state: StudyState) -> None:
    bumped = state in NEW_VERSION_ON_ARRIVAL
    assert on_instance(state, 3, CT) == Decision(R, 4 if bumped else 3, bumped)
    assert on_instance(state, 3) == Decision(R, 4 if bumped else 3, bumped)
    for report in REPORT_CLASSES:  # a signed SR / PDF coming back is not drafting input
        assert on_instance(state, 3, report) == Decision(state, 3, False)


@pytest.mark.parametrize("state", list(StudyState))
def test_arrival_fragment(state: StudyState) -> None:
    sql = ArrivalSql("?")
    got = arrival(sql, study_pk=5, study_uid="1.2.3", state=state.value, version=2, sop_class_uid=CT,
                  bound_now="NOW", actor="MODALITY")
    stmt, params = got.write
    if state is R:  # the hot path: only the receive time changes, nothing is audited
        assert got.event is None
        assert stmt == "UPDATE study SET last_received_at = ?, state = ?, version = ? WHERE id = ?"
        assert params == ("NOW", "receiving", 2, 5)
    elif state is ST:  # re-armed: audited, same version
        assert got.event is not None and got.event.action == "study.receiving"
        assert dict(got.event.details) == {"version": 2, "from": "stable", "new_version": False}
        assert params == ("NOW", "receiving", 2, "NOW", 5)
    else:  # a new version: its attempts and failure start again
        assert got.event is not None and got.event.entity_id == "1.2.3" and got.event.actor == "MODALITY"
        assert dict(got.event.details) == {"version": 3, "from": state.value, "new_version": True}
        assert stmt == ("UPDATE study SET last_received_at = ?, state = ?, version = ?, state_changed_at = ?,"
                        " attempts = ?, failure_reason = ? WHERE id = ?")
        assert params == ("NOW", "receiving", 3, "NOW", 0, None, 5)
    report = arrival(sql, study_pk=5, study_uid="1.2.3", state=state.value, version=2,
                     sop_class_uid=REPORT_CLASSES[0], bound_now="NOW", actor="RIS")
    assert report.event is None and report.write[1] == ("NOW", state.value, 2, 5)


def test_a_batch_s_study_updates_fold_into_one_per_study_as_running_them_in_order_would() -> None:
    """PostgreSQL runs a batch's writes as one statement, which may update a row only once: each
    study's arrivals fold into one UPDATE whose every column holds the last value set, where the
    study's first update stood; other writes pass unchanged, in order."""
    sql = ArrivalSql("?")
    args = dict(study_uid="1.2.3", sop_class_uid=CT, actor="MODALITY")
    a = arrival(sql, study_pk=5, state=D.value, version=2, bound_now="T1", **args)  # a new version
    other = arrival(sql, study_pk=7, state=R.value, version=1, bound_now="T2", **args)
    b = arrival(sql, study_pk=5, state=R.value, version=3, bound_now="T3", **args)
    insert = ("INSERT INTO instance (x) VALUES (?)", ("row",))
    folded = sql.coalesce([a.write, insert, other.write, b.write])
    assert folded == [
        ("UPDATE study SET last_received_at = ?, state = ?, version = ?, state_changed_at = ?, attempts = ?,"
         " failure_reason = ? WHERE id = ?", ("T3", "receiving", 3, "T1", 0, None, 5)),
        insert,
        other.write,
    ]
    assert sql.coalesce([insert]) == [insert] and sql.coalesce([]) == []


# -- the compare-and-set and its audit record, on the databases --------------------------------

def _study(engine: Engine, state: StudyState = R) -> int:
    with session_scope(engine) as s:
        patient = Patient(patient_id="P1")
        s.add(patient)
        s.flush()
        study = Study(study_instance_uid="1.2.3", patient_pk=patient.id or 0)
        s.add(study)
        s.flush()
        pk = study.id or 0
    with session_scope(engine) as s:  # set up by the test, not through the lifecycle
        s.connection().exec_driver_sql(f"UPDATE study SET state = '{state.value}' WHERE id = {pk}")
    return pk


def _row(engine: Engine) -> Study:
    with session_scope(engine) as s:
        return s.exec(select(Study)).one()


def _study_records(engine: Engine) -> list[tuple[str, dict[str, object]]]:
    with session_scope(engine) as s:
        return [(r.action, json.loads(r.details)) for r in
                s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()]


def _move(s: Session, pk: int, event: StudyEvent, version: int = 1, **kw: object) -> bool:
    return transition(s, study_pk=pk, study_uid="1.2.3", version=version, event=event, actor="test", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("event", [e for e in StudyEvent if e is not E.arrived])
def test_transition_is_a_compare_and_set_with_its_record(engine: Engine, event: StudyEvent) -> None:
    sources, target = SPEC[event]
    for state in StudyState:
        with session_scope(engine) as s:
            s.connection().exec_driver_sql("DELETE FROM study")
            s.connection().exec_driver_sql("DELETE FROM patient")
        pk = _study(engine, state)
        before = len(_study_records(engine))
        with session_scope(engine) as s:
            moved = _move(s, pk, event, reason="boom")
        row = _row(engine)
        records = _study_records(engine)[before:]
        assert moved == (state in sources)
        if moved:
            assert row.state == target.value
            assert row.failure_reason == ("boom" if target is F else None)
            assert records == [(f"study.{target.value}", {"version": 1})]
        else:
            assert row.state == state.value and records == []
        with session_scope(engine) as s:  # another version's message changes nothing
            assert not _move(s, pk, event, version=2)
    with session_scope(engine) as s:
        assert verify(s).ok


def test_state_and_record_commit_together(engine: Engine) -> None:
    pk = _study(engine)
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        assert _move(s, pk, E.quiet)
        raise RuntimeError("the transaction fails after the move")
    assert _row(engine).state == "receiving" and _study_records(engine) == []


def test_quiet_needs_silence_since_the_cutoff(engine: Engine) -> None:
    pk = _study(engine)
    last = _row(engine).last_received_at
    with session_scope(engine) as s:
        assert not _move(s, pk, E.quiet, received_before=last.replace(year=last.year - 1))
    with session_scope(engine) as s:
        assert _move(s, pk, E.quiet, received_before=utcnow(), details={"stable_after_s": 5.0})
    assert _study_records(engine) == [("study.stable", {"version": 1, "stable_after_s": 5.0})]


def test_attempts_are_counted_capped_and_reset_by_redraft(engine: Engine) -> None:
    pk = _study(engine, Q)
    for n in range(3):
        with session_scope(engine) as s:
            count_attempt(s, study_pk=pk, version=1, attempts=n, cap=3)
    assert _row(engine).attempts == 3
    with pytest.raises(PermanentError, match="gave up after 3 stage starts"), session_scope(engine) as s:
        count_attempt(s, study_pk=pk, version=1, attempts=3, cap=3)
    assert _row(engine).attempts == 3
    with session_scope(engine) as s:
        assert _move(s, pk, E.fail, reason="x") and _move(s, pk, E.redraft, details={"redraft": True})
    row = _row(engine)
    assert (row.state, row.attempts, row.failure_reason) == ("queued", 0, None)


def test_the_writer_lock_comes_before_the_study_row(engine: Engine) -> None:
    """Lock order (ground.db): while another transaction holds the writer lock (an ingest), a
    stage start waits for it *without* holding the study row, which the ingest will write next
    (the other order deadlocks on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises whole
    transactions)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("advisory and row locks are PostgreSQL's")
    pk = _study(engine, Q)
    done = threading.Event()

    def stage_start() -> None:
        with session_scope(engine) as s:
            count_attempt(s, study_pk=pk, version=1, attempts=0, cap=3)
            _move(s, pk, E.render)
        done.set()

    with engine.connect() as ingest:
        ingest.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITER_LOCK_KEY})
        worker = threading.Thread(target=stage_start)
        worker.start()
        time.sleep(0.5)
        assert not done.is_set()  # it waits for the writer lock ...
        ingest.execute(text("SELECT id FROM study WHERE id = :id FOR UPDATE NOWAIT"), {"id": pk})  # ... not holding the row
        ingest.execute(text("UPDATE study SET last_received_at = last_received_at WHERE id = :id"), {"id": pk})
        ingest.commit()
    worker.join(10)
    assert done.is_set()
    row = _row(engine)
    assert (row.state, row.attempts) == ("rendering", 1)
