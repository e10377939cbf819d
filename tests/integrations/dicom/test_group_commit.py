"""Group commit: concurrent instances share one index transaction, each answered with its own
outcome; one instance's failure stays its own."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import WriterConnection, session_scope
from integrations.dicom import index as index_module
from integrations.dicom.group_commit import GroupCommit
from integrations.dicom.index import Instance, InstanceSpool, StoreOutcome, Study, StudyState
from integrations.dicom.ingest import Ingestor, IngestResult, file_prepared, prepare
from storage import FileStorage
from tests.factories.studies import corrected_resend, make_ct_series

# -- the primitive ------------------------------------------------------------------------


def _doubler(log: list[list[int]]) -> Any:
    def run(items: Sequence[int]) -> list[int | BaseException]:
        log.append(list(items))
        time.sleep(0.02)  # a commit takes a while: others queue meanwhile
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]
    return run


def test_one_caller_runs_at_once_in_its_own_thread() -> None:
    batches: list[list[int]] = []
    group: GroupCommit[int, int] = GroupCommit(_doubler(batches), max_wait=1.0)
    t0 = time.monotonic()
    assert group.submit(21) == 42
    assert time.monotonic() - t0 < 0.5  # nothing announced: no waiting for company
    assert batches == [[21]]


def test_concurrent_callers_share_batches_and_each_gets_its_own_outcome() -> None:
    batches: list[list[int]] = []
    group: GroupCommit[int, int] = GroupCommit(_doubler(batches), max_wait=0.5)
    n = 12
    results: dict[int, Any] = {}
    start = threading.Barrier(n)

    def caller(i: int) -> None:
        group.expect()
        start.wait()
        time.sleep(0.001 * (i % 4))
        try:
            results[i] = group.submit(-i if i % 5 == 3 else i, expected=True)
        except ValueError as err:
            results[i] = str(err)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: (f"bad {-i}" if i % 5 == 3 else 2 * i) for i in range(n)}
    assert sorted(i for b in batches for i in b) == sorted(-i if i % 5 == 3 else i for i in range(n))
    assert len(batches) < n  # shared: fewer commits than items
    assert group.batches == len(batches) and group.items == n


def test_a_batch_that_raises_fails_each_of_its_callers_and_the_group_goes_on() -> None:
    calls = 0

    def run(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.05)
            raise RuntimeError("database went away")
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(run, max_wait=0.2)
    errors: list[str] = []

    def caller(i: int) -> None:
        try:
            group.submit(i)
        except RuntimeError as err:
            errors.append(str(err))

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    first.join(5)
    assert errors == ["database went away"]
    assert group.submit(7) == 7  # the next leader is unaffected


def test_an_announced_item_that_never_comes_does_not_hold_the_leader() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda items: list(items), max_wait=5.0)
    group.expect()
    threading.Timer(0.1, group.unexpect).start()
    t0 = time.monotonic()
    assert group.submit(1) == 1
    assert time.monotonic() - t0 < 2.0


# -- the listener's ingest through it ---------------------------------------------------------


class _Staged:
    def __init__(self, storage: FileStorage, data: bytes) -> None:
        self.writer = storage.staging_file()
        self.writer.write(data)
        self.path = Path(self.writer.name)

    def discard(self) -> None:
        self.writer.close()
        self.path.unlink(missing_ok=True)


def _ingest_concurrently(ingestor: Ingestor, storage: FileStorage, data: list[bytes]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    start = threading.Barrier(len(data))

    def one(i: int) -> None:
        staged = _Staged(storage, data[i])
        start.wait()
        try:
            out[i] = ingestor.ingest(staged.path, calling_ae="MODALITY")
        except Exception as err:
            out[i] = err
        finally:
            staged.discard()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_associations_share_commits_and_the_index_is_as_if_one_by_one(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 24, rows=32, cols=32)]
    ingestor = Ingestor(engine, storage, group_wait=0.05)
    try:
        # the series' first instance alone (it takes the ORM upserts), then the rest at once
        first = _ingest_concurrently(ingestor, storage, data[:1])
        rest = _ingest_concurrently(ingestor, storage, data[1:])
    finally:
        ingestor.close()
    results = [first[0], *rest.values()]
    assert all(isinstance(r, IngestResult) and r.outcome is StoreOutcome.new for r in results)
    assert ingestor.group.batches < ingestor.group.items  # at least one commit was shared
    with session_scope(engine) as s:
        rows = s.exec(select(Instance)).all()
        assert len(rows) == len(data)
        assert verify(s).ok and verify(s).checked == len(data)
    for r in rows:
        assert storage.path(r.storage_key).exists()
    assert not any(storage.tmp_dir.iterdir())


def test_one_bad_instance_in_a_batch_fails_alone(engine: Engine, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 9, rows=32, cols=32)
    data = [p.read_bytes() for p in files]
    ingestor = Ingestor(engine, storage, group_wait=0.05)
    _ingest_concurrently(ingestor, storage, data[:1])
    real = index_module.run_writes
    bad_uid = str(dcmread(files[4], stop_before_pixels=True).SOPInstanceUID)

    def run_writes(cursor: Any, sql: Any, writes: Any) -> None:
        if any(bad_uid in map(str, params) for _, params in writes):
            raise RuntimeError("value too long for the index")
        real(cursor, sql, writes)

    monkeypatch.setattr(index_module, "run_writes", run_writes)
    try:
        out = _ingest_concurrently(ingestor, storage, data[1:])
    finally:
        ingestor.close()
    failed = [r for r in out.values() if isinstance(r, Exception)]
    assert len(failed) == 1 and "value too long" in str(failed[0])
    assert sum(isinstance(r, IngestResult) for r in out.values()) == len(data) - 2
    with session_scope(engine) as s:
        uids = {i.sop_instance_uid for i in s.exec(select(Instance)).all()}
        assert bad_uid not in uids and len(uids) == len(data) - 1
        assert verify(s).ok
    stored = {p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*.dcm")
              if ".incoming" not in p.parts}
    with session_scope(engine) as s:
        assert stored == {i.storage_key for i in s.exec(select(Instance)).all()}  # no orphan of the failure


class _Recording:
    """A DBAPI cursor that records the SQL of each statement it sends."""

    def __init__(self, cursor: Any, seen: list[str]) -> None:
        self._cursor = cursor
        self._seen = seen

    def execute(self, sql: str, *args: Any) -> Any:
        self._seen.append(sql)
        return self._cursor.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def test_a_batch_s_row_writes_reach_postgresql_as_one_statement(engine: Engine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statement costs PostgreSQL a round trip and an execution of its own: a batch's study
    updates, instance rows and audit records go as one statement, whose rows are each instance's
    own. (SQLite's statements cost microseconds: one per instance.)"""
    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 8, rows=32, cols=32)]
    writer = WriterConnection(engine)

    def items(blobs: Sequence[bytes]) -> list[Any]:
        return [prepare(storage=storage, staged=_Staged(storage, blob).path, calling_ae="MODALITY")
                for blob in blobs]

    seen: list[str] = []
    begin = WriterConnection.begin
    monkeypatch.setattr(WriterConnection, "begin", lambda self: _Recording(begin(self), seen))
    try:
        file_prepared(engine, storage, writer, items(data[:1]))  # the series' first: the ORM path
        with session_scope(engine) as s:
            study = s.exec(select(Study)).one()
            study.state = StudyState.drafted.value  # the batch's first starts version 2, the rest add to it
            s.add(study)
        seen.clear()
        results = file_prepared(engine, storage, writer, items(data[1:]))
    finally:
        writer.close()
    writes = [sql for sql in seen if "INSERT INTO instance " in sql]
    if engine.dialect.name == "postgresql":
        assert len(writes) == 1
        assert writes[0].count("UPDATE study ") == 1 and "INSERT INTO audit_event " in writes[0]
    else:
        assert len(writes) == len(data) - 1
    with session_scope(engine) as s:
        rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
        study = s.exec(select(Study)).one()
        assert verify(s).ok and verify(s).checked == len(data) + 1  # and the study's receiving
    assert (study.state, study.version, study.attempts) == (StudyState.receiving.value, 2, 0)
    assert len(rows) == len(data)
    for r in results:
        row = rows[r.headers.sop_instance_uid]
        assert (r.outcome, r.study_version) == (StoreOutcome.new, 2)
        assert (row.storage_key, row.sha256, row.instance_number) == (r.stored.key, r.stored.sha256,
                                                                      r.headers.instance_number)
        assert storage.path(row.storage_key).read_bytes() in data
    assert study.last_received_at == max(row.received_at for row in rows.values())


@pytest.mark.parametrize("max_params", [index_module.BatchWrites.MAX_PARAMS, 60])
def test_a_mixed_batch_files_as_its_instances_would_one_by_one(engine: Engine, tmp_path: Path, max_params: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is filing the same instances one at a time, on an emptied index: two studies (a
    new version of a drafted one, a failed one's attempts cleared), spooled instances (the
    journal off: a multi-row spool INSERT), a replacement, a duplicate, a copy answered before the
    row's (superseded), the same SOP Instance twice (its held writes flushed before it is read
    again) and, in a second batch, a new series of a study the batch updated before (the ORM
    path, which reads that study and the chain head after the held writes). With few parameters
    per statement (60) the held writes are also flushed mid-batch."""
    monkeypatch.setattr(index_module.BatchWrites, "MAX_PARAMS", max_params)
    a = [p.read_bytes() for p in make_ct_series(tmp_path / "a", 5, rows=16, cols=16, patient_id="P1")]
    study_a = str(dcmread(tmp_path / "a" / sorted(p.name for p in (tmp_path / "a").iterdir())[0]).StudyInstanceUID)
    b = [p.read_bytes() for p in make_ct_series(tmp_path / "b", 4, rows=16, cols=16, patient_id="P2", seed=1)]
    c = [p.read_bytes() for p in make_ct_series(tmp_path / "c", 2, rows=16, cols=16, patient_id="P1", seed=2,
                                                study_uid=study_a)]
    spool = 1 << 20
    past = utcnow() - timedelta(days=1)

    def run(folder: str, batched: bool) -> tuple[Any, ...]:
        storage = FileStorage(tmp_path / folder)
        writer = WriterConnection(engine)
        writers: list[Any] = []

        def item(blob: bytes, *, spooled: bool = False, answered_at: datetime | None = None) -> Any:
            staged = storage.staging_file(memory_first=spool if spooled else 0)
            writers.append(staged)  # (a memory-first writer must stay open until handed over)
            staged.write(blob)
            got = prepare(storage=storage, staged=Path(staged.name), calling_ae="MODALITY",
                          spool_max_bytes=spool if spooled else 0)
            assert (got.spool is not None) == spooled
            return replace(got, answered_at=answered_at) if answered_at else got

        def unsettled(placed: Sequence[Any]) -> None:  # spool rows kept: not settled
            pass

        def file(items: list[Any]) -> list[IngestResult]:
            if batched:
                return file_prepared(engine, storage, writer, items, settle=unsettled)
            return [r for one in items for r in file_prepared(engine, storage, writer, [one], settle=unsettled)]

        try:
            for blob in (a[0], b[0], a[4]):  # each series' first, then a row for the superseded copy
                file_prepared(engine, storage, writer, [item(blob)])
            with session_scope(engine) as s:
                for study in s.exec(select(Study)).all():
                    if study.study_instance_uid == study_a:
                        study.state = StudyState.drafted.value  # the next image starts version 2
                    else:
                        study.state, study.attempts, study.failure_reason = StudyState.failed.value, 3, "boom"
                    s.add(study)
            first = file([item(a[1], spooled=True), item(b[1]), item(corrected_resend(a[0])), item(b[0]),
                          item(corrected_resend(a[4]), answered_at=past), item(b[2], spooled=True), item(a[2]),
                          item(corrected_resend(a[2]), spooled=True), item(a[3])])
            second = file([item(a[3]), item(c[0]), item(c[1], spooled=True), item(b[3])])
        finally:
            writer.close()
        with session_scope(engine) as s:
            studies = sorted((x.study_instance_uid, x.state, x.version, x.attempts, x.failure_reason,
                              x.last_received_at == max(i.received_at for i in s.exec(
                                  select(Instance).where(col(Instance.study_pk) == x.id)).all()))
                             for x in s.exec(select(Study)).all())
            instances = sorted((i.sop_instance_uid, i.sha256,
                                hashlib.sha256(storage.path(i.storage_key).read_bytes()).hexdigest() == i.sha256)
                               for i in s.exec(select(Instance)).all())
            spooled = sorted((r.sop_instance_uid, bytes(r.data) == storage.path(r.storage_key).read_bytes())
                             for r in s.exec(select(InstanceSpool)).all())
            report = verify(s)
            actions = [(r.action, r.entity_id) for r in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq)))]
            for table in ("instance_spool", "instance", "series", "study", "patient", "audit_event"):
                s.exec(text(f"DELETE FROM {table}"))  # type: ignore[call-overload]
        outcomes = [(r.headers.sop_instance_uid, r.outcome, r.study_version, r.new_version) for r in first + second]
        return outcomes, studies, instances, spooled, (report.ok, report.checked), actions

    batched, one_by_one = run("batched", True), run("one-by-one", False)
    assert batched == one_by_one
    outcomes, studies, instances, spooled, report, _ = batched
    assert [o[1] for o in outcomes] == [
        StoreOutcome.new, StoreOutcome.new, StoreOutcome.replaced, StoreOutcome.duplicate, StoreOutcome.superseded,
        StoreOutcome.new, StoreOutcome.new, StoreOutcome.replaced, StoreOutcome.new,
        StoreOutcome.duplicate, StoreOutcome.new, StoreOutcome.new, StoreOutcome.new]
    assert [s[1:] for s in studies] == [(StudyState.receiving.value, 2, 0, None, True)] * 2
    assert len(instances) == 11 and all(holds for _, _, holds in instances)
    assert len(spooled) == 4 and all(holds for _, holds in spooled)
    assert report == (True, 3 + 13 + 2)  # every instance, and each study's move to receiving


def test_a_batch_files_as_its_instances_would_one_after_another(engine: Engine, tmp_path: Path) -> None:
    """The hot path reads the index state of a whole batch in one query and keeps it current as
    the batch files: a study version started by an earlier instance of the batch, a duplicate
    after it, the same SOP Instance twice and the audit chain's head all come out as filing the
    instances one by one gives them."""
    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 4, rows=32, cols=32)]
    writer = WriterConnection(engine)

    def file(*blobs: bytes) -> list[IngestResult]:
        items = []
        for blob in blobs:
            staged = _Staged(storage, blob)
            items.append(prepare(storage=storage, staged=staged.path, calling_ae="MODALITY"))
        return file_prepared(engine, storage, writer, items)

    try:
        [first] = file(data[0])  # the series' first instance: the ORM path, alone
        with session_scope(engine) as s:
            study = s.exec(select(Study)).one()
            study.state = StudyState.drafted.value  # drafted: the next image starts version 2
            s.add(study)
        a, dup, b, a_again, c = file(data[1], data[0], data[2], corrected_resend(data[1]), data[3])
        b_other, b_back = file(corrected_resend(data[2]), data[2])  # b replaced, then back to its bytes
    finally:
        writer.close()
    assert first.outcome is StoreOutcome.new and first.study_version == 1
    assert (a.outcome, a.study_version, a.new_version) == (StoreOutcome.new, 2, True)
    assert (dup.outcome, dup.study_version) == (StoreOutcome.duplicate, 2)  # the version a is in
    assert (b.outcome, b.study_version, b.new_version) == (StoreOutcome.new, 2, False)
    assert (a_again.outcome, a_again.study_version) == (StoreOutcome.replaced, 2)
    assert (c.outcome, c.study_version) == (StoreOutcome.new, 2)
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
        assert (study.state, study.version) == (StudyState.receiving.value, 2)
        rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
        assert len(rows) == 4 and rows[a.headers.sop_instance_uid].sha256 == a_again.stored.sha256
        report = verify(s)  # one chained record per filed instance and one for the state change
        assert report.ok and report.checked == 9
        actions = [r.action for r in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()]
    assert actions[1:] == ["instance.new", "study.receiving", "instance.duplicate", "instance.new",
                           "instance.replaced", "instance.new", "instance.replaced", "instance.replaced"]
    # b's bytes again, while b's file was there: a file of its own (never placed over b's, which
    # b_other's filing made obsolete and removed); b_other's removed in turn
    assert len({b.stored.key, b_other.stored.key, b_back.stored.key}) == 3
    assert storage.path(b_back.stored.key).read_bytes() == data[2]
    assert not storage.path(b.stored.key).exists()
    assert not storage.path(b_other.stored.key).exists()
