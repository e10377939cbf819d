"""The study version a draft was made from, as FHIR R4 ImagingStudy (R4 imagingstudy.html)."""

from __future__ import annotations

from datetime import UTC, tzinfo
from typing import Any

from fhir.resources.R4B.imagingstudy import ImagingStudy

from reporting.draft import StudyRef
from reporting.fhir.ids import (
    ACCESSION_ISSUER_PREFIX,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    V2_0203,
    issuer_system,
    patient_id,
    study_id,
    uid_urn,
)
from reporting.fhir.timing import study_datetime
from reporting.labels import security_labels, tags


def accession_identifier(study: StudyRef) -> dict[str, Any] | None:
    """The accession number as an identifier of type ACSN (v2-0203), or None when absent."""
    if not study.accession_number:
        return None
    ident: dict[str, Any] = {
        "type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
        "system": issuer_system(study.accession_issuer, ACCESSION_ISSUER_PREFIX),
        "value": study.accession_number,
    }
    if study.accession_issuer:
        ident["assigner"] = {"display": study.accession_issuer}
    return ident


def study_uid_identifier(study: StudyRef) -> dict[str, Any]:
    """Study Instance UID as ``urn:dicom:uid`` / ``urn:oid:<uid>`` (R4 ImagingStudy.identifier)."""
    return {"use": "official", "system": DICOM_UID_SYSTEM, "value": uid_urn(study.study_instance_uid)}


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def build_imaging_study(study: StudyRef, *, study_timezone: tzinfo = UTC) -> ImagingStudy:
    """ImagingStudy with series, counts and modalities; ``study_timezone`` reads the naive DICOM
    Study Date/Time (FHIR dateTime with a time needs an offset)."""
    identifiers = [study_uid_identifier(study)]
    acc = accession_identifier(study)
    if acc:
        identifiers.append(acc)
    modalities = list(dict.fromkeys([*study.modalities, *(s.modality for s in study.series if s.modality)]))
    data: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_id(study.study_instance_uid),
        "meta": {"security": security_labels(), "tag": tags()},
        "identifier": identifiers,
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id(study.patient)}"},
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(s.instance_count for s in study.series),
    }
    if modalities:
        data["modality"] = [_modality(m) for m in modalities]
    started = study_datetime(study.started, study_timezone)
    if started:
        data["started"] = started
    if study.description:
        data["description"] = study.description
    series = []
    for s in study.series:
        entry: dict[str, Any] = {
            "uid": s.series_instance_uid,
            "modality": _modality(s.modality or "OT"),
            "numberOfInstances": s.instance_count,
        }
        if s.number is not None and s.number >= 0:
            entry["number"] = s.number
        if s.description:
            entry["description"] = s.description
        if s.body_part:
            entry["bodySite"] = {"display": s.body_part}
        series.append(entry)
    if series:
        data["series"] = series
    return ImagingStudy.model_validate(data)
