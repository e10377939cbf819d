"""Every resource of one draft, built together."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, tzinfo

from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance

from reporting.draft import Draft
from reporting.fhir.device import build_device
from reporting.fhir.diagnostic_report import build_diagnostic_report
from reporting.fhir.imaging_study import build_imaging_study
from reporting.fhir.patient import build_patient
from reporting.fhir.provenance import build_provenance


@dataclass(frozen=True)
class DraftResources:
    """The resources that publish one draft."""

    patient: Patient
    imaging_study: ImagingStudy
    device: Device
    report: DiagnosticReport
    provenance: Provenance


def build_resources(draft: Draft, *, study_timezone: tzinfo = UTC) -> DraftResources:
    """Patient, ImagingStudy, Device, DiagnosticReport (``partial``) and Provenance of ``draft``."""
    return DraftResources(
        patient=build_patient(draft.study.patient),
        imaging_study=build_imaging_study(draft.study, study_timezone=study_timezone),
        device=build_device(draft.model),
        report=build_diagnostic_report(draft, study_timezone=study_timezone),
        provenance=build_provenance(draft),
    )
