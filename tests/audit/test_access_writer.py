"""The access writer's one batching loop, with an appender that keeps what it is given.

The databases' appenders are tested against SQLite and PostgreSQL in
tests/integrations/fhir/test_access_log.py; here the loop itself: batches, their size bound,
the grouping into chain events, failures reaching every waiter, one loop state per event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from audit.access_writer import AccessNotRecorded, AccessWriter, chain_events
from audit.chain import ChainEvent


class _Kept:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[ChainEvent]] = []
        self.fail = fail
        self.closed = False

    async def append(self, events: Sequence[ChainEvent]) -> None:
        await asyncio.sleep(0.01)  # a commit takes time: what arrives meanwhile forms the next batch
        if self.fail:
            raise RuntimeError("disk full")
        self.batches.append(list(events))

    async def aclose(self) -> None:
        self.closed = True


def test_lingering_writer_groups_callers_and_bounds_batches() -> None:
    appenders: list[_Kept] = []

    def new() -> _Kept:
        appenders.append(_Kept())
        return appenders[-1]

    writer = AccessWriter(new, max_batch=4, linger_s=0.02)

    async def main() -> None:
        await asyncio.gather(*(writer.record(action="fhir.read", actor=f"dr.{i % 2}", entity_type="Patient",
                                             entity_id=f"p-{i}") for i in range(6)))
        await writer.aclose()

    asyncio.run(main())
    (kept,) = appenders
    assert kept.closed
    # six events, at most four per batch: 4 then 2, each batch one record per caller
    assert [[(e.actor, e.entity_id) for e in b] for b in kept.batches] == [[("dr.0", ""), ("dr.1", "")],
                                                                           [("dr.0", "p-4"), ("dr.1", "p-5")]]
    assert [ev["entity_id"] for ev in kept.batches[0][0].details["events"]] == ["p-0", "p-2"]


def test_a_failed_append_fails_every_waiter() -> None:
    writer = AccessWriter(lambda: _Kept(fail=True), linger_s=0.01)

    async def main() -> list[BaseException | None]:
        results = await asyncio.gather(*(writer.record(action="fhir.read", actor="dr.a", entity_type="Patient")
                                         for _ in range(3)), return_exceptions=True)
        await writer.aclose()
        return results

    assert all(isinstance(r, AccessNotRecorded) for r in asyncio.run(main()))


def test_a_new_event_loop_gets_a_new_appender() -> None:
    appenders: list[_Kept] = []

    def new() -> _Kept:
        appenders.append(_Kept())
        return appenders[-1]

    writer = AccessWriter(new)
    asyncio.run(writer.record(action="fhir.read", actor="dr.a", entity_type="Patient"))
    asyncio.run(writer.record(action="fhir.read", actor="dr.a", entity_type="Patient"))
    assert len(appenders) == 2 and all(len(a.batches) == 1 for a in appenders)


def test_chain_events_mixed_types() -> None:
    at = "2026-12-05T10:00:00.000Z"
    (event,) = chain_events([
        {"action": "fhir.read", "actor": "dr.a", "entity_type": t, "entity_id": i, "details": {}, "at": at,
         "outcome": "success"} for t, i in (("Patient", "p"), ("DiagnosticReport", "d"))])
    assert (event.entity_type, event.entity_id) == ("*", "")
    assert [e["entity_type"] for e in event.details["events"]] == ["Patient", "DiagnosticReport"]
