"""The intake journal (:mod:`integrations.dicom.intake`): a small instance is answered once its
journal record is durable and indexed after the answer; what a crash leaves is filed again."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.chain import AuditRecord, verify
from ground.clock import utcnow
from ground.db import session_scope
from integrations.dicom.errors import OutOfResources
from integrations.dicom.index import Instance
from integrations.dicom.ingest import Ingestor, Prepared, refile
from integrations.dicom.intake import (
    HEAD_BYTES,
    SUFFIX,
    UNFILEABLE_DIR_NAME,
    IntakeJournal,
    Record,
    Unfileable,
    encode,
    read_records,
    replay,
)
from storage import FileStorage, StorageFailure
from tests.conftest import free_port
from tests.factories.dcmtk import send_raw, storescu
from tests.factories.listener import listener_env, start_process
from tests.factories.studies import corrected_resend, make_ct_series


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def _rows(engine: Engine) -> dict[str, Instance]:
    with session_scope(engine) as s:
        return {i.sop_instance_uid: i for i in s.exec(select(Instance)).all()}


def _audit_count(engine: Engine) -> int:
    with session_scope(engine) as s:
        return int(s.exec(select(func.count()).select_from(AuditRecord)).one())


def _check(engine: Engine, storage: FileStorage, files: list[Path]) -> None:
    rows = _rows(engine)
    assert set(rows) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    for row in rows.values():
        assert hashlib.sha256(storage.path(row.storage_key).read_bytes()).hexdigest() == row.sha256
    with session_scope(engine) as s:
        assert verify(s).ok


def test_records_round_trip_up_to_a_torn_or_stale_one() -> None:
    epoch = b"e" * 16
    head = (b"TQJS" + epoch).ljust(HEAD_BYTES, b"\0")
    records = [encode(epoch, {"key": f"k{i}", "n": i}, os.urandom(100 + i)) for i in range(3)]
    blob = head + b"".join(records) + bytes(4096)  # preallocated zeros after the last
    got = list(read_records(blob))
    assert [r.header["key"] for r in got] == ["k0", "k1", "k2"]
    assert got[1].data == records[1][-101:]
    torn = head + records[0] + records[1][:-1]  # the second never finished: not acknowledged
    assert [r.header["key"] for r in read_records(torn)] == ["k0"]
    # a reused segment's new epoch: the records of the earlier one no longer check out
    stale = (b"TQJS" + b"f" * 16).ljust(HEAD_BYTES, b"\0") + b"".join(records)
    assert list(read_records(stale)) == []


def test_segments_are_reused_then_deleted_and_undone_records_replayed(tmp_path: Path) -> None:
    folder = tmp_path / "intake"
    journal = IntakeJournal(folder, segment_bytes=64 * 1024)
    entries = [journal.append({"key": f"k{i}"}, os.urandom(10_000)) for i in range(15)]  # > 2 segments
    assert len(_segments(folder)) == 3
    for entry in entries[:12]:
        journal.done(entry)
    # the segments done are recycled (one kept as a spare under a new epoch) or deleted
    seen: list[str] = []
    assert replay(folder, lambda r: seen.append(r.header["key"])) == 0  # all live: this process holds them
    journal.close()  # three records were never done: their segment stays
    left = _segments(folder)
    assert len(left) == 1
    assert replay(folder, lambda r: seen.append(r.header["key"])) == 3
    assert seen == ["k12", "k13", "k14"]
    assert _segments(folder) == []


def test_a_record_that_cannot_be_filed_keeps_its_segment(tmp_path: Path) -> None:
    folder = tmp_path / "intake"
    journal = IntakeJournal(folder)
    journal.append({"key": "k"}, b"x")
    journal.close()

    def fail(record: Record) -> None:
        raise RuntimeError("database down")

    assert replay(folder, fail) == 1
    assert len(_segments(folder)) == 1  # kept for the next replay
    assert replay(folder, lambda r: None) == 1
    assert _segments(folder) == []


def test_a_record_that_can_never_be_filed_is_set_aside_not_retried(tmp_path: Path) -> None:
    folder = tmp_path / "intake"
    journal = IntakeJournal(folder)
    for key in ("good", "bad", "later"):
        journal.append({"key": key}, key.encode())
    journal.close()
    segment = _segments(folder)[0].name
    calls: list[str] = []
    database_down = True

    def refile_(record: Record) -> None:
        calls.append(record.header["key"])
        if record.header["key"] == "bad":
            raise Unfileable("journaled bytes of bad do not match their SHA-256")
        if record.header["key"] == "later" and database_down:
            raise RuntimeError("database down")

    def aside() -> list[tuple[str, list[tuple[str, bytes]]]]:
        return [(p.name, [(r.header["key"], r.data) for r in read_records(p.read_bytes())])
                for p in sorted((folder / UNFILEABLE_DIR_NAME).iterdir())]

    assert replay(folder, refile_) == 3
    assert len(_segments(folder)) == 1  # "later" may still be filed: kept for the next replay
    assert aside() == [(segment, [("bad", b"bad")])]
    database_down = False
    assert replay(folder, refile_) == 3
    assert _segments(folder) == []
    assert aside() == [(segment, [("bad", b"bad")])]  # set aside once, not twice
    assert replay(folder, refile_) == 0  # nothing retried at the next sweeps
    assert calls == ["good", "bad", "later"] * 2


def _fail_filing(monkeypatch: pytest.MonkeyPatch, times: int = 1, only: Ingestor | None = None,
                 error: Exception | None = None) -> list[int]:
    """Make ``Ingestor._file`` (in ``only``, if given) raise ``error`` ("database is locked" by
    default) its first ``times`` calls; returns the size of each batch it was called with."""
    real_file = Ingestor._file
    calls: list[int] = []

    def failing(self: Ingestor, items: list[object]) -> object:
        if only is None or self is only:
            calls.append(len(items))
            if len(calls) <= times:
                raise error or sqlite3.OperationalError("database is locked")
        return real_file(self, items)  # type: ignore[arg-type]

    monkeypatch.setattr(Ingestor, "_file", failing)
    return calls


def _wait_retried(ingestor: Ingestor) -> None:
    """Wait (10 s at most) until nothing waits for its indexing or its file any more."""
    deadline = time.monotonic() + 10
    while ingestor._queue or ingestor._placing:
        assert time.monotonic() < deadline, "the retry did not happen"
        time.sleep(0.05)


def _ingest(ingestor: Ingestor, storage: FileStorage, data: bytes) -> None:
    # as the listener stages it: in memory up to the size whose bytes the journal takes
    writer = storage.staging_file(memory_first=ingestor.spool_max_bytes if ingestor.journal else 0)
    writer.write(data)
    path = Path(writer.name)
    try:
        assert ingestor.ingest(path, calling_ae="MODALITY") is None  # journaled: answered before indexing
    finally:
        writer.close()
        path.unlink(missing_ok=True)  # as the network engine does once it has answered


def test_journaled_instances_are_indexed_after_the_answer(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 12, rows=32, cols=32)
    folder = tmp_path / "storage" / ".intake"
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(folder), index_wait=0.2)
    try:
        for p in files:
            _ingest(ingestor, storage, p.read_bytes())
        assert len(_rows(engine)) < len(files)  # the batch is still gathering: answered before indexed
        assert ingestor.wait_indexed(30)
        _check(engine, storage, files)
        assert ingestor.settler.flush(10)
        assert ingestor.journal is not None and ingestor.journal.pending() == 0
    finally:
        ingestor.close()
    assert _segments(folder) == []  # every record done: nothing to replay
    assert not any(storage.tmp_dir.iterdir())  # no staged file left behind


def test_refile_is_idempotent_and_never_undoes_a_later_replacement(engine: Engine, tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 2, rows=32, cols=32)
    first, second = files[0].read_bytes(), files[1].read_bytes()
    corrected = corrected_resend(files[0].read_bytes())

    def record(data: bytes, at: str) -> Record:
        return Record({"key": "", "sha256": hashlib.sha256(data).hexdigest(), "ae": "MODALITY", "at": at}, data)

    before = utcnow().isoformat()
    refile(engine, storage, record(first, before))
    refile(engine, storage, record(second, before))
    _check(engine, storage, files)
    events = _audit_count(engine)
    refile(engine, storage, record(first, before))  # already filed: nothing happens
    assert _audit_count(engine) == events
    storage.path(_rows(engine)[str(dcmread(files[1]).SOPInstanceUID)].storage_key).unlink()
    refile(engine, storage, record(second, before))  # filed, file lost: written again
    _check(engine, storage, files)
    second_file = storage.path(_rows(engine)[str(dcmread(files[1]).SOPInstanceUID)].storage_key)
    second_file.write_bytes(second[:len(second) // 2] + bytes(len(second) - len(second) // 2))
    refile(engine, storage, record(second, before))  # half-written before a crash (write_unsynced): again
    _check(engine, storage, files)

    placed = Record({**record(second, before).header, "placed": True,
                     "key": _rows(engine)[str(dcmread(files[1]).SOPInstanceUID)].storage_key}, b"")
    refile(engine, storage, placed)  # a large instance's record: its file is read from its key
    assert _audit_count(engine) == events

    time.sleep(0.01)
    refile(engine, storage, record(corrected, utcnow().isoformat()))  # a replacement, arrived later
    sop = str(dcmread(files[0]).SOPInstanceUID)
    assert _rows(engine)[sop].sha256 == hashlib.sha256(corrected).hexdigest()
    refile(engine, storage, record(first, before))  # the earlier version, replayed again: not filed over it
    assert _rows(engine)[sop].sha256 == hashlib.sha256(corrected).hexdigest()
    # the earlier version placed by key, its file removed as obsolete since: nothing to file
    gone = Record({**record(first, before).header, "placed": True, "sop": sop, "key": "gone/x.dcm"}, b"")
    refile(engine, storage, gone)
    assert _rows(engine)[sop].sha256 == hashlib.sha256(corrected).hexdigest()
    with pytest.raises(Unfileable, match="missing and it is not indexed"):  # set aside for a person
        refile(engine, storage, Record({**gone.header, "sop": "1.2.3.4.5"}, b""))
    with pytest.raises(Unfileable, match="do not match their SHA-256"):
        refile(engine, storage, Record(record(first, before).header, first[:-1] + b"x"))
    with session_scope(engine) as s:
        assert verify(s).ok


# The listener with its indexing thread stopped: small instances are acknowledged (journaled) and
# never indexed until the SIGKILL; the release waits its (shortened) DIMSE timeout for them.
_HELD_INDEXER = """
import sys, time
from integrations.dicom.ingest import Ingestor
Ingestor._index = lambda self, batch: time.sleep(3600)
from taqrir.cli import main
sys.argv = ["taqrir", "listen", "--port", sys.argv[1]]
main()
"""


@pytest.mark.parametrize("spool_max_bytes", ["262144", "0"], ids=["bytes-journaled", "placed-then-journaled"])
def test_sigkill_before_indexing_loses_no_acknowledged_instance(db_url: str, engine: Engine, tmp_path: Path,
                                                                spool_max_bytes: str) -> None:
    """Small instances are journaled with their bytes; with ``spool_max_bytes=0`` every one is
    a large one, placed durably under its key and journaled by key. The listener runs with its
    default processes: the SIGKILL takes the pre-forked receivers with it."""
    files = make_ct_series(tmp_path / "src", 30, rows=64, cols=64)
    port = free_port()
    data_dir = tmp_path / "data"
    env = listener_env(data_dir, db_url, dimse_timeout="1", spool_max_bytes=spool_max_bytes)

    proc = start_process(["-c", _HELD_INDEXER], port, env)
    assert set(storescu(port, files).statuses()) == {"Success"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert _rows(engine) == {}  # acknowledged, durable only in the journal
    storage = FileStorage(data_dir / "storage")
    folder = data_dir / "storage" / ".intake"
    # one segment per receiving process (one per core by default); the one association's
    # instances are all in the segment of the process that received it
    counts = [len(list(read_records(p.read_bytes()))) for p in _segments(folder)]
    assert sum(counts) == max(counts) == len(files)

    proc = start_process(["-m", "taqrir", "listen", "--port"], port, env)
    try:
        _check(engine, storage, files)  # filed again before it served
        assert set(storescu(port, files).statuses()) == {"Success"}  # and it serves: duplicates
        assert len(_rows(engine)) == len(files)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert _segments(folder) == []  # the replayed segment, and the new run's once all was done


@pytest.mark.parametrize("journal", [True, False])
def test_a_finished_sender_finds_every_instance_indexed(engine: Engine, tmp_path: Path, journal: bool,
                                                        start_listener: object) -> None:
    """The release waits for the association's journaled instances: no sleep between the sender
    exiting and the index being complete."""
    files = make_ct_series(tmp_path / "src", 40, rows=32, cols=32)
    listener = start_listener(intake_journal=journal, group_commit_wait=0.05)  # type: ignore[operator]
    assert set(storescu(listener.port, files).statuses()) == {"Success"}
    _check(engine, FileStorage(tmp_path / "storage"), files)


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"), ValueError("a value the index cannot hold")])
def test_indexing_failures_are_retried_when_transient_and_kept_when_not(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 3, rows=32, cols=32)
    folder = tmp_path / "storage" / ".intake"
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(folder), index_wait=0.0)
    calls = _fail_filing(monkeypatch, times=2, error=error)  # the batch, then its first alone
    try:
        _ingest(ingestor, storage, files[0].read_bytes())
        assert ingestor.wait_indexed(10)
        if isinstance(error, sqlite3.OperationalError):  # retried after its backoff
            deadline = time.monotonic() + 10
            while ingestor.settler.settled < 1:  # indexed, placed (its file visible) and settled
                assert time.monotonic() < deadline, "a transient failure was not retried"
                time.sleep(0.05)
            _check(engine, storage, files[:1])
        else:  # not retried in a loop: kept in the journal
            time.sleep(1.5)
            assert _rows(engine) == {} and len(calls) == 1
    finally:
        ingestor.close()
    if isinstance(error, ValueError):
        assert len(_segments(folder)) == 1
        assert replay(folder, lambda record: refile(engine, storage, record)) == 1  # the next start
        _check(engine, storage, files[:1])
    assert _segments(folder) == []


def test_a_newer_copy_sent_while_the_older_waits_for_its_retry_is_indexed_after_it(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A modality corrects an instance and sends it again (same SOP Instance UID, new bytes)
    while the first copy's indexing waits to be retried (the database was briefly locked): the
    index ends at the copy sent last. Before, the newer copy was indexed at once and the older
    one's retry, a second later, put the older bytes back."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    older = path.read_bytes()
    ds = dcmread(path)
    ds.PixelData = bytes(len(ds.PixelData))  # corrected pixels, same identity
    ds.save_as(path, enforce_file_format=True)
    newer = path.read_bytes()
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(tmp_path / "j"),
                        index_wait=0.0)
    _fail_filing(monkeypatch)
    try:
        _ingest(ingestor, storage, older)
        assert ingestor.wait_indexed(10)  # given up on for now: retried in a second
        _ingest(ingestor, storage, newer)
        deadline = time.monotonic() + 10
        while ingestor.settler.settled < 1 or ingestor._queue:
            assert time.monotonic() < deadline, "the retry did not happen"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        ingestor.close()
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(newer).hexdigest()
    assert storage.path(row.storage_key).read_bytes() == newer


def test_small_instances_the_walk_leaves_to_pydicom_are_read_from_memory(
        engine: Engine, tmp_path: Path, start_listener: object) -> None:
    """A journaled small instance is received into memory, with no staging file (storage's
    memory-first staging): implicit VR data sets, which the raw walk leaves to pydicom, are parsed
    from those bytes and stored as received."""
    from pydicom.uid import ImplicitVRLittleEndian

    files = []
    for p in make_ct_series(tmp_path / "src", 6, rows=32, cols=32):
        ds = dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=True)
        files.append(p)
    listener = start_listener(intake_journal=True)  # type: ignore[operator]
    assert [send_raw(listener.port, p) for p in files] == [0x0000] * len(files)  # as encoded, implicit VR
    storage = FileStorage(tmp_path / "storage")
    _check(engine, storage, files)
    for row in _rows(engine).values():
        stored = dcmread(storage.path(row.storage_key))
        assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert not any(storage.tmp_dir.iterdir())


def test_a_commit_reported_failed_that_happened_is_settled_before_its_record_is_done(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance received into memory is written under its key before its row commits. When
    the COMMIT happens but reports a failure, the retry finds a duplicate whose file is there
    (not yet durable): its journal record is done only once that file is settled."""
    from ground.db import WriterConnection

    storage = FileStorage(tmp_path / "storage")
    files = make_ct_series(tmp_path / "ct", 2, rows=32, cols=32)
    folder = tmp_path / "storage" / ".intake"
    journal = IntakeJournal(folder)
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=journal, index_wait=0.0)
    _ingest(ingestor, storage, files[0].read_bytes())  # the series' first instance, filed normally
    assert ingestor.wait_indexed(10) and ingestor.settler.flush(10)
    real_commit, real_settle, real_done = WriterConnection.commit, storage.settle, journal.done
    failed: list[int] = []
    settled: set[str] = set()
    done_before_settled: list[str] = []

    def commit_then_fail(self: WriterConnection) -> None:
        real_commit(self)
        if not failed:
            failed.append(1)
            raise sqlite3.OperationalError("connection lost after the COMMIT went through")

    def settle(placements: object) -> None:
        real_settle(placements)  # type: ignore[arg-type]
        settled.update(key for _, key in placements)  # type: ignore[attr-defined]

    def done(entry: object) -> None:
        keys = {str(r.storage_key) for r in _rows(engine).values()}
        done_before_settled.extend(sorted(keys - settled))
        real_done(entry)  # type: ignore[arg-type]

    monkeypatch.setattr(WriterConnection, "commit", commit_then_fail)
    monkeypatch.setattr(storage, "settle", settle)
    monkeypatch.setattr(journal, "done", done)
    try:
        settled.update(str(r.storage_key) for r in _rows(engine).values())  # the first one: settled above
        _ingest(ingestor, storage, files[1].read_bytes())
        deadline = time.monotonic() + 15
        while journal.pending() or not failed:  # the failed COMMIT, its retry, the settling
            assert time.monotonic() < deadline, "the instance was not retried and settled"
            time.sleep(0.05)
    finally:
        ingestor.close()
    assert failed and done_before_settled == []
    _check(engine, storage, files)


@pytest.mark.parametrize("size", ["small", "large"])
def test_replay_ends_at_the_copy_sent_last(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           size: str) -> None:
    """Two answered copies of one SOP Instance (the original, then a correction) are in the journal,
    not yet indexed, when the process dies. Replay files the original first; its row's
    ``received_at`` was the replay's time, so the correction looked older than the row and was
    dropped with the segment: the sender's last copy was lost. ``received_at`` is now when the
    instance was answered."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    older = path.read_bytes()
    newer = corrected_resend(older)
    folder = tmp_path / "j"
    # large: above spool_max_bytes, its file placed under its key before the answer
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20 if size == "small" else 1024,
                        journal=IntakeJournal(folder), index_wait=0.0)
    monkeypatch.setattr(Ingestor, "_ensure_indexer", lambda self: None)  # the process dies before indexing
    _ingest(ingestor, storage, older)
    _ingest(ingestor, storage, newer)
    assert ingestor.journal is not None
    ingestor.journal.close()  # what the crash leaves: the segment, unlocked
    assert replay(folder, lambda record: refile(engine, storage, record)) == 2
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(newer).hexdigest()
    assert storage.path(row.storage_key).read_bytes() == newer
    assert _segments(folder) == []


def test_an_older_copy_retried_after_another_process_indexed_a_newer_one_is_not_filed_over_it(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Receiving process 1 answers the original, and its indexing waits for a retry (the database
    was locked); the association is released all the same. The modality sends the correction on
    a new association, which process 2 takes and indexes at once. Process 1's retry then put the
    original back over the correction. Now a retried copy is not filed over a copy answered after
    it."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    older = path.read_bytes()
    newer = corrected_resend(older)
    first = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(tmp_path / "j"), index_wait=0.0)
    second = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(tmp_path / "j"),
                      index_wait=0.0)
    _fail_filing(monkeypatch, only=first)
    try:
        _ingest(first, storage, older)
        assert first.wait_indexed(10)  # given up on for now: retried in a second
        _ingest(second, storage, newer)
        assert second.wait_indexed(10)
        (row,) = _rows(engine).values()
        assert row.sha256 == hashlib.sha256(newer).hexdigest()
        _wait_retried(first)
    finally:
        first.close()
        second.close()
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(newer).hexdigest()
    assert storage.path(row.storage_key).read_bytes() == newer
    assert _segments(tmp_path / "j") == []  # the older copy's record is done, not kept for a replay


def test_an_older_copy_that_failed_alone_when_its_batch_was_split_does_not_come_back(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original and its correction are indexed in one batch, which fails (the database was
    locked), so each is filed alone: the original fails again and waits for a retry, the
    correction is filed. The original's retry then put the older bytes back."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    older = path.read_bytes()
    newer = corrected_resend(older)
    ingestor = Ingestor(engine, storage, spool_max_bytes=1 << 20, journal=IntakeJournal(tmp_path / "j"),
                        index_wait=0.3)  # both copies gather into one batch
    calls = _fail_filing(monkeypatch, times=2)  # the batch of two, then the original alone
    try:
        _ingest(ingestor, storage, older)
        _ingest(ingestor, storage, newer)
        assert ingestor.wait_indexed(10)
        _wait_retried(ingestor)
    finally:
        ingestor.close()
    assert calls[:3] == [2, 1, 1] and len(calls) == 4, calls
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(newer).hexdigest()
    assert storage.path(row.storage_key).read_bytes() == newer
    assert _segments(tmp_path / "j") == []


def test_a_resend_of_the_original_answered_while_its_correction_is_indexed_keeps_its_file(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original (large: its file placed under its key before the answer) is indexed; its
    correction is being indexed when the original's bytes are sent again. File names come from
    the bytes, so the resend was placed over the original's file and answered; the correction's
    batch then removed that file as obsolete, and the resend was indexed pointing at nothing.
    A placed file now never replaces one: the resend gets a name of its own."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    original = path.read_bytes()
    correction = corrected_resend(original)
    ingestor = Ingestor(engine, storage, spool_max_bytes=0, journal=IntakeJournal(tmp_path / "j"), index_wait=0.0)
    try:
        _ingest(ingestor, storage, original)
        assert ingestor.wait_indexed(10)
        real = Ingestor._file_batch
        resent: list[bool] = []

        def file_batch(self: Ingestor, items: list[Prepared]) -> object:
            if not resent and any(i.stored.sha256 == hashlib.sha256(correction).hexdigest() for i in items):
                resent.append(True)  # the resend arrives (another association) while this batch files
                thread = threading.Thread(target=_ingest, args=(ingestor, storage, original))
                thread.start()
                thread.join()
            return real(self, items)

        monkeypatch.setattr(Ingestor, "_file_batch", file_batch)
        _ingest(ingestor, storage, correction)
        assert ingestor.wait_indexed(10)
        _wait_retried(ingestor)
    finally:
        ingestor.close()
    assert resent
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(original).hexdigest()  # answered last
    assert storage.path(row.storage_key).read_bytes() == original
    files = [p for p in (tmp_path / "storage").rglob("*.dcm") if ".incoming" not in p.parts]
    assert files == [storage.path(row.storage_key)]  # nothing else left behind
    assert _segments(tmp_path / "j") == []


def test_a_large_resend_whose_folder_cannot_be_synced_leaves_the_indexed_file_alone(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large instance is indexed; the same bytes come again, and making the new file's folder
    entry durable fails (EIO). Undoing the placement moved the indexed instance's file (same
    name) back to the staging path, which the network engine then deleted."""
    import storage.local as local

    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    original = path.read_bytes()
    ingestor = Ingestor(engine, storage, spool_max_bytes=0, journal=IntakeJournal(tmp_path / "j"), index_wait=0.0)
    try:
        _ingest(ingestor, storage, original)
        assert ingestor.wait_indexed(10)
        ingestor.settler.flush(5)

        def eio(self: object, folder: str) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(local._FolderSyncs, "sync", eio)
        with pytest.raises(StorageFailure):
            _ingest(ingestor, storage, original)
        monkeypatch.undo()
    finally:
        ingestor.close()
    (row,) = _rows(engine).values()
    assert storage.path(row.storage_key).read_bytes() == original


def test_after_a_failed_flush_the_journal_writes_to_another_segment(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment whose flush failed (EIO) may not read back where that flush's records were, and
    replay stops at the first record that does not: records appended there after the failure,
    answered, would be unreachable. The next append goes to another segment."""
    real = os.fdatasync
    failing = [False]

    def fdatasync(fd: int) -> None:
        if failing[0]:
            failing[0] = False
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    journal = IntakeJournal(tmp_path / "j")
    journal.open()
    kept = journal.append({"n": 1}, b"one")
    failing[0] = True
    with pytest.raises(OSError):
        journal.append({"n": 2}, b"two")  # refused: not acknowledged
    after = journal.append({"n": 3}, b"three")
    assert after.segment is not kept.segment
    journal.close()
    records = [r.header["n"] for seg in _segments(tmp_path / "j") for r in read_records(seg.read_bytes())]
    assert 1 in records and 3 in records


def test_a_short_journal_write_is_refused_not_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pwrite that wrote part of a record (no error) left a torn record that was answered."""
    journal = IntakeJournal(tmp_path / "j")
    journal.open()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(data)[:10], offset))
    with pytest.raises(OSError, match="only 10 of a journal record"):
        journal.append({"n": 1}, b"one")
    monkeypatch.setattr(os, "pwrite", real)
    assert journal.append({"n": 2}, b"two").segment is not None
    journal.close()


def test_a_record_done_after_the_journal_closed_touches_no_other_file(tmp_path: Path) -> None:
    """Closing an ingestor whose indexing or settling ran past its wait closes the journal while
    records are still being done. A late done() recycled the closed segment: it wrote a journal
    head at offset 0 of whatever file had been given that descriptor number since, and flushed it."""
    journal = IntakeJournal(tmp_path / "j")
    journal.open()
    entry = journal.append({"n": 1}, b"one")
    journal.close()  # kept for replay: its record is not done
    other = tmp_path / "database"
    other.write_bytes(b"SQLite format 3\x00" + bytes(100))
    fd = os.open(other, os.O_RDWR)  # most likely the descriptor number the segment had
    try:
        journal.done(entry)
        assert os.pread(fd, 16, 0) == b"SQLite format 3\x00"
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    assert len(_segments(tmp_path / "j")) == 1  # still there for replay (done after the close)


def test_replay_of_an_earlier_copy_leaves_a_later_resend_s_file(engine: Engine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The original is filed, its correction replaces it (the original's file removed), then the
    original is resent and answered, and the process dies before indexing it: the segment holds
    all three. A copy's file name came from its bytes, so the resend took the original's freed
    name; replaying the original's record, superseded by the correction, removed "its" file:
    the resend's. The resend was then unfileable and the index ended at the correction."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    original = path.read_bytes()
    correction = corrected_resend(original)
    folder = tmp_path / "j"
    ingestor = Ingestor(engine, storage, spool_max_bytes=1024, journal=IntakeJournal(folder), index_wait=0.0)
    _ingest(ingestor, storage, original)
    assert ingestor.wait_indexed(10)
    _ingest(ingestor, storage, correction)
    assert ingestor.wait_indexed(10)
    monkeypatch.setattr(Ingestor, "_index", lambda self, batch: None)  # dies before indexing the resend
    _ingest(ingestor, storage, original)
    assert ingestor.journal is not None
    ingestor.journal.close()
    replay(folder, lambda record: refile(engine, storage, record))
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(original).hexdigest()  # answered last
    assert storage.path(row.storage_key).read_bytes() == original
    assert not (folder / UNFILEABLE_DIR_NAME).exists()
    files = [p for p in (tmp_path / "storage").rglob("*.dcm") if ".incoming" not in p.parts]
    assert files == [storage.path(row.storage_key)]


@pytest.mark.parametrize(("size", "journaled"), [("large", False), ("small", False), ("small", True), ("large", True)])
def test_a_resend_filed_by_another_process_before_a_replacement_s_cleanup_keeps_its_file(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str, journaled: bool) -> None:
    """Two receiving processes: one files the correction and, after its COMMIT, removes the
    original's file; the other files a resend of the original in between. Its file took the
    original's name (same bytes, same name), and the removal took the resend's file, after its
    spool row or journal record was settled: an answered instance with no file. Large instances
    (renamed or linked into place) and small ones (spooled, or journaled in memory: the default)."""
    import integrations.dicom.ingest as ingest_module

    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    original = path.read_bytes()
    correction = corrected_resend(original)

    def ingestor(journal: str) -> Ingestor:
        return Ingestor(engine, FileStorage(tmp_path / "storage"), spool_max_bytes=1 << 20 if size == "small" else 0,
                        journal=IntakeJournal(tmp_path / journal) if journaled else None, index_wait=0.0)

    first, second = ingestor("j1"), ingestor("j2")

    def send(target: Ingestor, data: bytes) -> None:
        writer = target.storage.staging_file(memory_first=target.spool_max_bytes if target.journal else 0)
        writer.write(data)
        staged = Path(writer.name)
        try:
            target.ingest(staged, calling_ae="MODALITY")
            if target.journal is not None:
                assert target.wait_indexed(10)
        finally:
            writer.close()
            staged.unlink(missing_ok=True)

    real_remove = ingest_module._remove_quietly
    resent: list[str] = []

    def remove(where: FileStorage, key: str) -> None:
        if not resent:
            resent.append(key)
            send(second, original)  # the other process files the resend before this cleanup
        real_remove(where, key)

    try:
        send(first, original)
        monkeypatch.setattr(ingest_module, "_remove_quietly", remove)
        send(first, correction)
        monkeypatch.undo()
        first.settler.flush(5)
        second.settler.flush(5)
    finally:
        first.close()
        second.close()
    assert resent
    (row,) = _rows(engine).values()
    assert row.sha256 == hashlib.sha256(original).hexdigest()
    assert storage.path(row.storage_key).read_bytes() == original


def test_a_large_instance_refused_for_its_journal_leaves_no_file(engine: Engine, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A large instance's file is placed before its journal record; when the journal refuses it
    (full, EIO), the sender is refused and sends it again: each refusal left a whole file."""
    storage = FileStorage(tmp_path / "storage")
    (path,) = make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    data = path.read_bytes()
    ingestor = Ingestor(engine, storage, spool_max_bytes=1024, journal=IntakeJournal(tmp_path / "j"), index_wait=0.0)

    def full(self: IntakeJournal, header: object, data: bytes) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(IntakeJournal, "append", full)
            for _ in range(3):
                with pytest.raises(OutOfResources):
                    _ingest(ingestor, storage, data)
        _ingest(ingestor, storage, data)
        assert ingestor.wait_indexed(10)
    finally:
        ingestor.close()
    (row,) = _rows(engine).values()
    files = [p for p in (tmp_path / "storage").rglob("*.dcm") if ".incoming" not in p.parts]
    assert files == [storage.path(row.storage_key)]
