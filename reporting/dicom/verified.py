"""The clinician-verified revision of a draft SR (PS3.3 C.17.2, "Verification Flag"; IHE SINR).

A verified report is a new SR instance, never a change to the draft: it carries the text the
clinician accepted or edited, VerificationFlag ``VERIFIED`` with the clinician as the only
Verifying Observer (name, organisation, date/time; PS3.3 C.17.2.2), Predecessor Documents
Sequence pointing at the draft SR, and CompletionFlag ``COMPLETE`` / PreliminaryFlag ``FINAL``
like the FHIR report the same review makes ``final``. The research-only disclaimer and series
label stay (the text began as machine output), and a review note in both languages says who
verified it, when and how. The drafting model stays a Device observer in the content (it wrote
the text) but is never a verifying observer; a rejection makes no verified SR at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from highdicom.sr import PersonObserverIdentifyingAttributes
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from reporting.dicom.equipment import Equipment, dicom_dt, lo
from reporting.dicom.errors import DicomObjectError
from reporting.dicom.source import SourceAttributes
from reporting.dicom.sr import SR_SOP_CLASS, report_content, sr_document
from reporting.dicom.uids import object_uids
from reporting.draft import Draft, Language, Sections

# "Research only" first, as every series description of ours (see modules.RESEARCH_LABEL: OHIF
# shows only the first ~26 characters)
VERIFIED_SERIES_DESCRIPTION: Final = "Research only: clinician-verified AI-assisted report"
_NOTE: Final[dict[Language, str]] = {
    "en": "Verified by {who} ({org}), {action} on {at} UTC. The text began as an AI research draft.",
    "ar": "تحقق منه {who} ({org})، {action} في {at} بالتوقيت العالمي. بدأ النص مسودة بحثية من الذكاء الاصطناعي.",
}
_ACTION: Final[dict[Language, dict[str, str]]] = {
    "en": {"accept": "accepted as drafted", "edit": "edited"},
    "ar": {"accept": "قُبل كما صيغ", "edit": "عُدّل"},
}


class Verification(BaseModel):
    """A clinician's accept or edit of a draft: who, for which organisation, when, what text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Literal["accept", "edit", "reject"]
    reviewer_name: str = Field(min_length=1, description="The clinician's name (from the review's token).")
    reviewer_id: str = Field(min_length=1, description="The clinician's user id (token subject).")
    organization: str = Field(min_length=1, description="Verifying Organization (0040,A027).")
    verified_at: datetime
    sections: dict[Language, Sections] = Field(description="The text as verified (the draft's, edits applied).")
    revision: str = Field("", description="Tells several verified revisions of one draft apart (e.g. report version).")


_PREFIXES: Final = {"dr", "dr.", "prof", "prof.", "mr", "mr.", "mrs", "mrs.", "ms", "ms."}


def person_name(name: str) -> str:
    """A display name as a PN value (PS3.5 6.2.1.1): ``Family^Given`` is kept; ``Dr Amal Haddad``
    becomes ``Haddad^Amal^^Dr``; a single word becomes ``Word^`` (family name only)."""
    if "^" in name or "=" in name:
        return name
    parts = name.split()
    prefix = ""
    if len(parts) > 1 and parts[0].lower() in _PREFIXES:
        prefix, parts = parts[0], parts[1:]
    if len(parts) >= 2:
        value = f"{parts[-1]}^{' '.join(parts[:-1])}"
    else:
        value = f"{parts[0] if parts else name}^"
    return f"{value}^^{prefix}" if prefix else value


def build_verified_sr(draft: Draft, source: SourceAttributes, equipment: Equipment,
                      verification: Verification) -> Dataset:
    """The verified revision of ``draft``'s SR. :class:`DicomObjectError` for a rejection."""
    if verification.action == "reject":
        raise DicomObjectError(f"draft {draft.draft_id} was rejected: a rejection makes no verified SR")
    pn = person_name(verification.reviewer_name)
    when = verification.verified_at
    da, tm = dicom_dt(when)
    at = f"{da[:4]}-{da[4:6]}-{da[6:]} {tm[:2]}:{tm[2:4]}"
    display = verification.reviewer_name
    notes = {lang: [_NOTE[lang].format(who=display, org=verification.organization,
                                       action=_ACTION[lang][verification.action], at=at)]
             for lang in verification.sections}
    person = PersonObserverIdentifyingAttributes(name=pn, login_name=verification.reviewer_id,
                                                 organization_name=lo(verification.organization))
    ds = sr_document(
        draft, source, equipment,
        uids=object_uids(draft, "verified-sr", verification.revision or da + tm),
        content=report_content(draft, dict(verification.sections), notes=notes, person=person),
        series_description=VERIFIED_SERIES_DESCRIPTION, created=when,
    )
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    ds.PreliminaryFlag = "FINAL"
    observer = Dataset()
    observer.VerifyingObserverName = pn
    observer.VerifyingObserverIdentificationCodeSequence = []
    observer.VerifyingOrganization = lo(verification.organization)
    observer.VerificationDateTime = da + tm + "+0000"
    ds.VerifyingObserverSequence = [observer]
    draft_uids = object_uids(draft, "sr")
    ref = Dataset()
    ref.ReferencedSOPClassUID = SR_SOP_CLASS
    ref.ReferencedSOPInstanceUID = draft_uids.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = draft_uids.series_instance_uid
    series.ReferencedSOPSequence = [ref]
    study = Dataset()
    study.StudyInstanceUID = draft.study.study_instance_uid
    study.ReferencedSeriesSequence = [series]
    ds.PredecessorDocumentsSequence = [study]
    return ds

