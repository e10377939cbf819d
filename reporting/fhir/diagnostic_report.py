"""The draft as FHIR R4 DiagnosticReport (R4 diagnosticreport.html).

Machine drafts are ``partial`` ("incomplete or unverified"), never ``final``: only a clinician's
review (:mod:`reporting.fhir.review`) makes a new version ``final``. The English impression is
``conclusion``; the Arabic one rides on ``_conclusion`` as the standard translation extension
(http://hl7.org/fhir/StructureDefinition/translation, sub-extensions ``lang`` and ``content``).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, tzinfo
from typing import Any, Final, Literal

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from reporting.consistency import check_sections
from reporting.draft import Draft, Language, Sections
from reporting.fhir.consistency import consistency_extension
from reporting.fhir.ids import (
    DICOM_UID_SYSTEM,
    DRAFT_SYSTEM,
    LOINC,
    STUDY_VERSION_SYSTEM,
    V2_0074,
    patient_id,
    report_id,
    study_id,
    uid_urn,
)
from reporting.fhir.imaging_study import accession_identifier
from reporting.fhir.timing import instant, study_datetime
from reporting.labels import SECTION_TITLES, security_labels, tags
from reporting.report_text import ReviewNote, narrative_div, render_html, render_plain

TRANSLATION_URL: Final = "http://hl7.org/fhir/StructureDefinition/translation"
CATEGORY_RAD: Final = {"system": V2_0074, "code": "RAD", "display": "Radiology"}
CATEGORY_LOINC: Final = {"system": LOINC, "code": "LP29684-5", "display": "Radiology"}
CODE_IMAGING: Final = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}

ReportStatus = Literal["partial", "final", "cancelled"]


def attachment(data: bytes, *, content_type: str, language: Language, title: str, creation: str) -> dict[str, Any]:
    """An R4 Attachment with size and base64 SHA-1 hash of the bytes (R4 datatypes, Attachment)."""
    return {
        "contentType": content_type,
        "language": language,
        "data": base64.b64encode(data).decode("ascii"),
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode("ascii"),
        "title": title,
        "creation": creation,
    }


def presented_forms(sections: dict[Language, Sections], creation: str, review: ReviewNote | None = None) -> list[dict[str, Any]]:
    """HTML and plain text per language (en first, then ar)."""
    forms = []
    for lang in ("en", "ar"):
        if lang not in sections:
            continue
        title = SECTION_TITLES[lang]["report"]
        forms.append(attachment(render_html(sections[lang], lang, review), content_type="text/html; charset=utf-8",
                                language=lang, title=title, creation=creation))
        forms.append(attachment(render_plain(sections[lang], lang, review), content_type="text/plain; charset=utf-8",
                                language=lang, title=title, creation=creation))
    return forms


def report_data(
    draft: Draft,
    *,
    sections: dict[Language, Sections],
    status: ReportStatus,
    issued: datetime,
    study_timezone: tzinfo,
    review: ReviewNote | None = None,
    results_interpreter: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The DiagnosticReport as JSON, shared by the machine draft and its reviewed versions."""
    study = draft.study
    identifiers: list[dict[str, Any]] = [
        {"use": "usual", "system": DRAFT_SYSTEM, "value": draft.draft_id},
        {"use": "secondary", "system": DICOM_UID_SYSTEM, "value": uid_urn(study.study_instance_uid)},
        {"use": "secondary", "system": STUDY_VERSION_SYSTEM, "value": f"{study.study_instance_uid}#{study.version}"},
    ]
    acc = accession_identifier(study)
    if acc:
        identifiers.append(acc)
    issued_s = instant(issued)
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(draft),
        "meta": {"security": security_labels(), "tag": tags()},
        "language": "en",
        "text": {"status": "generated", "div": narrative_div(sections, review)},
        "identifier": identifiers,
        "status": status,
        "category": [{"coding": [CATEGORY_RAD, CATEGORY_LOINC]}],
        "code": {"coding": [CODE_IMAGING], "text": "Diagnostic imaging study"},
        "subject": {"reference": f"Patient/{patient_id(study.patient)}"},
        "issued": issued_s,
        "imagingStudy": [{"reference": f"ImagingStudy/{study_id(study.study_instance_uid)}"}],
        "presentedForm": presented_forms(sections, issued_s, review),
    }
    effective = study_datetime(study.started, study_timezone)
    if effective:
        data["effectiveDateTime"] = effective
    if results_interpreter:
        data["resultsInterpreter"] = results_interpreter
    if "en" in sections and "ar" in sections:
        # each version says whether its own two languages agree (a reviewed edit is checked too)
        data["extension"] = [consistency_extension(check_sections(sections))]
    if "en" in sections:
        data["conclusion"] = sections["en"].impression
        if "ar" in sections:
            data["_conclusion"] = {
                "extension": [{
                    "url": TRANSLATION_URL,
                    "extension": [
                        {"url": "lang", "valueCode": "ar"},
                        {"url": "content", "valueString": sections["ar"].impression},
                    ],
                }]
            }
    elif "ar" in sections:
        data["conclusion"] = sections["ar"].impression
        data["language"] = "ar"
    return data


def build_diagnostic_report(draft: Draft, *, study_timezone: tzinfo = UTC) -> DiagnosticReport:
    """The machine draft: status ``partial``, issued when drafting finished."""
    return DiagnosticReport.model_validate(
        report_data(draft, sections=dict(draft.sections), status="partial", issued=draft.created_at,
                    study_timezone=study_timezone)
    )
