"""The model that drafted a report, as FHIR R4 Device (AI software; HL7 AI Transparency on FHIR)."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.device import Device

from reporting.draft import ModelProvenance
from reporting.fhir.ids import MODEL_REVISION_SYSTEM, SNOMED, device_id
from reporting.labels import security_labels, tags

SOFTWARE_TYPE = {"system": SNOMED, "code": "706689003", "display": "Application program software"}


def build_device(model: ModelProvenance) -> Device:
    """Device: name, manufacturer, version, checkpoint revision (identifier), backend (property)."""
    data: dict[str, Any] = {
        "resourceType": "Device",
        "id": device_id(model),
        "meta": {"security": security_labels(), "tag": tags()},
        "identifier": [{"system": MODEL_REVISION_SYSTEM, "value": model.model_revision}],
        "status": "active",
        "manufacturer": model.manufacturer,
        "deviceName": [{"name": model.model_name, "type": "model-name"}],
        "type": {"coding": [SOFTWARE_TYPE], "text": "AI model (multimodal large language model)"},
        "version": [{"type": {"text": "checkpoint revision"}, "value": model.model_revision}],
        "property": [
            {"type": {"text": "inference backend"}, "valueCode": [{"text": model.backend}]},
        ],
    }
    return Device.model_validate(data)
