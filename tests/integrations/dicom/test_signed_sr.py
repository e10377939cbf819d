"""A verified SR from the reporting system, received by the listener over a real association
(DCMTK storescu), read as the study's signed report (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from audit.deltas import ReportDelta
from audit.signed_report import SignedReport
from ground.db import session_scope
from integrations.dicom.config import ListenerSettings, StudySettings
from integrations.dicom.index import Instance, Study, StudyState
from integrations.dicom.listener import Listener
from integrations.dicom.signed_sr import NotSigned, SignedSrReader, signed_from_sr
from storage import FileStorage
from tests.factories.dcmtk import storescu
from tests.factories.signed import seed
from tests.factories.sr import signed_sr

UID = "1.2.826.0.1.3680043.8.498.1001"


def test_verified_sr_is_a_signed_report(tmp_path: Path) -> None:
    ds = pydicom.dcmread(signed_sr(tmp_path, study_uid=UID, accession="ACC1001"))
    signed = signed_from_sr(ds, actor="RIS")
    by = {t.language: t for t in signed.texts}
    assert by["en"].findings == "The lungs are clear. Small left pleural effusion."
    assert by["ar"].impression == "انصباب جنبي أيسر صغير." and signed.status == "final"
    assert (signed.study_instance_uid, signed.accession_number, signed.source) == (UID, "ACC1001", "dicom")
    assert signed.signer_name == "Radiologist Amal" and signed.signer_id == "D1234"
    assert signed.signed_at == datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    untagged = signed_from_sr(pydicom.dcmread(signed_sr(tmp_path, study_uid=UID, accession="A", tag_languages=False)))
    assert [t.language for t in untagged.texts] == ["ar", "en"]  # by script
    amended = signed_from_sr(pydicom.dcmread(signed_sr(tmp_path, study_uid=UID, accession="A", predecessor=True)))
    assert amended.status == "amended"


@pytest.mark.parametrize(("verified", "complete"), [(False, True), (True, False), (False, False)])
def test_unverified_or_partial_sr_is_not_signed(tmp_path: Path, verified: bool, complete: bool) -> None:
    with pytest.raises(NotSigned, match="only a VERIFIED and COMPLETE SR"):
        signed_from_sr(pydicom.dcmread(signed_sr(tmp_path, study_uid=UID, accession="A", verified=verified,
                                                 complete=complete)))


@pytest.fixture
def listen(engine: Engine, tmp_path: Path) -> Iterator[Callable[[SignedSrReader | None], int]]:
    """A listener on a free port with (or without) the signed-SR hook; returns its port."""
    started: list[Listener] = []

    def _start(reader: SignedSrReader | None) -> int:
        listener = Listener(settings=ListenerSettings(host="127.0.0.1", port=0, min_free_bytes=0),
                            study_settings=StudySettings(stable_after=3600, sweep_interval=3600), engine=engine,
                            storage=FileStorage(tmp_path / "storage"), after_store=reader)
        started.append(listener)
        return listener.start()

    yield _start
    for listener in started:
        listener.stop()


def _dciodvfy_ok(path: Path) -> None:
    p = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert "Error" not in p.stdout + p.stderr, p.stdout + p.stderr


def test_sr_over_the_listener_is_stored_beside_the_draft_without_redrafting(
        engine: Engine, tmp_path: Path, listen: Callable[[SignedSrReader | None], int]) -> None:
    study_pk, draft_id = seed(engine, study_uid=UID, accession="ACC1001")
    reader = SignedSrReader(engine, FileStorage(tmp_path / "storage"))
    port = listen(reader)
    good = signed_sr(tmp_path, study_uid=UID, accession="ACC1001")
    draft_sr = signed_sr(tmp_path, study_uid=UID, accession="ACC1001", verified=False, complete=False)
    _dciodvfy_ok(good)
    run = storescu(port, [good, draft_sr])
    assert run.returncode == 0 and run.statuses() == ["Success", "Success"], run.output
    reader.join()
    with session_scope(engine) as s:
        rows = s.exec(select(SignedReport).order_by(SignedReport.language)).all()
        assert [(r.language, r.source, r.status) for r in rows] == [("ar", "dicom", "final"), ("en", "dicom", "final")]
        assert rows[0].source_id == str(pydicom.dcmread(good).SOPInstanceUID)
        assert {d.draft_id for d in s.exec(select(ReportDelta)).all()} == {draft_id}
        study = s.get(Study, study_pk)
        assert study is not None and (study.state, study.version) == (StudyState.drafted.value, 1)  # no redraft
        assert len(s.exec(select(Instance)).all()) == 2  # both SRs durably indexed


def test_recover_reads_srs_left_unread(engine: Engine, tmp_path: Path,
                                      listen: Callable[[SignedSrReader | None], int]) -> None:
    seed(engine, study_uid=UID, accession="ACC1001")
    port = listen(None)  # no hook: as if the process died before reading
    storescu(port, [signed_sr(tmp_path, study_uid=UID, accession="ACC1001")])
    reader = SignedSrReader(engine, FileStorage(tmp_path / "storage"))
    assert reader.recover() == 1
    reader.join()
    assert reader.recover() == 0
    with session_scope(engine) as s:
        assert len(s.exec(select(SignedReport)).all()) == 2


def test_report_objects_do_not_start_a_new_version() -> None:
    from integrations.dicom.lifecycle import Decision, on_instance
    from tests.factories.sr import ENHANCED_SR

    assert on_instance("drafted", 1, ENHANCED_SR) == Decision(StudyState.drafted, 1, False)
    assert on_instance("drafted", 1, "1.2.840.10008.5.1.4.1.1.104.1") == Decision(StudyState.drafted, 1, False)
    assert on_instance("drafted", 1, "1.2.840.10008.5.1.4.1.1.2") == Decision(StudyState.receiving, 2, True)  # CT: redraft
    assert on_instance("drafted", 1) == Decision(StudyState.receiving, 2, True)
