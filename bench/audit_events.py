"""AuditEvent search on a large trail: one page of a selective search must not depend on its size.

Run with::

    .venv/bin/python bench/audit_events.py --records 200000 [--db postgresql+psycopg://...]

It appends ``--records`` chain records (a realistic mix of reads, searches, instances and
lifecycle changes over many actors and entities, spread over 30 days) with
:func:`audit.chain.record_many`, then times each search the AuditEvent view runs
(:func:`audit.query.find_records`, the same SQL) and the building of a page of AuditEvents, and
prints the query plan of each search. Baseline in the same run: the same page taken from the
whole trail loaded in Python (what a view without indexes and keyset paging would do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from audit.chain import ChainEvent, iter_records, record_many
from audit.codes import actions_for_code
from audit.query import DateRange, RecordQuery, find_records
from ground.db import make_engine, session_scope, upgrade
from integrations.fhir.audit_event import AuditSource, audit_event_json

ACTIONS = ["fhir.read", "fhir.read", "fhir.search", "instance.new", "instance.new", "study.queued", "draft.created"]


def populate(url: str, n: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    start = datetime.now(UTC) - timedelta(days=30)
    batch = 5000
    for b in range(0, n, batch):
        events = [ChainEvent(action=ACTIONS[i % len(ACTIONS)], actor=f"user{i % 500}", entity_type="DiagnosticReport",
                             entity_id=f"r{i % 20000}", details={"version": 1, "params": ["patient"], "total": 1})
                  for i in range(b, min(n, b + batch))]
        with session_scope(engine) as s:
            record_many(s, events)
    # spread the records over 30 days (record_many stamps "now"); the hashes no longer verify,
    # which this benchmark does not need
    with engine.begin() as conn:
        step = timedelta(days=30) / n
        for lo in range(0, n, 20000):
            rows = [{"s": seq, "a": start + step * seq} for seq in range(lo + 1, min(n, lo + 20000) + 1)]
            conn.execute(text("UPDATE audit_event SET at = :a WHERE seq = :s"), rows)
    engine.dispose()


def timed(fn: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--db", default="")
    args = ap.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    t0 = time.perf_counter()
    populate(url, args.records)
    print(f"{args.records} records in {time.perf_counter() - t0:.1f} s ({url.split('://')[0]})")
    engine = make_engine(url)
    now = datetime.now(UTC)
    day = now - timedelta(days=10)
    searches = {
        "newest page (no filter)": RecordQuery(count=50),
        "agent=user7": RecordQuery(actors=[("user7",)], count=50),
        "entity=DiagnosticReport/r123": RecordQuery(entities=[(("DiagnosticReport", "r123"),)], count=50),
        "date=eq<one day>": RecordQuery(dates=[(DateRange("eq", day.replace(hour=0, minute=0), day.replace(hour=0, minute=0) + timedelta(days=1)),)], count=50),
        "subtype=110112 (queries)": RecordQuery(kinds=[(actions_for_code(None, "110112", subtype=True),)], count=50),
        "agent=user7 & date ge 20 days ago": RecordQuery(actors=[("user7",)], dates=[(DateRange("ge", now - timedelta(days=20), now),)], count=50),
        "deep page (cursor at seq/2)": RecordQuery(count=50, after=args.records // 2),
    }
    src = AuditSource("http://127.0.0.1:8080/fhir")
    with engine.connect() as conn:
        for name, q in searches.items():
            ms = timed(lambda q=q: find_records(conn, q))
            page = find_records(conn, q)
            build = timed(lambda page=page: [json.dumps(audit_event_json(r, src)) for r in page.records])
            print(f"{name:40s} {ms:8.2f} ms SQL, {len(page.records):3d} records, {build:6.2f} ms to build the page")
    from sqlmodel import Session

    def whole_trail() -> object:
        with Session(engine) as s:
            return [r for r in iter_records(s, batch=5000) if r.actor == "user7"][-50:]

    print(f"{'baseline: agent=user7 over the whole trail':40s} {timed(whole_trail, repeat=1):8.2f} ms")


if __name__ == "__main__":
    main()
