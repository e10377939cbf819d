"""Publishing writes the draft's SR, PDF and KOS (export folder and storage), from the source
header as stored, idempotently; a $review accept/edit writes the verified SR, a rejection none."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import col, select, update

from audit.chain import AuditRecord
from ground.db import session_scope
from inference.types import BilingualReport, InferenceProvenance, ReportSections
from integrations.dicom.index import Study
from integrations.dicom.ingest import ingest_file
from reporting.draft import Draft, Sections
from reporting.draft_record import DraftRecord
from reporting.fhir import Review
from taqrir.settings import load_settings
from tests.factories.drafts import CT_3SLICE, DICOM, SECTIONS, draft_from_dicom
from tests.reporting.dicom.checks import dciodvfy_errors
from tests.reporting.dicom.pdftext import arabic_column_text, letters
from workers.dicom_objects import read_source, store_verified_sr
from workers.service import PipelineContext, _study_ref, build_draft, publish_stage, render_stage
from workers.state import KeyImageSet


def _ingest(ctx: PipelineContext, paths: list[Path]) -> None:
    for path in paths:
        staged = ctx.storage.staging_file(delete=False)
        staged.write(path.read_bytes())
        staged.close()
        ingest_file(engine=ctx.engine, storage=ctx.storage, staged=Path(staged.name), calling_ae="TEST")


def _context(engine: Engine, tmp_path: Path) -> PipelineContext:
    settings = load_settings(data_dir=tmp_path / "data", database_url=engine.url.render_as_string(hide_password=False),
                             dicom_objects={"institution_name": "Research Hospital"})
    return PipelineContext.from_settings(settings, engine)


def _drafted(ctx: PipelineContext, paths: list[Path]) -> Draft:
    """A study received, rendered for real, and a draft stored with fixed text (no model)."""
    _ingest(ctx, paths)
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    with session_scope(ctx.engine) as s:
        s.exec(update(Study).where(col(Study.study_instance_uid) == uid).values(state="stable"))
    assert render_stage(ctx, uid, 1)
    cfg = ctx.config_sha256
    with session_scope(ctx.engine) as s:
        study = s.exec(select(Study).where(Study.study_instance_uid == uid)).one()
        manifest = json.loads(s.exec(select(KeyImageSet).where(KeyImageSet.study_pk == study.id)).one().manifest)
        report = BilingualReport(
            english=ReportSections(SECTIONS["en"].findings, SECTIONS["en"].impression),
            arabic=ReportSections(SECTIONS["ar"].findings, SECTIONS["ar"].impression),
            provenance=InferenceProvenance(backend="tiny", model_name="tiny-llava", model_revision="sha256:" + "1" * 64,
                                           prompt_template_id="v1", prompt_template_sha256="2" * 64, sampling={},
                                           image_sha256=[], prompt_tokens=1, completion_tokens=1, latency_s=0.1))
        draft_id = hashlib.sha256(f"{uid}|1|{cfg}".encode()).hexdigest()[:32]
        draft = build_draft(draft_id, _study_ref(s, study), report, manifest, cfg)
        s.add(DraftRecord(draft_id=draft_id, study_pk=study.id or 0, study_instance_uid=uid, version=1,
                          config_sha256=cfg, draft_json=draft.model_dump_json(), stage_times="{}"))
    return draft


def test_publish_writes_sr_pdf_kos_from_the_stored_header(engine: Engine, tmp_path: Path) -> None:
    ctx = _context(engine, tmp_path)
    draft = _drafted(ctx, CT_3SLICE)
    report_id = publish_stage(ctx, draft.draft_id)
    out = ctx.settings.data_dir / "drafts" / draft.study.study_instance_uid / "v1"
    for name in ("sr.dcm", "report.pdf", "report.pdf.dcm", "kos.dcm", "DiagnosticReport.json"):
        assert (out / name).is_file(), name
    source = pydicom.dcmread(CT_3SLICE[0], stop_before_pixels=True)
    kinds = {"sr.dcm": "1.2.840.10008.5.1.4.1.1.88.22", "report.pdf.dcm": "1.2.840.10008.5.1.4.1.1.104.1",
             "kos.dcm": "1.2.840.10008.5.1.4.1.1.88.59"}
    for name, sop_class in kinds.items():
        assert dciodvfy_errors(out / name) == [], name
        ds = pydicom.dcmread(out / name)
        assert ds.SOPClassUID == sop_class
        # patient/study attributes as the stored header has them (Study ID is not in the index)
        assert (ds.StudyInstanceUID, ds.PatientID, ds.StudyID, ds.AccessionNumber) == (
            source.StudyInstanceUID, source.PatientID, source.StudyID, source.AccessionNumber)
        assert ds.InstitutionName == "Research Hospital"
    # the key images the model saw are the PDF's thumbnails and the KOS's references
    kos = pydicom.dcmread(out / "kos.dcm")
    referenced = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert referenced == [uid for k in draft.key_images for uid in k.sop_instance_uids][: len(referenced)]
    assert letters(SECTIONS["ar"].impression) in letters(arabic_column_text(out / "report.pdf"))
    import subprocess

    images = subprocess.run(["pdfimages", "-list", str(out / "report.pdf")], check=True, capture_output=True,
                            text=True).stdout.splitlines()[2:]
    assert len(images) == len(draft.key_images)
    # the sender's copies in storage, the audit record, the draft marked published
    folder = ctx.storage.path(f"exports/{draft.study.study_instance_uid}/{draft.draft_id}")
    assert sorted(p.name for p in folder.iterdir()) == ["kos.dcm", "pdf.dcm", "sr.dcm"]
    assert (folder / "sr.dcm").read_bytes() == (out / "sr.dcm").read_bytes()
    with session_scope(engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == draft.draft_id)).one()
        assert rec.published_at is not None and rec.fhir_report_id == report_id
        audit = s.exec(select(AuditRecord).where(AuditRecord.action == "draft.dicom_objects")).one()
        assert set(json.loads(audit.details)["objects"]) == {"sr", "pdf", "kos"}
    # publishing again (a crash before the mark, the sweep's retry) rewrites the same bytes
    before = {n: (out / n).read_bytes() for n in ("sr.dcm", "report.pdf", "kos.dcm")}
    with session_scope(engine) as s:
        s.exec(update(DraftRecord).where(col(DraftRecord.draft_id) == draft.draft_id).values(published_at=None))
    assert publish_stage(ctx, draft.draft_id) == report_id
    assert {n: (out / n).read_bytes() for n in before} == before


def test_a_host_without_pango_publishes_the_sr_and_kos_and_says_why_there_is_no_pdf(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a fresh machine without Pango looks like to WeasyPrint: its import raises OSError.
    import sys
    import types

    broken = types.ModuleType("weasyprint")

    def _no_pango(name: str) -> object:
        raise OSError("cannot load library 'libpango-1.0-0': cannot open shared object file")

    broken.__getattr__ = _no_pango  # type: ignore[method-assign]  # `from weasyprint import HTML` fails
    monkeypatch.setitem(sys.modules, "weasyprint", broken)
    ctx = _context(engine, tmp_path)
    draft = _drafted(ctx, CT_3SLICE)
    report_id = publish_stage(ctx, draft.draft_id)
    out = ctx.settings.data_dir / "drafts" / draft.study.study_instance_uid / "v1"
    assert (out / "sr.dcm").is_file() and (out / "kos.dcm").is_file()
    assert not (out / "report.pdf").exists() and not (out / "report.pdf.dcm").exists()
    assert dciodvfy_errors(out / "sr.dcm") == []
    with session_scope(engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == draft.draft_id)).one()
        assert rec.published_at is not None and rec.fhir_report_id == report_id
        audit = json.loads(s.exec(select(AuditRecord).where(AuditRecord.action == "draft.dicom_objects")).one().details)
    assert set(audit["objects"]) == {"sr", "kos"}
    assert "libpango" in audit["skipped"]["pdf"] and "apt-get install libpango" in audit["skipped"]["pdf"]


@pytest.mark.parametrize(("name", "expected"), [
    ("pydicom_chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 13 / IR 87 (Japanese)
    ("pydicom_chrFrenMulti.dcm", "Buc^Jérôme"),  # ISO_IR 100
    ("pydicom_chrArab.dcm", "قباني^لنزار"),  # ISO_IR 127
])
def test_source_from_a_legacy_charset_header_becomes_utf8(engine: Engine, tmp_path: Path, name: str,
                                                          expected: str) -> None:
    ctx = _context(engine, tmp_path)
    path = DICOM / "charset" / name
    _ingest(ctx, [path])
    draft = draft_from_dicom([path])
    with session_scope(engine) as s:
        source = read_source(ctx.storage, s, draft)
    assert source.patient_name == expected
    from reporting.dicom import Equipment, build_draft_sr

    out = tmp_path / "sr.dcm"
    build_draft_sr(draft, source, Equipment(software_version="0")).save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []
    back = pydicom.dcmread(out)
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == expected
    assert expected.split("=")[0].split("^")[0].encode("utf-8") in out.read_bytes()


def test_source_falls_back_to_the_index_when_files_are_gone(engine: Engine, tmp_path: Path) -> None:
    ctx = _context(engine, tmp_path)
    _ingest(ctx, [CT_3SLICE[0]])
    draft = draft_from_dicom([CT_3SLICE[0]])
    shutil.rmtree(ctx.storage.path(draft.study.study_instance_uid))
    with session_scope(engine) as s:
        source = read_source(ctx.storage, s, draft)
    assert source.patient_id == draft.study.patient.patient_id and source.study_id == ""


def test_verified_sr_on_accept_and_edit_none_on_reject(engine: Engine, tmp_path: Path) -> None:
    ctx = _context(engine, tmp_path)
    draft = draft_from_dicom(CT_3SLICE)
    at = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    edit = Review(action="edit", reviewer_id="dr.amal", reviewer_display="Dr Amal Haddad", reviewed_at=at,
                  edits={"en": Sections(findings="Small effusion.", impression="Effusion.")})
    with session_scope(engine) as s:
        written = store_verified_sr(s, ctx.settings, draft, edit, report_version=2)
        assert store_verified_sr(s, ctx.settings, draft, Review(action="reject", reviewer_id="x", reviewed_at=at),
                                 report_version=3) is None
    assert written is not None and written.kind == "verified_sr"
    assert dciodvfy_errors(written.export_file) == []
    ds = pydicom.dcmread(ctx.storage.path(written.storage_key))
    assert ds.VerificationFlag == "VERIFIED"
    assert str(ds.VerifyingObserverSequence[0].VerifyingObserverName) == "Haddad^Amal^^Dr"
    assert ds.VerifyingObserverSequence[0].VerifyingOrganization == "Research Hospital"
    assert not (written.export_file.parent / "verified-sr-v3.dcm").exists()
