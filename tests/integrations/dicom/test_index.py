"""The study index on its own (patients without an ID, versions, duplicates), and
:func:`ingest_file`, the per-instance work after the bytes are on disk: order and durability,
outcomes, concurrency (the header walk is tested in test_headers_walk.py)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from audit.chain import AuditRecord, verify
from ground.clock import as_utc, utcnow
from ground.db import make_engine, session_scope
from integrations.dicom.errors import CannotUnderstand, IdentifiersMissing, OutOfResources
from integrations.dicom.headers import read_headers, read_headers_pydicom
from integrations.dicom.index import (
    IndexSql,
    Instance,
    Patient,
    Series,
    StoreOutcome,
    Study,
)
from integrations.dicom.ingest import IngestResult, ingest_file
from integrations.dicom.lifecycle import StudyEvent, transition
from storage import TMP_DIR_NAME, FileStorage
from tests.factories.studies import make_ct_series


def _instance(tmp_path: Path, study: str, sop: str, patient_id: str = "", marker: str = "a") -> bytes:
    """One small CT instance of ``study`` (series ``study.1``); ``marker`` changes its bytes (the
    same arguments give the same bytes: a resend)."""
    folder = tmp_path / f"{sop}-{marker}"
    if folder.exists():
        return next(folder.glob("*.dcm")).read_bytes()
    (path,) = make_ct_series(folder, 1, rows=8, cols=8, patient_id=patient_id, study_uid=study)
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SeriesInstanceUID = study + ".1"
    ds.ImageComments = marker
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _index(engine: Engine, storage: FileStorage, tmp_path: Path, study: str, sop: str, patient_id: str = "",
           marker: str = "a") -> None:
    """File one instance the way the listener does (ingest_file: storage, index, audit)."""
    _ingest(engine, storage, _instance(tmp_path, study, sop, patient_id, marker))


def _drive(engine: Engine, *events: StudyEvent) -> None:
    """Move the (one) study through ``events``, each an allowed lifecycle transition."""
    for event in events:
        with session_scope(engine) as s:
            st = s.exec(select(Study)).one()
            assert transition(s, study_pk=st.id or 0, study_uid=st.study_instance_uid, version=st.version,
                              event=event, actor="test", reason="boom" if event is StudyEvent.fail else None)


TO_DRAFTED = (StudyEvent.quiet, StudyEvent.enqueue, StudyEvent.render, StudyEvent.infer, StudyEvent.drafted)


def test_studies_without_patient_id_do_not_share_a_patient(engine: Engine, storage: FileStorage,
                                                           tmp_path: Path) -> None:
    _index(engine, storage, tmp_path, "1.2.3", "1.2.3.1.1")
    _index(engine, storage, tmp_path, "1.2.4", "1.2.4.1.1")
    _index(engine, storage, tmp_path, "1.2.5", "1.2.5.1.1", patient_id="MRN1")
    _index(engine, storage, tmp_path, "1.2.6", "1.2.6.1.1", patient_id="MRN1")
    with session_scope(engine) as s:
        patients = s.exec(select(Patient)).all()
        studies = s.exec(select(Study)).all()
    assert len(patients) == 3
    assert len({st.patient_pk for st in studies}) == 3


def test_late_instance_after_drafting_starts_a_new_version(engine: Engine, storage: FileStorage,
                                                           tmp_path: Path) -> None:
    _index(engine, storage, tmp_path, "1.2.3", "1.2.3.1.1", "P")
    _drive(engine, *TO_DRAFTED)
    _index(engine, storage, tmp_path, "1.2.3", "1.2.3.1.1", "P")  # duplicate: no change
    with session_scope(engine) as s:
        st = s.exec(select(Study)).one()
        assert (st.state, st.version) == ("drafted", 1)
    _index(engine, storage, tmp_path, "1.2.3", "1.2.3.1.2", "P", marker="b")
    with session_scope(engine) as s:
        st = s.exec(select(Study)).one()
        assert (st.state, st.version) == ("receiving", 2)
        assert not transition(s, study_pk=st.id or 0, study_uid=st.study_instance_uid, version=1,  # stale version
                              event=StudyEvent.quiet, actor="test")
    with session_scope(engine) as s:
        actions = [(a.action, json.loads(a.details)) for a in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq)))
                   if a.action.startswith("study.")]
    # every state change is audited, the arrival that started version 2 included
    assert actions == [("study.stable", {"version": 1}), ("study.queued", {"version": 1}),
                       ("study.rendering", {"version": 1}), ("study.inferring", {"version": 1}),
                       ("study.drafted", {"version": 1}),
                       ("study.receiving", {"version": 2, "from": "drafted", "new_version": True})]


# -- ingest_file: the per-instance work after the bytes are on disk ---------------------------


class _Staged:
    """A received file as the listener hands it over: written through the storage's staging file."""

    def __init__(self, storage: FileStorage, data: bytes) -> None:
        self.writer = storage.staging_file(delete=False, suffix=".dcm")
        self.writer.write(data)
        self.writer.file.flush()
        self.path = Path(self.writer.name)

    def discard(self) -> None:
        self.writer.close()
        self.path.unlink(missing_ok=True)


def _ingest(engine: Engine, storage: FileStorage, data: bytes, **kw: Any) -> IngestResult:
    staged = _Staged(storage, data)
    try:
        return ingest_file(engine=engine, storage=storage, staged=staged.path, calling_ae="MODALITY", **kw)
    finally:
        staged.discard()


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "storage")


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return [p.read_bytes() for p in make_ct_series(tmp_path_factory.mktemp("ct"), 6, rows=64, cols=64)]


def _stored_files(storage: FileStorage) -> set[str]:
    return {p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*.dcm")
            if TMP_DIR_NAME not in p.parts}


def _check_consistent(engine: Engine, storage: FileStorage) -> list[Instance]:
    """Every file has its row and every row its file; the audit chain verifies."""
    with session_scope(engine) as s:
        rows = list(s.exec(select(Instance)).all())
        assert verify(s).ok
    assert _stored_files(storage) == {r.storage_key for r in rows}
    for r in rows:
        assert hashlib.sha256(storage.path(r.storage_key).read_bytes()).hexdigest() == r.sha256
    return rows


def test_ingest_new_duplicate_replaced_and_new_version(engine: Engine, storage: FileStorage,
                                                       ct_series: list[bytes], tmp_path: Path) -> None:
    first = _ingest(engine, storage, ct_series[0])  # opens the series: the ORM upserts
    second = _ingest(engine, storage, ct_series[1])  # the hot path
    assert (first.outcome, second.outcome) == (StoreOutcome.new, StoreOutcome.new)
    assert _ingest(engine, storage, ct_series[1]).outcome == StoreOutcome.duplicate
    rows = _check_consistent(engine, storage)
    assert len(rows) == 2
    row = next(r for r in rows if r.sop_instance_uid == second.headers.sop_instance_uid)
    h = second.headers
    assert (row.instance_number, row.rows, row.columns, row.image_type, row.number_of_frames) == (2, 64, 64, "ORIGINAL\\PRIMARY\\AXIAL", 1)
    assert row.image_position_patient == json.dumps(h.image_position_patient)
    assert row.image_orientation_patient == "[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]"
    assert (row.specific_character_set, row.calling_ae, row.size) == ("ISO_IR 192", "MODALITY", len(ct_series[1]))
    assert row.received_at.tzinfo is not None
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
        series = s.exec(select(Series)).one()
        patient = s.exec(select(Patient)).one()
        assert (study.state, study.version, study.description, series.modality, patient.name) == (
            "receiving", 1, "CT CHEST WITH CONTRAST", "CT", "Test^Patient")
    _drive(engine, StudyEvent.quiet, StudyEvent.fail)
    with session_scope(engine) as s:
        s.execute(update(Study).values(attempts=2))
    # same SOP Instance UID, different bytes: replaced, the old file goes, the study changes
    ds = dcmread(io.BytesIO(ct_series[1]))
    ds.SeriesDescription = "changed by the modality"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    before = utcnow()
    replaced = _ingest(engine, storage, buf.getvalue())
    assert (replaced.outcome, replaced.study_version, replaced.new_version) == (StoreOutcome.replaced, 2, True)
    rows = _check_consistent(engine, storage)
    assert len(rows) == 2
    assert {r.sha256 for r in rows} == {first.stored.sha256, replaced.stored.sha256}
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
    assert (study.state, study.version, study.attempts, study.failure_reason) == ("receiving", 2, 0, None)
    assert as_utc(study.state_changed_at) >= before and as_utc(study.last_received_at) >= before
    with session_scope(engine) as s:
        audit = [(a.action, json.loads(a.details)) for a in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()]
    assert [a for a, _ in audit] == ["instance.new", "instance.new", "instance.duplicate", "study.stable",
                                     "study.failed", "instance.replaced", "study.receiving"]
    assert audit[-1][1] == {"version": 2, "from": "failed", "new_version": True}
    details = audit[-2][1]
    assert details == {"study": h.study_instance_uid, "series": h.series_instance_uid, "sop_class": h.sop_class_uid,
                       "transfer_syntax": h.transfer_syntax_uid, "size": replaced.stored.size,
                       "sha256": replaced.stored.sha256, "study_version": 2}


def test_ingest_rearms_a_stable_study_without_a_new_version(engine: Engine, storage: FileStorage,
                                                            ct_series: list[bytes]) -> None:
    _ingest(engine, storage, ct_series[0])
    _drive(engine, StudyEvent.quiet)
    before = utcnow()
    result = _ingest(engine, storage, ct_series[1])
    assert (result.study_version, result.new_version) == (1, False)
    with session_scope(engine) as s:
        study = s.exec(select(Study)).one()
    assert (study.state, study.version) == ("receiving", 1)
    assert as_utc(study.state_changed_at) >= before


def test_a_failed_index_transaction_leaves_nothing_half_stored(engine: Engine, storage: FileStorage,
                                                               ct_series: list[bytes],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _ingest(engine, storage, ct_series[0])
    import integrations.dicom.index as index_module

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(index_module, "run_writes", broken)
    staged = _Staged(storage, ct_series[1])
    with pytest.raises(RuntimeError):
        ingest_file(engine=engine, storage=storage, staged=staged.path, calling_ae="MODALITY")
    staged.discard()
    rows = _check_consistent(engine, storage)  # no orphan file, no row, no audit record
    assert len(rows) == 1
    with session_scope(engine) as s:
        assert verify(s).checked == 1


def test_refusals_index_nothing(engine: Engine, storage: FileStorage, ct_series: list[bytes]) -> None:
    truncated = ct_series[2][: len(ct_series[2]) - 100]
    with pytest.raises(CannotUnderstand):
        _ingest(engine, storage, truncated)
    ds = dcmread(io.BytesIO(ct_series[2]))
    with pytest.raises(IdentifiersMissing):
        _ingest(engine, storage, ct_series[2], announced_sop_instance_uid=ds.SOPInstanceUID + ".9")
    with pytest.raises(OutOfResources):
        _ingest(engine, storage, ct_series[2], min_free_bytes=1 << 62)
    assert _check_consistent(engine, storage) == []
    assert not any(storage.tmp_dir.iterdir())


def test_file_and_rename_are_durable_before_the_row_commits(engine: Engine, storage: FileStorage,
                                                            ct_series: list[bytes], db_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsync, the rename and the directory fsync run in helper threads: each must have
    finished before the index row is committed (seen from another connection), the rename after
    the fsync."""
    _ingest(engine, storage, ct_series[0])
    events: list[str] = []
    real_sync, real_commit = FileStorage.sync_staged, FileStorage.commit_new

    def committed_rows() -> int:
        if db_url.startswith("sqlite"):  # a plain reader: WAL readers do not wait for the writer
            with closing(sqlite3.connect(db_url.split("///", 1)[1])) as c:
                return int(c.execute("SELECT count(*) FROM instance").fetchone()[0])
        with psycopg.connect(db_url.replace("postgresql+psycopg", "postgresql")) as c:
            return int(c.execute("SELECT count(*) FROM instance").fetchone()[0])  # type: ignore[index]

    def slow_sync(self: FileStorage, staged: Path) -> None:
        time.sleep(0.2)
        real_sync(self, staged)
        events.append(f"synced rows={committed_rows()}")

    def slow_commit(self: FileStorage, placements: list[tuple[Path, str]]) -> None:
        events.append("placing")
        time.sleep(0.2)
        real_commit(self, placements)
        events.append(f"placed rows={committed_rows()}")

    monkeypatch.setattr(FileStorage, "sync_staged", slow_sync)
    monkeypatch.setattr(FileStorage, "commit_new", slow_commit)
    _ingest(engine, storage, ct_series[1])
    assert events == ["synced rows=1", "placing", "placed rows=1"]
    assert len(_check_consistent(engine, storage)) == 2


def test_concurrent_threads_file_one_study_once(engine: Engine, storage: FileStorage,
                                                tmp_path: Path) -> None:
    """Four associations deliver one new study at once (the first instances race to create the
    patient, study and series), while a worker moves the study's state: no duplicated rows, no
    deadlock, one chain."""
    data = [p.read_bytes() for p in make_ct_series(tmp_path / "par", 24, rows=32, cols=32)]
    stop = threading.Event()

    def mover() -> None:
        while not stop.is_set():
            with session_scope(engine) as s:
                study = s.exec(select(Study)).first()
                if study is not None:
                    transition(s, study_pk=study.id or 0, study_uid=study.study_instance_uid, version=study.version,
                               event=StudyEvent.quiet, actor="test")

    worker = threading.Thread(target=mover)
    worker.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda d: _ingest(engine, storage, d).outcome, data))
    finally:
        stop.set()
        worker.join()
    assert outcomes == [StoreOutcome.new] * len(data)
    rows = _check_consistent(engine, storage)
    assert len(rows) == len(data)
    with session_scope(engine) as s:
        assert len(s.exec(select(Patient)).all()) == len(s.exec(select(Study)).all()) == len(s.exec(select(Series)).all()) == 1


def _ingest_in_process(db_url: str, root: str, files: list[str]) -> None:
    """One receiving process (run by multiprocessing, spawned)."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    engine = make_engine(db_url)
    storage = FileStorage(Path(root))
    for f in files:
        _ingest(engine, storage, Path(f).read_bytes())
    engine.dispose()


def test_concurrent_processes_file_one_study_once(engine: Engine, storage: FileStorage, db_url: str,
                                                  tmp_path: Path) -> None:
    files = [str(p) for p in make_ct_series(tmp_path / "mp", 16, rows=32, cols=32)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ingest_in_process, args=(db_url, str(storage.root), files[i::2])) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = _check_consistent(engine, storage)
    assert len(rows) == len(files)
    with session_scope(engine) as s:
        assert len(s.exec(select(Patient)).all()) == len(s.exec(select(Study)).all()) == len(s.exec(select(Series)).all()) == 1
        assert verify(s).checked == len(files)


def test_arabic_and_utf8_text_is_decoded_on_ingest(engine: Engine, storage: FileStorage, tmp_path: Path) -> None:
    arab = (CORPUS / "charset" / "pydicom_chrArab.dcm").read_bytes()
    assert _ingest(engine, storage, arab).outcome == StoreOutcome.new
    (utf8,) = make_ct_series(tmp_path / "utf8", 1, rows=16, cols=16, patient_id="ع-1")
    ds = dcmread(utf8)
    ds.PatientName = "قباني^لنزار"
    ds.StudyDescription = "أشعة مقطعية"
    ds.save_as(utf8, enforce_file_format=True)
    assert read_headers(utf8) == read_headers_pydicom(utf8)
    _ingest(engine, storage, utf8.read_bytes())
    with session_scope(engine) as s:
        names = {p.patient_id: p.name for p in s.exec(select(Patient)).all()}
        descriptions = {st.description for st in s.exec(select(Study)).all()}
    assert names == {"SCSARAB": "قباني^لنزار", "ع-1": "قباني^لنزار"}
    assert "أشعة مقطعية" in descriptions


CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


def test_a_batch_s_writes_fold_into_one_statement_s_parts_or_are_refused() -> None:
    """PostgreSQL runs a batch's writes as one statement: each INSERT's rows become one multi-row
    INSERT where its first row stood, parameters in row order; two updates of one row would
    silently leave one of them, and an INSERT with more than one VALUES tuple at its end cannot
    take more rows: both are refused (the batch is then filed one by one)."""
    sql = IndexSql(pg_psycopg.dialect())  # type: ignore[no-untyped-call]
    audit = "INSERT INTO audit_event (seq, hash) VALUES (%s, %s)"
    replace_row = (sql.update_instance, (*range(17), 9))
    folded = sql.fold([(sql.insert_instance, ("a",) * 18), (audit, (1, "h1")), replace_row,
                       (sql.insert_instance, ("b",) * 18), (audit, (2, "h2"))])
    assert [stmt for stmt, _ in folded] == [
        sql.insert_instance + ", (" + ", ".join(["%s"] * 18) + ")",
        audit + ", (%s, %s)",
        sql.update_instance,
    ]
    assert folded[0][1] == ("a",) * 18 + ("b",) * 18 and folded[1][1] == (1, "h1", 2, "h2")
    with pytest.raises(ValueError, match="twice"):
        sql.fold([replace_row, replace_row])
    upsert = "INSERT INTO t (a) VALUES (%s) ON CONFLICT (a) DO NOTHING"
    with pytest.raises(ValueError, match="one VALUES"):
        sql.fold([(upsert, (1,)), (upsert, (2,))])
