"""The ``Draft``: one machine-made bilingual report of one version of one study.

This is the contract between the pipeline (which fills it from the study index, the rendered key
images and the inference result) and the builders in ``reporting`` (which turn it into FHIR
resources and DICOM objects without any I/O). It holds what those builders need and nothing more.
A draft is never a signed report: see :mod:`reporting.labels`.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Language = Literal["en", "ar"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Sections(_Frozen):
    """The sections of a report in one language."""

    findings: str
    impression: str


class PatientRef(_Frozen):
    """Patient as the DICOM headers describe it (PS3.3 C.7.1.1)."""

    patient_id: str
    issuer: str | None = None
    name: str | None = None
    sex: Literal["M", "F", "O"] | None = None
    birth_date: date | None = None
    age: str | None = Field(None, description="DICOM AS value, e.g. '045Y'.")


class SeriesRef(_Frozen):
    """A series of the study (for ImagingStudy.series)."""

    series_instance_uid: str
    modality: str | None = None
    body_part: str | None = None
    description: str | None = None
    number: int | None = None
    instance_count: int = 0
    sop_class_uids: tuple[str, ...] = ()


class StudyRef(_Frozen):
    """The study version the draft was made from."""

    study_instance_uid: str
    version: int = Field(ge=1)
    accession_number: str | None = None
    accession_issuer: str | None = None
    started: datetime | None = Field(None, description="Study Date + Study Time, naive local time as DICOM has it.")
    description: str | None = None
    modalities: tuple[str, ...] = ()
    patient: PatientRef
    series: tuple[SeriesRef, ...] = ()


class KeyImageRef(_Frozen):
    """One image the model saw, and where its pixels came from."""

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str | None = None
    frames: tuple[int, ...] = ()
    label: str = ""
    sha256: str = Field(description="SHA-256 of the PNG bytes given to the model.")
    window: str | None = None


class ModelProvenance(_Frozen):
    """Exactly how the text was made (recorded in the audit trail and the FHIR Provenance/Device)."""

    backend: str
    model_name: str
    model_revision: str = Field(description="Checkpoint content hash or server-reported revision.")
    manufacturer: str = "MBZUAI"
    prompt_template_id: str
    prompt_template_sha256: str
    sampling: dict[str, float | int | str | None] = Field(default_factory=dict)
    image_sha256: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


class Draft(_Frozen):
    """A machine-made bilingual draft. Immutable: a clinician's review is stored beside it."""

    draft_id: str = Field(description="Stable id: derived from study UID, version and pipeline config.")
    study: StudyRef
    sections: dict[Language, Sections]
    key_images: tuple[KeyImageRef, ...]
    model: ModelProvenance
    created_at: datetime = Field(description="When drafting finished (aware UTC).")
    pipeline_config_sha256: str = ""
