"""A radiologist's signed report as a reporting system sends it: Enhanced SR, TID 2000-style
tree (18748-4 / 121070 Findings / 121072 Impressions), English and Arabic sections marked with
121049 "Language of Content Item and Descendants", VERIFIED and COMPLETE (built with pydicom)."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _text(concept: Dataset, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def _language(code: str | None) -> list[Dataset]:
    if code is None:
        return []
    item = Dataset()
    item.RelationshipType, item.ValueType = "HAS CONCEPT MOD", "CODE"
    item.ConceptNameCodeSequence = Sequence([_code("121049", "DCM", "Language of Content Item and Descendants")])
    item.ConceptCodeSequence = Sequence([_code(code, "RFC5646", code)])
    return [item]


def _container(concept: Dataset, children: list[Dataset]) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType, item.ContinuityOfContent = "CONTAINS", "CONTAINER", "SEPARATE"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.ContentSequence = Sequence(children)
    return item


def signed_sr(out: Path, *, study_uid: str, accession: str, verified: bool = True, complete: bool = True,
              sections: dict[str, tuple[str, str]] | None = None, tag_languages: bool = True,
              predecessor: bool = False) -> Path:
    """Write the SR; ``sections`` maps language -> (findings, impression)."""
    sections = sections or {
        "en": ("The lungs are clear. Small left pleural effusion.", "Small left pleural effusion."),
        "ar": ("الرئتان سليمتان. انصباب جنبي أيسر صغير.", "انصباب جنبي أيسر صغير."),
    }
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_SR, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 900, 1
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "P1", "Doe^Jane", accession
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20261201", "080000", "20261201", "090000"
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.ReferencedPerformedProcedureStepSequence = Sequence([])
    ds.PerformedProcedureCodeSequence = Sequence([])
    ds.Manufacturer = "Reporting System"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.CompletionFlag = "COMPLETE" if complete else "PARTIAL"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        obs = Dataset()
        obs.VerifyingObserverName = "Radiologist^Amal"
        obs.VerifyingOrganization = "Hospital"
        obs.VerificationDateTime = "20261201090000+0300"
        obs.VerifyingObserverIdentificationCodeSequence = Sequence([_code("D1234", "99HOSP", "Dr Amal Radiologist")])
        ds.VerifyingObserverSequence = Sequence([obs])
    if predecessor:
        ref = Dataset()
        ref.StudyInstanceUID = study_uid
        ds.PredecessorDocumentsSequence = Sequence([ref])
    children: list[Dataset] = []
    for lang, (findings, impression) in sections.items():
        body = [_container(_code("121070", "DCM", "Findings"), [_text(_code("121071", "DCM", "Finding"), findings)]),
                _container(_code("121072", "DCM", "Impressions"),
                           [_text(_code("121073", "DCM", "Impression"), impression)])]
        # one section container per language, its language set by 121049 (TID 1204)
        children.append(_container(_code("121064", "DCM", "Current Procedure Descriptions"),
                                   _language(lang if tag_languages else None) + body))
    ds.ContentSequence = Sequence(children)
    path = out / f"sr-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
