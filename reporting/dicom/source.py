"""The source study's patient and study attributes, as every object Taqrir writes repeats them.

An object added to a study must carry the study's Patient and General Study module values
(PS3.3 C.7.1.1, C.7.2.1, C.7.2.2) exactly as the PACS has them, or the PACS files it under another
patient or study. :class:`SourceAttributes` is that set, already decoded to text: a header in
any Specific Character Set (ISO_IR 100 Latin-1, ISO_IR 127 Arabic, ISO 2022 IR 87 Japanese with
code extensions, ...) is decoded by pydicom (PS3.5 6.1) when it is read, and the objects are
written in ``ISO_IR 192`` (UTF-8), which holds every script, the Arabic report text included.

:meth:`SourceAttributes.from_dataset` is pure (a dataset in); reading the dataset from storage is
the caller's business (``workers.dicom_objects.read_source``). Values that are malformed in the
source (a date that is not ``YYYYMMDD``, a sex outside M/F/O) are dropped rather than copied, so
that the new object stays valid; identifiers are copied verbatim.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from reporting.draft import StudyRef

_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_UI = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SourceAttributes(BaseModel):
    """Patient and study attributes of the source study, decoded (any script) and validated.

    Text fields hold DICOM-formatted values: ``patient_name`` is a PN string (``Family^Given``,
    component groups ``=``-separated), dates ``YYYYMMDD``, times ``HHMMSS[.ffffff]``, the age an
    AS value (``045Y``). Empty string means "present but empty" (a Type 2 attribute).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_instance_uid: str = Field(pattern=_UI.pattern, max_length=64)
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    study_description: str = ""
    source_character_set: tuple[str, ...] = Field(
        default=(), description="The source's Specific Character Set, for the record (the text is decoded)."
    )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SourceAttributes:
        """The attributes of any instance of the study (its header is enough)."""
        uid = _text(ds.get("StudyInstanceUID"))
        if not uid or not _UI.match(uid):
            raise ValueError("the source instance has no valid Study Instance UID (0020,000D)")
        charset = ds.get("SpecificCharacterSet")
        charsets = tuple(str(c) for c in charset) if isinstance(charset, (list, tuple)) or (
            charset is not None and type(charset).__name__ == "MultiValue") else ((str(charset),) if charset else ())
        return cls(
            study_instance_uid=uid,
            patient_id=_text(ds.get("PatientID"))[:64],
            issuer_of_patient_id=_text(ds.get("IssuerOfPatientID"))[:64],
            patient_name=_person(ds.get("PatientName")),
            patient_birth_date=_date(_text(ds.get("PatientBirthDate"))),
            patient_sex=_sex(_text(ds.get("PatientSex"))),
            patient_age=_valid(_AS, _text(ds.get("PatientAge"))),
            study_date=_date(_text(ds.get("StudyDate"))),
            study_time=_valid(_TM, _text(ds.get("StudyTime")).replace(":", "")),
            study_id=_text(ds.get("StudyID"))[:16],
            accession_number=_text(ds.get("AccessionNumber"))[:16],
            referring_physician_name=_person(ds.get("ReferringPhysicianName")),
            study_description=_text(ds.get("StudyDescription"))[:64],
            source_character_set=charsets,
        )

    @classmethod
    def from_study_ref(cls, study: StudyRef) -> SourceAttributes:
        """The same attributes from the draft's own study reference (the index's copy).

        For tests and for a study whose files are gone; the index keeps neither Study ID nor the
        referring physician, so those stay empty.
        """
        started: datetime | None = study.started
        patient = study.patient
        birth: date | None = patient.birth_date
        return cls(
            study_instance_uid=study.study_instance_uid,
            patient_id=patient.patient_id[:64],
            issuer_of_patient_id=(patient.issuer or "")[:64],
            patient_name=patient.name or "",
            patient_birth_date=birth.strftime("%Y%m%d") if birth else "",
            patient_sex=patient.sex or "",
            patient_age=_valid(_AS, patient.age or ""),
            study_date=started.strftime("%Y%m%d") if started else "",
            study_time=started.strftime("%H%M%S") if started else "",
            accession_number=(study.accession_number or "")[:16],
            study_description=(study.description or "")[:64],
        )

    def apply(self, ds: Dataset) -> None:
        """Write the Patient, General Study and Patient Study module values into ``ds``."""
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        if self.issuer_of_patient_id:
            ds.IssuerOfPatientID = self.issuer_of_patient_id
        ds.PatientBirthDate = self.patient_birth_date
        ds.PatientSex = self.patient_sex
        ds.StudyInstanceUID = self.study_instance_uid
        ds.StudyDate = self.study_date
        ds.StudyTime = self.study_time
        ds.ReferringPhysicianName = self.referring_physician_name
        ds.StudyID = self.study_id
        ds.AccessionNumber = self.accession_number
        if self.study_description:
            ds.StudyDescription = self.study_description
        if self.patient_age:
            ds.PatientAge = self.patient_age


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip().strip("\x00").strip()


def _person(value: Any) -> str:
    """A PN value as text, every component group kept (``Yamada^Tarou=山田^太郎=やまだ^たろう``)."""
    if value is None:
        return ""
    if isinstance(value, PersonName):
        groups = [value.alphabetic, value.ideographic, value.phonetic]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    return _text(value)


def _valid(pattern: re.Pattern[str], value: str) -> str:
    return value if pattern.match(value) else ""


def _date(value: str) -> str:
    """A DA value; the ACR-NEMA form ``YYYY.MM.DD`` (PS3.5 6.2, still found in old files) becomes
    ``YYYYMMDD``; anything else invalid is dropped."""
    return _valid(_DA, value.replace(".", "") if len(value) == 10 else value)


def _sex(value: str) -> str:
    value = value.upper()
    return value if value in ("M", "F", "O") else ""
