"""A newer study version's draft supersedes the older draft (issue 11, item 10).

How an integrator sees it, and why this way:

* The older DiagnosticReport gets a new *resource version* (as any FHIR server shows a change to
  a report: ``_history`` keeps the machine version unchanged) whose ``status`` is ``cancelled``.
  R4 DiagnosticReport.status offers no "superseded"; of its codes, ``cancelled`` ("the report is
  unavailable because the measurement was not started or not completed") fits a draft that will
  never be completed because a newer draft of the same study replaced it. ``entered-in-error``
  does not fit: it says the record "should never have existed" and is meant for withdrawing a
  report after a *final* release, while the older draft was a correct draft of the data it saw.
  ``cancelled`` also makes the replacement searchable: ``status=partial`` finds only current drafts.
* An explicit link both ways. R4 has no DiagnosticReport element for "replaced by" (the core
  ``replaces`` extension is for canonical resources only), so the older version carries the
  extension :data:`SUPERSEDED_BY_URL` (valueReference to the newer report) and its narrative says
  so in both languages; and a Provenance records the activity the way FHIR records any revision:
  targets = the cancelled version of the older report and the newer report, entity (role
  ``revision``) = the older report's version that was superseded, agent (``assembler``) = the
  model's Device that made the newer draft. ``Provenance?target=DiagnosticReport/<old>`` finds it.

Only unreviewed (``partial``) drafts are superseded: a clinician's ``final`` report stays as the
clinician left it. The builders are pure; :func:`integrations.fhir.store.publish_draft` stores
their output in the publishing transaction.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any, Final

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.provenance import Provenance

from reporting.fhir.ids import _digest
from reporting.fhir.provenance import DATA_OPERATION, PARTICIPANT_TYPE
from reporting.fhir.timing import instant
from reporting.labels import AI_ASSERTED, TAQRIR_URN, security_labels, tags

SUPERSEDED_BY_URL: Final = f"{TAQRIR_URN}fhir:StructureDefinition:superseded-by"
"""Extension on a DiagnosticReport version: the newer report (of a later study version) that replaces it."""

_NOTE: Final = {
    "en": "Superseded: a newer draft of this study (version {v}) replaces this one ({ref}). Do not review this draft.",
    "ar": "مُستبدَلة: مسودة أحدث لهذه الدراسة (الإصدار {v}) تحل محل هذه المسودة ({ref}). لا تراجع هذه المسودة.",
}


def superseded_by(report: dict[str, Any]) -> str | None:
    """The reference of the report that superseded ``report`` (its JSON), if any."""
    for ext in report.get("extension") or []:
        if ext.get("url") == SUPERSEDED_BY_URL:
            ref = (ext.get("valueReference") or {}).get("reference")
            return str(ref) if ref else None
    return None


def build_superseded_report(report: dict[str, Any], *, newer_report_id: str, newer_study_version: int) -> DiagnosticReport:
    """The next version of an unreviewed draft ``report`` (stored JSON): ``cancelled``, linked to the newer report."""
    ref = f"DiagnosticReport/{newer_report_id}"
    data = {k: v for k, v in report.items() if k != "extension"}
    data["meta"] = {k: v for k, v in (report.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    data["status"] = "cancelled"
    data["extension"] = [e for e in report.get("extension") or [] if e.get("url") != SUPERSEDED_BY_URL]
    data["extension"].append({"url": SUPERSEDED_BY_URL, "valueReference": {"reference": ref}})
    div = (report.get("text") or {}).get("div", '<div xmlns="http://www.w3.org/1999/xhtml"></div>')
    head, sep, rest = div.partition(">")
    notes = "".join(
        f'<p lang="{lang}" xml:lang="{lang}" dir="{"rtl" if lang == "ar" else "ltr"}"><b>'
        + html.escape(text.format(v=newer_study_version, ref=ref)) + "</b></p>"
        for lang, text in _NOTE.items())
    data["text"] = {"status": "generated", "div": head + sep + notes + rest}
    return DiagnosticReport.model_validate(data)


def supersession_provenance_id(old_report_id: str, new_report_id: str) -> str:
    """Provenance id of the supersession of ``old_report_id`` by ``new_report_id``."""
    return "prov-" + _digest("supersede", old_report_id, new_report_id)


def build_supersession_provenance(*, old_report_id: str, old_version: int, superseded_version: int,
                                  new_report_id: str, new_report_version: int, device_id: str,
                                  newer_study_version: int, at: datetime) -> Provenance:
    """Provenance of the supersession (see the module docstring for what each element says)."""
    data: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": supersession_provenance_id(old_report_id, new_report_id),
        "meta": {"security": security_labels(), "tag": tags()},
        "target": [{"reference": f"DiagnosticReport/{old_report_id}/_history/{superseded_version}"},
                   {"reference": f"DiagnosticReport/{new_report_id}/_history/{new_report_version}"}],
        "recorded": instant(at),
        "reason": [{"coding": [dict(AI_ASSERTED)]}],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE", "display": "revise"}],
                     "text": f"superseded by DiagnosticReport/{new_report_id} (study version {newer_study_version})"},
        "agent": [{
            "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "assembler", "display": "Assembler"}]},
            "who": {"reference": f"Device/{device_id}"},
        }],
        "entity": [{"role": "revision", "what": {"reference": f"DiagnosticReport/{old_report_id}/_history/{old_version}"}}],
    }
    return Provenance.model_validate(data)
