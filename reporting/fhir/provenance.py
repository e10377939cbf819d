"""Provenance of a draft (R4 provenance.html; HL7 AI Transparency on FHIR).

Target the report version, agent the model's Device, entities the key images (SOP Instance UIDs)
and the prompt template with role ``derivation``, the study with role ``source``, reason AIAST.
"""

from __future__ import annotations

from typing import Any, Final

from fhir.resources.R4B.provenance import Provenance

from reporting.draft import Draft
from reporting.fhir.ids import (
    DICOM_UID_SYSTEM,
    PROMPT_TEMPLATE_SYSTEM,
    device_id,
    provenance_id,
    report_id,
    study_id,
    uid_urn,
)
from reporting.fhir.timing import instant
from reporting.labels import AI_ASSERTED, security_labels, tags

PARTICIPANT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION: Final = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"


def build_provenance(draft: Draft, *, report_version: int = 1) -> Provenance:
    """Provenance of the machine draft; ``recorded`` equals the report's ``issued``."""
    entities: list[dict[str, Any]] = [
        {"role": "source", "what": {"reference": f"ImagingStudy/{study_id(draft.study.study_instance_uid)}",
                                     "display": f"study version {draft.study.version}"}},
    ]
    for key in draft.key_images:
        for sop_uid in key.sop_instance_uids:
            display = f"key image {key.label}".strip() + f" (png sha256 {key.sha256})"
            entities.append({
                "role": "derivation",
                "what": {"identifier": {"system": DICOM_UID_SYSTEM, "value": uid_urn(sop_uid)}, "display": display},
            })
    m = draft.model
    entities.append({
        "role": "derivation",
        "what": {"identifier": {"system": PROMPT_TEMPLATE_SYSTEM, "value": m.prompt_template_id},
                 "display": f"prompt template {m.prompt_template_id} (sha256 {m.prompt_template_sha256})"},
    })
    rid = report_id(draft)
    data: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": provenance_id(draft),
        "meta": {"security": security_labels(), "tag": tags()},
        "target": [{"reference": f"DiagnosticReport/{rid}/_history/{report_version}"}],
        "occurredDateTime": instant(draft.created_at),
        "recorded": instant(draft.created_at),
        "reason": [{"coding": [dict(AI_ASSERTED)]}],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "agent": [{
            "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
            "who": {"reference": f"Device/{device_id(m)}", "display": f"{m.model_name} {m.model_revision}"},
        }],
        "entity": entities,
    }
    return Provenance.model_validate(data)
