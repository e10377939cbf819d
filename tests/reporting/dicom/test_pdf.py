"""The bilingual report PDF and its Encapsulated PDF wrapper, checked with poppler and dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from reporting.dicom import DicomObjectError, Equipment, SourceAttributes, object_uids
from reporting.dicom.pdf import build_encapsulated_pdf, render_report_pdf
from reporting.draft import Draft, Sections
from reporting.labels import DISCLAIMER
from tests.factories.drafts import CT_3SLICE, DICOM, draft_from_dicom, sample_draft
from tests.factories.key_images import with_key_image_pngs
from tests.reporting.dicom.checks import dciodvfy_errors, write_and_read
from tests.reporting.dicom.pdftext import arabic_column_text, letters, pdf_text

EQUIPMENT = Equipment(software_version="0.1.0")
SECTIONS = {
    "en": Sections(findings="The lungs are clear. No pleural effusion.\n\nA 5 mm nodule in the right upper "
                            "lobe (RUL) on slice 2.",
                   impression="No acute cardiopulmonary abnormality. Follow-up CT in 12 months is suggested."),
    "ar": Sections(findings="الرئتان سليمتان. لا يوجد انصباب جنبي.\n\nعقدة بحجم 5 مم في الفص العلوي الأيمن "
                            "(RUL) على الشريحة 2.",
                   impression="لا توجد تشوهات قلبية رئوية حادة. يُقترح متابعة بالتصوير المقطعي (CT) بعد 12 شهرًا."),
}


def _tool(name: str, *args: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} (Debian poppler-utils) is needed"
    return subprocess.run([exe, *args], check=True, capture_output=True, text=True, timeout=60).stdout


def _draft() -> tuple[Draft, dict[str, bytes]]:
    draft, pngs = with_key_image_pngs(sample_draft(), CT_3SLICE, ["Axial CT, slice 1", "Axial CT, slice 2"])
    return draft.model_copy(update={"sections": SECTIONS}), pngs


def _pages(path: Path) -> int:
    info = _tool("pdfinfo", str(path))
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


def test_bilingual_pdf_text_fonts_images_and_wrapper(tmp_path: Path) -> None:
    draft, pngs = _draft()
    source = SourceAttributes.from_study_ref(draft.study)
    pdf = render_report_pdf(draft, source, pngs)
    (tmp_path / "report.pdf").write_bytes(pdf)
    assert _pages(tmp_path / "report.pdf") == 1
    text = pdf_text(tmp_path / "report.pdf")
    assert "AI DRAFT - UNVERIFIED - RESEARCH ONLY" in text
    for english in ("The lungs are clear. No pleural effusion.", "A 5 mm nodule in the right upper lobe (RUL) on slice 2.",
                    "Axial CT, slice 1", "Axial CT, slice 2", source.patient_id, source.accession_number):
        assert english in text
    assert letters(DISCLAIMER["en"]) in letters(text)
    # Arabic in logical order, digits and Latin abbreviations in place, lam-alef ligature intact
    arabic = letters(arabic_column_text(tmp_path / "report.pdf"))
    for part in (SECTIONS["ar"].findings, SECTIONS["ar"].impression, DISCLAIMER["ar"]):
        assert letters(part) in arabic
    assert "لا" in arabic_column_text(tmp_path / "report.pdf")
    # fonts embedded (Noto Sans for English, Amiri for Arabic); one picture per key image
    fonts = _tool("pdffonts", str(tmp_path / "report.pdf"))
    assert "Amiri" in fonts and "Noto-Sans" in fonts
    assert all(line.split()[-5] == "yes" for line in fonts.splitlines()[2:])  # emb column
    images = _tool("pdfimages", "-list", str(tmp_path / "report.pdf")).splitlines()[2:]
    assert len(images) == len(draft.key_images)
    # wrapped as Encapsulated PDF in the study
    ds = write_and_read(build_encapsulated_pdf(draft, source, EQUIPMENT, pdf), tmp_path / "pdf.dcm")
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.StudyInstanceUID == draft.study.study_instance_uid
    assert ds.SOPInstanceUID == object_uids(draft, "pdf").sop_instance_uid
    assert "research only" in ds.SeriesDescription.lower() and ds.VerificationFlag == "UNVERIFIED"
    assert {s.ReferencedSOPInstanceUID for s in ds.SourceInstanceSequence} == {
        k.sop_instance_uids[0] for k in draft.key_images}


def test_pdf_is_the_same_when_built_again() -> None:
    draft, pngs = _draft()
    source = SourceAttributes.from_study_ref(draft.study)
    assert render_report_pdf(draft, source, pngs) == render_report_pdf(draft, source, pngs)


def test_empty_sections_and_missing_images_are_shown_as_such(tmp_path: Path) -> None:
    draft, _ = _draft()
    draft = draft.model_copy(update={"sections": {"en": Sections(findings="", impression=" "), "ar": SECTIONS["ar"]}})
    pdf = render_report_pdf(draft, SourceAttributes.from_study_ref(draft.study), {})
    (tmp_path / "r.pdf").write_bytes(pdf)
    text = pdf_text(tmp_path / "r.pdf")
    assert text.count("(no text)") == 2
    assert text.count("image not available") == len(draft.key_images)


def test_no_key_images(tmp_path: Path) -> None:
    draft, _ = _draft()
    draft = draft.model_copy(update={"key_images": ()})
    source = SourceAttributes.from_study_ref(draft.study)
    pdf = render_report_pdf(draft, source, {})
    (tmp_path / "r.pdf").write_bytes(pdf)
    assert "No key images were recorded" in pdf_text(tmp_path / "r.pdf")
    ds = write_and_read(build_encapsulated_pdf(draft, source, EQUIPMENT, pdf), tmp_path / "pdf.dcm")
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []
    assert "SourceInstanceSequence" not in ds


def test_very_long_text_flows_onto_more_pages(tmp_path: Path) -> None:
    draft, pngs = _draft()
    long_en = " ".join(f"Sentence {i} describes a finding in detail." for i in range(400))
    long_ar = " ".join(f"الجملة {i} تصف نتيجة بالتفصيل." for i in range(400))
    draft = draft.model_copy(update={"sections": {"en": Sections(findings=long_en, impression="Stable."),
                                                  "ar": Sections(findings=long_ar, impression="مستقر.")}})
    source = SourceAttributes.from_study_ref(draft.study)
    pdf = render_report_pdf(draft, source, pngs)
    (tmp_path / "r.pdf").write_bytes(pdf)
    assert _pages(tmp_path / "r.pdf") > 1
    footer = ("Taqrir - AI draft, unverified, research only - not for clinical use", "/")
    # the English column's lines, in order across pages (the footer and the Arabic column left out)
    lines = [ln for ln in pdf_text(tmp_path / "r.pdf").splitlines() if not ln.strip().startswith(footer[0])
             and not (footer[1] in ln and ln.replace("/", "").strip().isdigit())
             and not any("\u0600" <= ch <= "\u06ff" for ch in ln)]
    text = letters("\n".join(lines))
    positions = [text.find(letters(f"Sentence {i} describes a finding in detail.")) for i in range(400)]
    assert -1 not in positions and positions == sorted(positions)
    write_and_read(build_encapsulated_pdf(draft, source, EQUIPMENT, pdf), tmp_path / "pdf.dcm")
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []


@pytest.mark.parametrize(("name", "expected"), [
    ("pydicom_chrFrenMulti.dcm", "Buc, Jérôme"),  # ISO_IR 100
    ("pydicom_chrGreek.dcm", "Διονυσιος"),  # ISO_IR 126
    ("pydicom_chrArab.dcm", "قباني"),  # ISO_IR 127
])
def test_legacy_charset_patient_name_in_header(tmp_path: Path, name: str, expected: str) -> None:
    path = DICOM / "charset" / name
    draft = draft_from_dicom([path]).model_copy(update={"sections": SECTIONS})
    source = SourceAttributes.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
    pdf = render_report_pdf(draft, source, {})
    (tmp_path / "r.pdf").write_bytes(pdf)
    assert expected in pdf_text(tmp_path / "r.pdf")
    ds = write_and_read(build_encapsulated_pdf(draft, source, EQUIPMENT, pdf), tmp_path / "pdf.dcm")
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_not_a_pdf_is_refused() -> None:
    draft, _ = _draft()
    with pytest.raises(DicomObjectError, match="not a PDF"):
        build_encapsulated_pdf(draft, SourceAttributes.from_study_ref(draft.study), EQUIPMENT, b"<html>")
