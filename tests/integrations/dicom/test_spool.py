"""The spool of small instances (:mod:`integrations.dicom.spool`): bytes committed with their row,
the file visible before the answer and durable after it; what a crash leaves is written back."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import verify
from ground.db import session_scope
from integrations.dicom.index import Instance, StoreOutcome
from integrations.dicom.ingest import Ingestor, IngestResult
from integrations.dicom.spool import recover
from storage import FileStorage, StorageFailure
from tests.conftest import free_port
from tests.factories.dcmtk import storescu
from tests.factories.listener import listener_env, start_process
from tests.factories.studies import make_ct_series


def _ingest(ingestor: Ingestor, storage: FileStorage, data: bytes) -> IngestResult:
    writer = storage.staging_file()
    writer.write(data)
    path = Path(writer.name)
    try:
        return ingestor.ingest(path, calling_ae="MODALITY")
    finally:
        writer.close()
        path.unlink(missing_ok=True)


def _spooled(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT storage_key FROM instance_spool ORDER BY storage_key")).scalars())


def _check_files(engine: Engine, storage: FileStorage) -> dict[str, Instance]:
    with session_scope(engine) as s:
        rows = {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}
        assert verify(s).ok
    for row in rows.values():
        assert hashlib.sha256(storage.path(row.storage_key).read_bytes()).hexdigest() == row.sha256
    return rows


def test_small_instances_are_visible_at_once_and_settled_after(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 8, rows=32, cols=32)]
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    ingestor.settler.batch_wait = 0.5  # long enough to see rows before they are settled
    try:
        for d in data:
            result = _ingest(ingestor, storage, d)
            assert result.outcome is StoreOutcome.new
            assert storage.path(result.stored.key).read_bytes() == d  # readers find it before the answer
        assert _spooled(engine), "nothing went through the spool"
        assert ingestor.settler.flush(10)
    finally:
        ingestor.close()
    assert _spooled(engine) == []
    assert ingestor.settler.settled == len(data)
    assert len(_check_files(engine, storage)) == len(data)
    assert not any(storage.tmp_dir.iterdir())


def test_settled_rows_are_deleted_by_the_next_ingest_transaction(engine: Engine, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The settler queues the rows of settled instances; the next instance's transaction deletes
    them (no transaction of the settler's own), and rows nobody takes go after delete_after."""
    from integrations.dicom import spool

    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 6, rows=32, cols=32)]
    own: list[int] = []
    real_delete = spool.delete_spooled

    def counted(eng: Engine, ids: Any) -> None:
        own.append(len(ids))
        real_delete(eng, ids)

    monkeypatch.setattr(spool, "delete_spooled", counted)
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    ingestor.settler.batch_wait = 0.5  # the five arrive before their batch is settled
    ingestor.settler.delete_after = 3600.0
    try:
        for d in data[:5]:
            _ingest(ingestor, storage, d)
        deadline = time.monotonic() + 10
        while ingestor.settler.settled < 5:
            assert time.monotonic() < deadline, "not settled"
            time.sleep(0.01)
        assert len(_spooled(engine)) == 5  # settled, rows queued
        _ingest(ingestor, storage, data[5])
        assert len(_spooled(engine)) == 1  # the sixth's own row; the five went with its transaction
        assert own == []
        ingestor.settler.delete_after = 0.05  # nothing more arrives: the settler deletes it itself
        ingestor.settler.add([])  # (no-op)
        deadline = time.monotonic() + 10
        while _spooled(engine):
            assert time.monotonic() < deadline, "an idle listener's settled row was never deleted"
            time.sleep(0.02)
            with ingestor.settler._lock:
                ingestor.settler._lock.notify_all()  # wake it to see the shorter delay
        assert own == [1]
    finally:
        ingestor.close()
    assert len(_check_files(engine, storage)) == 6


def test_instances_above_the_limit_are_filed_the_plain_way(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "ct", 3, rows=32, cols=32)]
    ingestor = Ingestor(engine, storage, spool_max_bytes=min(map(len, data)) - 1)
    ingestor.settler.batch_wait = 5.0
    try:
        for d in data:
            _ingest(ingestor, storage, d)
        assert _spooled(engine) == []  # nothing waits in the spool: every file was durable before its commit
    finally:
        ingestor.close()
    assert ingestor.settler.settled == 0
    _check_files(engine, storage)


def test_recover_writes_back_what_a_crash_left(engine: Engine, tmp_path: Path) -> None:
    """Acknowledged, never settled (the process died): a power loss may have lost or torn their
    files. recover() writes each back from its row, durably, and empties the spool; the row of an
    instance replaced since is only dropped."""
    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 6, rows=32, cols=32)
    data = [p.read_bytes() for p in files]
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    ingestor.settler.add = lambda placed: None  # type: ignore[method-assign]  # the crash: never settled
    results = [_ingest(ingestor, storage, d) for d in data]
    changed = bytearray(data[3])
    changed[-1] ^= 0xFF  # same instance, other bytes (last pixel): a replacement
    replaced = _ingest(ingestor, storage, bytes(changed))
    ingestor.close()
    assert replaced.outcome is StoreOutcome.replaced
    assert not storage.path(results[3].stored.key).exists()  # the old file went
    assert len(_spooled(engine)) == len(data) + 1
    # what a power loss may do to files that were never fsynced
    storage.path(results[0].stored.key).unlink()
    storage.path(results[1].stored.key).write_bytes(b"")
    storage.path(results[2].stored.key).write_bytes(b"\0" * len(data[2]))

    assert recover(engine, storage) == len(data)  # 5 originals and the replacement; the old row dropped
    assert _spooled(engine) == []
    rows = _check_files(engine, storage)
    assert len(rows) == len(data)
    assert not storage.path(results[3].stored.key).exists()  # not brought back: nothing points at it
    assert recover(engine, storage) == 0


def test_a_duplicate_whose_file_is_missing_is_placed_again(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    data = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)[0].read_bytes()
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    try:
        first = _ingest(ingestor, storage, data)
        assert ingestor.settler.flush(10)
        storage.path(first.stored.key).unlink()
        again = _ingest(ingestor, storage, data)
        assert again.outcome is StoreOutcome.duplicate
        assert storage.path(first.stored.key).read_bytes() == data
        assert ingestor.settler.flush(10)
    finally:
        ingestor.close()
    _check_files(engine, storage)


def test_a_rename_into_place_that_fails_is_written_back_from_the_spool(engine: Engine, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit made the instance durable; when placing its file fails, it is written back
    from its spool row, never settled as if it were in place (which would delete its only copy)."""
    storage = FileStorage(tmp_path / "storage")
    data = make_ct_series(tmp_path / "ct", 2, rows=32, cols=32)
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    settled: list[Any] = []
    ingestor.settler.add = settled.append  # type: ignore[method-assign]

    def refuse(placements: Any) -> None:
        raise StorageFailure("could not place 1 file(s): No space left on device")

    monkeypatch.setattr(storage, "place", refuse)
    try:
        results = [_ingest(ingestor, storage, p.read_bytes()) for p in data]
    finally:
        ingestor.close()
    assert [r.outcome for r in results] == [StoreOutcome.new, StoreOutcome.new]  # acknowledged
    assert settled == []
    assert _spooled(engine) == []  # written back durably, rows gone
    assert len(_check_files(engine, storage)) == 2


def test_a_settle_that_fails_is_retried_by_writing_back(engine: Engine, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage(tmp_path / "storage")
    data = make_ct_series(tmp_path / "ct", 3, rows=32, cols=32)
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20)
    ingestor.settler.retry_after = 0.05

    def fail(placements: Any) -> None:
        raise StorageFailure("could not make 1 placed file(s) durable: Input/output error")

    monkeypatch.setattr(storage, "settle", fail)
    try:
        for p in data:
            _ingest(ingestor, storage, p.read_bytes())
        assert ingestor.settler.flush(10)
    finally:
        ingestor.close()
    assert ingestor.settler.settled == 0
    assert _spooled(engine) == []  # each written back with put() (fsync, rename, folder fsync)
    assert len(_check_files(engine, storage)) == 3


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_storage_place_then_settle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool) -> None:
    from storage import local

    if not syncfs:
        monkeypatch.setattr(local, "_syncfs", None)
    elif local._syncfs is None:
        pytest.skip("no syncfs(2) here")
    calls: list[Any] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage = FileStorage(tmp_path / "storage")
    staged = []
    for i in range(3):
        w = storage.staging_file()
        w.write(b"x" * (100 + i))
        storage.hand_over(Path(w.name), sync_above=1000)  # small: no early fsync
        w.close()
        staged.append((Path(w.name), f"s/{i % 2}/f{i}.dcm"))
    assert calls == []
    storage.place(staged)
    assert [storage.read(k) for _, k in staged] == [b"x" * 100, b"x" * 101, b"x" * 102]
    assert calls == []  # visible, nothing flushed yet
    storage.settle([*staged, (tmp_path / "gone", "s/0/removed-since.dcm")])
    # syncfs: one call for the filesystem; else each file and each folder up to the root
    assert len(calls) == (0 if syncfs else 3 + 4)


# The listener with its settler stopped: acknowledged small instances stay in the spool until the
# SIGKILL, then the test plays the power loss (their files gone) before the restart.
_HELD_SETTLER = """
import sys, time
from integrations.dicom import spool
spool.settle = lambda *args, **kwargs: time.sleep(3600)  # the settler's batches never settle
from taqrir.cli import main
sys.argv = ["taqrir", "listen", "--port", sys.argv[1]]
main()
"""


def test_sigkill_and_a_lost_page_cache_lose_no_acknowledged_small_instance(db_url: str, engine: Engine,
                                                                           tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "src", 30, rows=64, cols=64)
    port = free_port()
    data_dir = tmp_path / "data"
    # the spool itself: the intake journal's counterpart is in test_intake
    env = listener_env(data_dir, db_url, intake_journal="false")

    proc = start_process(["-c", _HELD_SETTLER], port, env)
    assert set(storescu(port, files).statuses()) == {"Success"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    storage = FileStorage(data_dir / "storage")
    spooled = _spooled(engine)
    assert len(spooled) == len(files)  # every one acknowledged, none settled
    for key in spooled:
        storage.path(key).unlink()  # never fsynced: what a power loss may leave

    proc = start_process(["-m", "taqrir", "listen", "--port"], port, env)
    try:
        assert _spooled(engine) == []  # written back before it served
        rows = _check_files(engine, storage)
        assert {r.sop_instance_uid for r in rows.values()} == {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert set(storescu(port, files).statuses()) == {"Success"}  # and it serves: duplicates
    finally:
        proc.terminate()
        proc.wait(timeout=10)
