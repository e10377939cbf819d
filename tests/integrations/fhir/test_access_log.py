"""The access-audit writer on its own: group commit, the records it writes, failures reported.

One batching loop, two ways to append a batch (PostgreSQL: asyncpg on the event loop; SQLite: the
ORM session in a worker thread): both must write the records that :func:`audit.chain.record` would
(the chain verifies), and both must let every waiter of a batch hear about a failure.
"""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from audit.access_writer import AccessNotRecorded, access_writer
from audit.chain import AuditRecord, record, verify
from ground.db import session_scope


def _records(engine: Engine) -> list[AuditRecord]:
    with session_scope(engine) as s:
        return list(s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all())


def test_concurrent_accesses_share_a_commit_and_the_chain_verifies(engine: Engine) -> None:
    with session_scope(engine) as s:  # a record written by the ordinary entry point comes first
        record(s, action="study.stable", actor="listener", entity_type="Study", entity_id="1.2.3")
    auditor = access_writer(engine, linger_s=0.05)

    async def main() -> None:
        try:
            await asyncio.gather(
                *(auditor.record(action="fhir.read", actor="dr.a", entity_type="DiagnosticReport",
                                 entity_id=f"dr-{i}", details={"version": 1}) for i in range(5)),
                auditor.record(action="fhir.search", actor="dr.a", entity_type="Patient",
                               details={"params": ["_id"], "total": 0, "returned": [], "included": []}),
                auditor.record(action="fhir.read", actor="dr.b", entity_type="Patient", entity_id="p-1"),
            )
            # a later access, after the batch committed, is a record of its own
            await auditor.record(action="fhir.read", actor="dr.a", entity_type="Patient", entity_id="p-2")
        finally:
            await auditor.aclose()

    asyncio.run(main())
    rows = _records(engine)
    assert [(r.action, r.actor, r.entity_type, r.entity_id) for r in rows] == [
        ("study.stable", "listener", "Study", "1.2.3"),
        ("fhir.read", "dr.a", "DiagnosticReport", ""),  # five reads of one caller: one record
        ("fhir.search", "dr.a", "Patient", ""),
        ("fhir.read", "dr.b", "Patient", "p-1"),
        ("fhir.read", "dr.a", "Patient", "p-2"),
    ]
    reads = json.loads(rows[1].details)["events"]
    assert [e["entity_id"] for e in reads] == [f"dr-{i}" for i in range(5)]
    assert all(e["version"] == 1 and e["at"] for e in reads)
    with session_scope(engine) as s:
        assert verify(s).ok
    # the writer's timestamps read back as the ORM's do (aware UTC; verify() above checked the instant)
    assert all(r.at.utcoffset() is not None and r.at.utcoffset().total_seconds() == 0 for r in rows)


def test_a_failed_batch_fails_every_waiter_and_the_next_one_succeeds(engine: Engine) -> None:
    auditor = access_writer(engine, linger_s=0.02, timeout_s=10)

    async def main() -> None:
        try:
            await auditor.record(action="fhir.read", actor="dr.a", entity_type="Patient", entity_id="p-0")
            with session_scope(engine) as s:
                s.exec(text("ALTER TABLE audit_event RENAME TO audit_event_away"))  # type: ignore[call-overload]
            results = await asyncio.gather(
                *(auditor.record(action="fhir.read", actor=f"dr.{i}", entity_type="Patient", entity_id="p-1")
                  for i in range(3)), return_exceptions=True)
            assert all(isinstance(r, AccessNotRecorded) for r in results), results
            with session_scope(engine) as s:
                s.exec(text("ALTER TABLE audit_event_away RENAME TO audit_event"))  # type: ignore[call-overload]
            await auditor.record(action="fhir.read", actor="dr.a", entity_type="Patient", entity_id="p-2")
        finally:
            await auditor.aclose()

    asyncio.run(main())
    assert [r.entity_id for r in _records(engine)] == ["p-0", "p-2"]
    with session_scope(engine) as s:
        assert verify(s).ok


def test_each_event_loop_gets_its_own_writer(engine: Engine) -> None:
    """A server restarted in the same process (a new loop) keeps recording."""
    auditor = access_writer(engine)

    async def one(n: int) -> None:
        await auditor.record(action="fhir.read", actor="dr.a", entity_type="Patient", entity_id=f"p-{n}")

    asyncio.run(one(1))  # its loop closes without aclose: the next loop must not use that writer
    async def last() -> None:
        try:
            await one(2)
        finally:
            await auditor.aclose()

    asyncio.run(last())
    assert [r.entity_id for r in _records(engine)] == ["p-1", "p-2"]
