"""Small DICOM objects to send back to a PACS in the outbox tests: an Encapsulated PDF and a Basic
Text SR in the same study as a source instance, written as Part 10 files.

They stand in for the draft's objects where a test is about delivery rather than about what the
objects say (the builders in ``reporting/dicom`` have their own tests, and the end-to-end test
sends theirs).
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from integrations.dicom.destinations import ObjectKind
from integrations.dicom.outbox import OutboxObject

PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
BASIC_TEXT_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"


def minimal_pdf(text: str = "Taqrir test") -> bytes:
    """A one-page PDF with ``text`` (ASCII), built by hand with a correct cross-reference table."""
    content = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
         b"/Resources << /Font << /F1 5 0 R >> >> >>"),
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _base(source: Dataset, sop_class: str, modality: str, series_number: int) -> Dataset:
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, kw, getattr(source, kw, ""))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = "Taqrir tests"
    ds.ContentDate = "20261205"
    ds.ContentTime = "080000"
    ds.SeriesDescription = "AI draft, unverified, research only (test object)"
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def pdf_object(source: Path, out: Path, *, pdf: bytes | None = None) -> OutboxObject:
    """An Encapsulated PDF in ``source``'s study, written to ``out``."""
    src = dcmread(source, stop_before_pixels=True)
    ds = _base(src, PDF_CLASS, "DOC", 9901)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Taqrir draft (test)"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    body = pdf or minimal_pdf()
    ds.EncapsulatedDocument = body + (b"\0" if len(body) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(body)
    ds.AcquisitionDateTime = "20261205080000"
    _write(ds, out)
    return OutboxObject(kind=ObjectKind.pdf, sop_class_uid=PDF_CLASS, sop_instance_uid=ds.SOPInstanceUID,
                        location=str(out))


def sr_object(source: Path, out: Path, *, text: str = "Findings: none. النتائج: لا شيء.") -> OutboxObject:
    """A Basic Text SR in ``source``'s study with one TEXT item, written to ``out``."""
    src = dcmread(source, stop_before_pixels=True)
    ds = _base(src, BASIC_TEXT_SR_CLASS, "SR", 9902)
    ds.ValueType = "CONTAINER"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [name]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [concept]
    item.TextValue = text
    ds.ContentSequence = [item]
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    _write(ds, out)
    return OutboxObject(kind=ObjectKind.sr, sop_class_uid=BASIC_TEXT_SR_CLASS, sop_instance_uid=ds.SOPInstanceUID,
                        location=str(out))
