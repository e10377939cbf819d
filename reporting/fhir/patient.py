"""Patient from the DICOM patient module (PS3.3 C.7.1.1) to FHIR R4 Patient."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.patient import Patient

from reporting.draft import PatientRef
from reporting.fhir.ids import PATIENT_ISSUER_PREFIX, V2_0203, issuer_system, patient_id
from reporting.labels import security_labels, tags

_GENDER = {"M": "male", "F": "female", "O": "other"}


def human_name(pn: str) -> dict[str, Any]:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``, PS3.5 6.2.1) as a FHIR HumanName.

    Only the alphabetic component group (before the first ``=``) is used.
    """
    alpha = pn.split("=", 1)[0]
    comps = (alpha.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (c.strip() for c in comps)
    name: dict[str, Any] = {"use": "official", "text": " ".join(p for p in (prefix, given, middle, family, suffix) if p)}
    if family:
        name["family"] = family
    givens = [g for g in (given, middle) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def build_patient(patient: PatientRef) -> Patient:
    """The Patient: identifier (Patient ID + issuer), name, sex, birth date. A study sent without
    a Patient ID (Type 2, may be empty) gets a Patient of its own with no identifier."""
    identifier: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
        "system": issuer_system(patient.issuer, PATIENT_ISSUER_PREFIX),
        "value": patient.patient_id,
    }
    if patient.issuer and patient.patient_id:
        identifier["assigner"] = {"display": patient.issuer}
    data: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id(patient),
        "meta": {"security": security_labels(), "tag": tags()},
    }
    if patient.patient_id:
        data["identifier"] = [identifier]
    if patient.name and patient.name.split("=", 1)[0].strip("^ "):
        data["name"] = [human_name(patient.name)]
    if patient.sex:
        data["gender"] = _GENDER[patient.sex]
    if patient.birth_date:
        data["birthDate"] = patient.birth_date.isoformat()
    return Patient.model_validate(data)
