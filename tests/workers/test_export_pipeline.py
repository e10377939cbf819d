"""End to end: a drafted study is published through the pipeline's tasks (embedded mode), its SR,
PDF and KOS go through the outbox to a real PACS (Orthanc), and land in the study there; the PDF
read back from Orthanc gives the draft's Arabic in logical order (pdftotext)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from ground.db import session_scope
from integrations.dicom.outbox import OutboxItem
from reporting.draft import Draft
from taqrir.settings import Settings, load_settings
from tests.factories.drafts import CT_3SLICE, SECTIONS
from tests.factories.orthanc import OrthancServer
from tests.reporting.dicom.pdftext import arabic_column_text, letters, pdf_text
from tests.workers.test_dicom_objects import _drafted
from workers.context import set_context
from workers.pipeline import Dispatcher
from workers.service import PipelineContext

SR, PDF, KOS = "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc", aet="PACS")
    server.start()
    yield server
    server.stop(kill=True)


def pacs_settings(engine: Engine, tmp_path: Path, pacs: OrthancServer) -> Settings:
    """Taqrir's settings with the PACS as its one export destination."""
    return load_settings(
        data_dir=tmp_path / "data", database_url=engine.url.render_as_string(hide_password=False),
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}]})


@contextmanager
def dispatching(settings: Settings, ctx: PipelineContext) -> Iterator[Dispatcher]:
    """A dispatcher (embedded mode) whose tasks have run when the block ends; closed either way."""
    dispatcher = Dispatcher(settings, ctx)
    try:
        yield dispatcher
        dispatcher.wait_idle()
    finally:
        dispatcher.close()
        set_context(None)


def publish_to_pacs(engine: Engine, tmp_path: Path, pacs: OrthancServer, *,
                    upload: bool = True) -> tuple[Draft, list[OutboxItem]]:
    """The PACS holds a CT study; Taqrir drafts it (fixed text), publishes it through the tasks
    (embedded mode) and the outbox sends its objects to the PACS. Returns the draft and its rows."""
    for f in CT_3SLICE if upload else []:  # the PACS holds the study it routed to Taqrir
        pacs.upload(f.read_bytes())
    settings = pacs_settings(engine, tmp_path, pacs)
    ctx = PipelineContext.from_settings(settings, engine)
    draft = _drafted(ctx, CT_3SLICE)
    with dispatching(settings, ctx) as dispatcher:
        dispatcher.republish(draft.draft_id)  # the publish task, then one export task per object
    with session_scope(engine) as s:
        return draft, list(s.exec(select(OutboxItem)).all())


def test_a_drafted_study_reaches_the_pacs_as_sr_pdf_and_kos(engine: Engine, tmp_path: Path,
                                                            pacs: OrthancServer) -> None:
    _draft, rows = publish_to_pacs(engine, tmp_path, pacs)
    [study_id] = pacs.get("/studies")
    assert sorted(r.kind for r in rows) == ["kos", "pdf", "sr"]
    assert all(r.state == "sent" and r.attempts == 1 for r in rows), [(r.kind, r.last_error) for r in rows]
    # Orthanc: the three objects in the source study, each once
    by_class: dict[str, str] = {}
    for r in rows:
        [inst] = pacs.find_instance(r.sop_instance_uid)
        assert pacs.get(f"/instances/{inst}/study")["ID"] == study_id
        by_class[pacs.instance_tags(inst)["SOPClassUID"]] = inst
    assert set(by_class) == {SR, PDF, KOS}
    modalities = sorted(pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                        for s in pacs.get(f"/studies/{study_id}")["Series"])
    assert modalities == ["CT", "DOC", "KO", "SR"]
    sr_tags = pacs.instance_tags(by_class[SR])
    assert sr_tags["VerificationFlag"] == "UNVERIFIED"
    # the PDF as the PACS gives it back, read by poppler: Arabic in logical order
    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(by_class[PDF])))
    pdf = bytes(ds.EncapsulatedDocument)[: int(ds.get("EncapsulatedDocumentLength") or len(ds.EncapsulatedDocument))]
    (tmp_path / "from-pacs.pdf").write_bytes(pdf)
    arabic = letters(arabic_column_text(tmp_path / "from-pacs.pdf"))
    assert letters(SECTIONS["ar"].findings.split("\n")[0]) in arabic
    assert letters(SECTIONS["ar"].impression) in arabic
    assert "AI DRAFT - UNVERIFIED - RESEARCH ONLY" in pdf_text(tmp_path / "from-pacs.pdf")


def test_the_sweep_sends_what_is_due_after_the_pacs_comes_back(engine: Engine, tmp_path: Path) -> None:
    from datetime import timedelta

    from sqlmodel import update

    from ground.clock import utcnow

    pacs = OrthancServer(tmp_path / "orthanc", aet="PACS")  # down while the draft is published
    try:
        _draft, rows = publish_to_pacs(engine, tmp_path, pacs, upload=False)
        assert {r.state for r in rows} == {"failed"} and all(r.attempts == 1 for r in rows)
        pacs.start()
        settings = pacs_settings(engine, tmp_path, pacs)
        with dispatching(settings, PipelineContext.from_settings(settings, engine)) as dispatcher:
            assert dispatcher.sweep() == 0  # not due yet: the backoff holds
            with session_scope(engine) as s:
                s.exec(update(OutboxItem).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
            assert dispatcher.sweep() == 3
        with session_scope(engine) as s:
            after = s.exec(select(OutboxItem)).all()
        assert {r.state for r in after} == {"sent"} and all(r.attempts == 2 for r in after)
        assert sorted(pacs.instance_tags(pacs.find_instance(r.sop_instance_uid)[0])["Modality"] for r in after) == [
            "DOC", "KO", "SR"]
    finally:
        pacs.stop(kill=True)


def test_the_verified_sr_of_a_review_reaches_the_pacs_beside_the_draft(engine: Engine, tmp_path: Path,
                                                                       pacs: OrthancServer) -> None:
    from datetime import UTC, datetime

    from reporting.draft import Sections
    from reporting.fhir import Review
    from workers.dicom_objects import store_verified_sr

    draft, rows = publish_to_pacs(engine, tmp_path, pacs)
    assert {r.state for r in rows} == {"sent"}
    settings = pacs_settings(engine, tmp_path, pacs)
    # what the FHIR $review's hook does in the review's transaction (tests/integrations/fhir/
    # test_review_verified_sr.py drives it through the API); the outbox row is sent by the sweep
    edit = Review(action="edit", reviewer_id="dr.amal", reviewer_display="Dr Amal Haddad",
                  reviewed_at=datetime(2026, 12, 5, 9, 30, tzinfo=UTC),
                  edits={"en": Sections(findings="Small right pleural effusion.", impression="Effusion.")})
    with session_scope(engine) as s:
        written = store_verified_sr(s, settings, draft, edit, report_version=2)
    assert written is not None
    with dispatching(settings, PipelineContext.from_settings(settings, engine)) as dispatcher:
        assert dispatcher.sweep() == 1
    with session_scope(engine) as s:
        [row] = s.exec(select(OutboxItem).where(OutboxItem.kind == "verified_sr")).all()
    assert row.state == "sent" and row.attempts == 1, row.last_error
    [inst] = pacs.find_instance(written.sop_instance_uid)
    [study_id] = pacs.get("/studies")
    assert pacs.get(f"/instances/{inst}/study")["ID"] == study_id  # the same study as the draft's
    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(inst)))
    assert ds.VerificationFlag == "VERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert str(ds.VerifyingObserverSequence[0].VerifyingObserverName) == "Haddad^Amal^^Dr"
    [draft_sr] = [r for r in rows if r.kind == "sr"]
    predecessors = [i.ReferencedSOPInstanceUID for st in ds.PredecessorDocumentsSequence
                    for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert predecessors == [draft_sr.sop_instance_uid]
    assert ds.SeriesDescription.lower().startswith("research only")
