"""Logical ids and identifier systems of the resources Taqrir builds.

Ids are derived from stable inputs (hashes), so that re-building the same draft gives the same
ids: publishing is idempotent and the same patient/study/model map to one resource each. FHIR ids
are ``[A-Za-z0-9\\-\\.]{1,64}`` (R4 datatypes, id).
"""

from __future__ import annotations

import hashlib
from typing import Final

from reporting.draft import Draft, ModelProvenance, PatientRef
from reporting.labels import TAQRIR_URN

DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
"""R4 ImagingStudy identifier system for DICOM UIDs (value ``urn:oid:<uid>``)."""
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
LOINC: Final = "http://loinc.org"
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
SNOMED: Final = "http://snomed.info/sct"

DRAFT_SYSTEM: Final = f"{TAQRIR_URN}draft"
STUDY_VERSION_SYSTEM: Final = f"{TAQRIR_URN}study-version"
MODEL_REVISION_SYSTEM: Final = f"{TAQRIR_URN}model-revision"
PROMPT_TEMPLATE_SYSTEM: Final = f"{TAQRIR_URN}prompt-template"
PATIENT_ISSUER_PREFIX: Final = f"{TAQRIR_URN}patient-id-issuer:"
ACCESSION_ISSUER_PREFIX: Final = f"{TAQRIR_URN}accession-issuer:"
USER_SYSTEM: Final = f"{TAQRIR_URN}user"


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:40]


def report_id(draft: Draft) -> str:
    """DiagnosticReport id: one per draft (the draft id is already stable per study version)."""
    return "dr-" + _digest("report", draft.draft_id)


def provenance_id(draft: Draft) -> str:
    """Provenance id of the machine drafting of ``draft``."""
    return "prov-" + _digest("provenance", draft.draft_id)


def review_provenance_id(report: str, version: int) -> str:
    """Provenance id of the review that made ``version`` of report ``report``."""
    return "prov-" + _digest("review", report, str(version))


def patient_id(patient: PatientRef) -> str:
    """Patient id: one per (issuer, Patient ID) pair (PS3.3 C.7.1.1, Issuer of Patient ID)."""
    return "pat-" + _digest("patient", patient.issuer or "", patient.patient_id)


def study_id(study_instance_uid: str) -> str:
    """ImagingStudy id: one per Study Instance UID; study versions are resource versions."""
    return "is-" + _digest("study", study_instance_uid)


def device_id(model: ModelProvenance) -> str:
    """Device id: one per model name and checkpoint revision."""
    return "dev-" + _digest("device", model.model_name, model.model_revision)


def issuer_system(issuer: str | None, prefix: str) -> str:
    """An identifier system for a DICOM issuer: the issuer itself when it is already a URI."""
    if issuer and (issuer.startswith(("urn:", "http://", "https://"))):
        return issuer
    if issuer:
        safe = "".join(ch if ch.isalnum() or ch in "-._~" else "_" for ch in issuer)
        return prefix + safe
    return prefix.rstrip(":")


def uid_urn(uid: str) -> str:
    """A DICOM UID as the R4 ``urn:oid:`` value."""
    return f"urn:oid:{uid}"
