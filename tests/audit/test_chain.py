from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from audit import chain
from audit.chain import (
    ChainEvent,
    append,
    chain_sql,
    export_jsonl,
    lock_chain,
    record,
    record_many,
    verify,
)
from ground.clock import as_utc
from ground.db import session_scope


def test_chain_records_verify_and_detect_tampering(engine: Engine) -> None:
    with session_scope(engine) as s:
        for i in range(5):
            record(s, action="instance.stored", actor="MODALITY", entity_type="Instance",
                   entity_id=f"1.2.3.{i}", details={"size": i, "عربي": "نص"})
    with session_scope(engine) as s:
        v = verify(s)
        assert v.ok and v.checked == 5
        buf = io.StringIO()
        assert export_jsonl(s, buf) == 5
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert lines[1]["prev_hash"] == lines[0]["hash"]
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET actor = 'MALLORY' WHERE seq = 3"))
    with session_scope(engine) as s:
        v = verify(s)
        assert not v.ok and v.first_bad_seq == 3
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET actor = 'MODALITY' WHERE seq = 3"))
        conn.execute(text("DELETE FROM audit_event WHERE seq = 4"))
    with session_scope(engine) as s:
        v = verify(s)
        assert not v.ok and v.first_bad_seq == 5


def test_rolled_back_transaction_leaves_no_record(engine: Engine) -> None:
    try:
        with session_scope(engine) as s:
            record(s, action="x", actor="y")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with session_scope(engine) as s:
        assert verify(s).checked == 0


# -- the records are those the ORM implementation wrote ----------------------------------------

#: Written by the previous implementation (AuditRecord through the ORM/Core, commit 0b24d77) for
#: the two events of _golden_events with utcnow() returning 09:30:01.123457 and then .123458
#: (SQLite; the text form of ``at`` is SQLAlchemy's).
GOLDEN = [
    (1, "2026-11-27 09:30:01.123457", "instance.new", "MODALITY", "Instance", "1.2.3.4", "success",
     '{"n": null, "size": 525000, "study": "1.2.3", "when": "2026-01-02 00:00:00+00:00", "z": [1, 2], "عربي": "نص"}',
     "0" * 64, "77d83e46420d81ea64e90ff90d2e60d36736f8a69b4763ad5eb146ca67687d54"),
    (2, "2026-11-27 09:30:01.123458", "association.accepted", "", "", "", "success", "{}",
     "77d83e46420d81ea64e90ff90d2e60d36736f8a69b4763ad5eb146ca67687d54",
     "43934c3ec1f84024e4713b42143a547097b19b4e642be1314a4c15d9391723a1"),
]


def _golden_events() -> list[ChainEvent]:
    return [
        ChainEvent(action="instance.new", actor="MODALITY", entity_type="Instance", entity_id="1.2.3.4",
                   details={"study": "1.2.3", "size": 525000, "عربي": "نص", "z": (1, 2),
                            "when": datetime(2026, 1, 2, tzinfo=UTC), "n": None}),
        ChainEvent(action="association.accepted", actor=""),
    ]


def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [datetime(2026, 11, 27, 9, 30, 1, 123456, tzinfo=UTC)]

    def tick() -> datetime:
        now[0] += timedelta(microseconds=1)
        return now[0]

    monkeypatch.setattr(chain, "utcnow", tick)


def _rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT seq, at, action, actor, entity_type, entity_id, outcome, details, prev_hash, hash "
            "FROM audit_event ORDER BY seq"
        ))]


def _comparable(rows: list[tuple[Any, ...]], dialect: str) -> list[tuple[Any, ...]]:
    """PostgreSQL returns ``at`` as a datetime: compare it in the golden text form."""
    if dialect == "sqlite":
        return rows
    return [(r[0], as_utc(r[1]).strftime("%Y-%m-%d %H:%M:%S.%f"), *r[2:]) for r in rows]


@pytest.mark.parametrize("writer", ["record", "record_many", "append"])
def test_records_are_those_of_the_orm_implementation(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                     writer: str) -> None:
    """record(), record_many() and the raw append() (the ingest path) write, byte for byte, the
    rows the previous ORM implementation wrote: same fields, same canonical JSON, same hashes."""
    _fixed_clock(monkeypatch)
    events = _golden_events()
    with session_scope(engine) as s:
        if writer == "record":
            for e in events:
                record(s, action=e.action, actor=e.actor, entity_type=e.entity_type, entity_id=e.entity_id,
                       outcome=e.outcome, details=e.details or None)
        elif writer == "record_many":
            record_many(s, events)
        else:
            conn = s.connection()
            sql = chain_sql(conn.dialect)
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if sql.lock:
                cursor.execute(sql.lock, sql.lock_params)
            cursor.execute(sql.head)
            assert cursor.fetchone() is None
            first = append(cursor, sql, None, events[:1])
            append(cursor, sql, (first[0].seq, first[0].hash), events[1:])
            cursor.close()
    assert _comparable(_rows(engine), engine.dialect.name) == GOLDEN
    with session_scope(engine) as s:
        assert verify(s).ok


def test_record_and_record_many_return_what_they_wrote(engine: Engine) -> None:
    with session_scope(engine) as s:
        one = record(s, action="a", actor="x", details={"k": 1})
        many = record_many(s, [ChainEvent("b", "y"), ChainEvent("c", "z", outcome="failure")])
    rows = _rows(engine)
    assert [(r.seq, r.action, r.hash, r.prev_hash) for r in (one, *many)] == [(r[0], r[2], r[9], r[8]) for r in rows]
    assert [r[0] for r in rows] == [1, 2, 3]


def test_concurrent_writers_never_fork_the_chain(engine: Engine) -> None:
    """Threads appending through record(), record_many() and the raw path at once: seq without
    gaps, one chain (the lock is taken before the head is read, on both databases)."""

    def work(i: int) -> None:
        for j in range(15):
            with session_scope(engine) as s:
                if (i + j) % 3 == 0:
                    record(s, action="t", actor=f"{i}")
                elif (i + j) % 3 == 1:
                    record_many(s, [ChainEvent("t", f"{i}"), ChainEvent("t", f"{i}")])
                else:
                    lock_chain(s)
                    conn = s.connection()
                    sql = chain_sql(conn.dialect)
                    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                    cursor.execute(sql.head)
                    head = cursor.fetchone()
                    append(cursor, sql, (head[0], head[1]) if head else None, [ChainEvent("t", f"{i}")])
                    cursor.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    with session_scope(engine) as s:
        v = verify(s)
    assert v.ok and v.checked == 4 * (5 * 1 + 5 * 2 + 5 * 1)
