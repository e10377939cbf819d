"""A clinician's review of a draft, as a new DiagnosticReport version and its Provenance.

Status rules (documented in the CapabilityStatement and integrations/fhir/README.md): ``accept``
and ``edit`` make the new version ``final`` with the reviewer as ``resultsInterpreter`` (a human
action, R4 DiagnosticReport.status); ``reject`` makes it ``cancelled``. The machine version stays
unchanged in the history, and AIAST plus the research labels stay on every version: the text was
machine-made even when a human signed it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Final, Literal

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.provenance import Provenance

from reporting.draft import Draft, Language, Sections
from reporting.fhir.diagnostic_report import ReportStatus, report_data
from reporting.fhir.ids import USER_SYSTEM, report_id, review_provenance_id
from reporting.fhir.provenance import DATA_OPERATION, PARTICIPANT_TYPE
from reporting.fhir.timing import instant
from reporting.labels import AI_ASSERTED, security_labels, tags
from reporting.report_text import ReviewNote

ReviewAction = Literal["accept", "edit", "reject"]

STATUS_AFTER: Final[dict[ReviewAction, ReportStatus]] = {
    "accept": "final",
    "edit": "final",
    "reject": "cancelled",
}


@dataclass(frozen=True)
class Review:
    """One review: who, when, what, and for ``edit`` the replaced sections (per language)."""

    action: ReviewAction
    reviewer_id: str
    reviewed_at: datetime
    reviewer_display: str = ""
    edits: dict[Language, Sections] = field(default_factory=dict)

    def sections(self, draft: Draft) -> dict[Language, Sections]:
        """The draft's sections with this review's edits applied, without stale translations
        (:meth:`stale_languages`)."""
        out = dict(draft.sections)
        if self.action == "edit":
            out.update(self.edits)
        for lang in self.stale_languages(draft):
            out.pop(lang, None)
        return out

    def stale_languages(self, draft: Draft) -> list[Language]:
        """Languages whose text no longer says what the edited text says.

        The two languages of a draft are translations of each other. When the reviewer changes a
        section in one language and not the same section in the other, the other language's text
        is the machine's translation of words the clinician replaced: showing it beside the
        reviewed text (as ``_conclusion``'s translation, a presented form, the narrative) would
        present it as if it said the same. Such a language is dropped from the reviewed version
        (the machine version keeps it in the history); the audit record names it."""
        if self.action != "edit":
            return []
        changed: dict[str, set[str]] = {}
        for item in self.changed_sections(draft):
            lang, _, name = item.partition(".")
            changed.setdefault(lang, set()).add(name)
        langs = list(dict.fromkeys([*draft.sections, *self.edits]))
        stale: list[Language] = []
        for lang in langs:
            others = set().union(*(changed.get(o, set()) for o in langs if o != lang))
            if others - changed.get(lang, set()):
                stale.append(lang)
        return stale

    def changed_sections(self, draft: Draft) -> list[str]:
        """``lang.section`` names that the edit changed (for the audit trail: no text)."""
        changed = []
        for lang, new in self.edits.items():
            old = draft.sections.get(lang)
            for name in ("findings", "impression"):
                if old is None or getattr(old, name) != getattr(new, name):
                    changed.append(f"{lang}.{name}")
        return changed


def _reviewer_ref(review: Review) -> dict[str, Any]:
    return {"identifier": {"system": USER_SYSTEM, "value": review.reviewer_id},
            "display": review.reviewer_display or review.reviewer_id}


def build_reviewed_report(draft: Draft, review: Review, *, study_timezone: tzinfo = UTC) -> DiagnosticReport:
    """The reviewed version of the draft's report (same id; the store gives it the next version)."""
    note = ReviewNote(reviewer=review.reviewer_display or review.reviewer_id, action=review.action,
                      at=instant(review.reviewed_at))
    data = report_data(
        draft,
        sections=review.sections(draft),
        status=STATUS_AFTER[review.action],
        issued=review.reviewed_at,
        study_timezone=study_timezone,
        review=note,
        results_interpreter=[_reviewer_ref(review)],
    )
    return DiagnosticReport.model_validate(data)


def build_review_provenance(draft: Draft, review: Review, *, previous_version: int, new_version: int) -> Provenance:
    """Provenance of the review: the reviewer revised version ``previous_version`` into ``new_version``."""
    rid = report_id(draft)
    activity = "UPDATE" if review.action != "reject" else "NULLIFY"
    data: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": review_provenance_id(rid, new_version),
        "meta": {"security": security_labels(), "tag": tags()},
        "target": [{"reference": f"DiagnosticReport/{rid}/_history/{new_version}"}],
        "recorded": instant(review.reviewed_at),
        "reason": [{"coding": [dict(AI_ASSERTED)]}],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": activity}],
                     "text": f"review: {review.action}"},
        "agent": [{
            "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "verifier", "display": "Verifier"}]},
            "who": _reviewer_ref(review),
        }],
        "entity": [{"role": "revision", "what": {"reference": f"DiagnosticReport/{rid}/_history/{previous_version}"}}],
    }
    if review.action == "edit":
        data["activity"]["text"] = "review: edit (" + ", ".join(review.changed_sections(draft)) + ")"
    return Provenance.model_validate(data)
