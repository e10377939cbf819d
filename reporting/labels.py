"""Research-only labelling: the codes and disclaimers every Taqrir output carries.

One place for them, so that the FHIR resources, the DICOM SR and the PDF say the same thing.

Security labels (FHIR R4 ``Meta.security``, http://hl7.org/fhir/R4/security-labels.html):

* ``AIAST`` from v3-ObservationValue, "artificial intelligence asserted": the content was made by
  an AI (HL7 AI Transparency on FHIR, http://hl7.org/fhir/uv/aitransparency/). It stays on every
  version, including the ones a clinician reviewed: the text started as machine output.
* ``HRESCH`` from v3-ActReason, "healthcare research": the purpose of use these drafts are
  released for (a purpose-of-use label, R4 security-labels "Purpose of Use").

Tag (``Meta.tag``): :data:`RESEARCH_ONLY_TAG` in Taqrir's own code system, "research use only,
not for clinical use". The API offers no operation that removes tags or security labels (no
``$meta-delete``, no update), and the store re-applies them to every version it writes.
"""

from __future__ import annotations

from typing import Final, TypedDict

from reporting.draft import Language


class CodingDict(TypedDict):
    """A FHIR Coding as plain JSON (system, code, display)."""

    system: str
    code: str
    display: str


TAQRIR_URN: Final = "urn:taqrir:"
"""Prefix of Taqrir's own naming systems (identifier systems, code systems)."""

V3_OBSERVATION_VALUE: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESEARCH_TAG_SYSTEM: Final = f"{TAQRIR_URN}fhir:tag"

AI_ASSERTED: Final[CodingDict] = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
RESEARCH_PURPOSE: Final[CodingDict] = {
    "system": V3_ACT_REASON,
    "code": "HRESCH",
    "display": "healthcare research",
}
RESEARCH_ONLY_TAG: Final[CodingDict] = {
    "system": RESEARCH_TAG_SYSTEM,
    "code": "research-only",
    "display": "Research use only - not for clinical use",
}

SECURITY_LABELS: Final[tuple[CodingDict, ...]] = (AI_ASSERTED, RESEARCH_PURPOSE)
TAGS: Final[tuple[CodingDict, ...]] = (RESEARCH_ONLY_TAG,)

DISCLAIMER: Final[dict[Language, str]] = {
    "en": (
        "RESEARCH DRAFT - NOT FOR CLINICAL USE. This report was drafted by an artificial "
        "intelligence model (BiMediX2) and has not been verified by a physician unless a "
        "reviewer is named. Do not use it for diagnosis or treatment."
    ),
    "ar": (
        "مسودة بحثية - ليست للاستخدام السريري. صاغ هذا التقرير نموذج ذكاء اصطناعي (BiMediX2) "
        "ولم يتحقق منه طبيب ما لم يُذكر اسم المراجع. لا تستخدمه للتشخيص أو العلاج."
    ),
}
"""The research-only disclaimer, per language, reused verbatim by every output."""

SECTION_TITLES: Final[dict[Language, dict[str, str]]] = {
    "en": {"report": "Imaging report (research draft)", "findings": "Findings", "impression": "Impression"},
    "ar": {"report": "تقرير التصوير (مسودة بحثية)", "findings": "النتائج", "impression": "الانطباع"},
}
"""Headings of the rendered report, per language."""


def security_labels() -> list[CodingDict]:
    """Fresh copies of the security labels, for a resource's ``meta.security``."""
    return [dict(c) for c in SECURITY_LABELS]  # type: ignore[misc]


def tags() -> list[CodingDict]:
    """Fresh copies of the research-only tags, for a resource's ``meta.tag``."""
    return [dict(c) for c in TAGS]  # type: ignore[misc]


def has_labels(meta: dict[str, object] | None) -> bool:
    """Whether a resource's JSON ``meta`` carries every security label and tag."""
    if not meta:
        return False

    def _codes(key: str) -> set[tuple[str, str]]:
        items = meta.get(key) or []
        assert isinstance(items, list)
        return {(str(c.get("system")), str(c.get("code"))) for c in items if isinstance(c, dict)}

    sec, tag = _codes("security"), _codes("tag")
    return all((c["system"], c["code"]) in sec for c in SECURITY_LABELS) and all(
        (c["system"], c["code"]) in tag for c in TAGS
    )


def with_labels(meta: dict[str, object] | None) -> dict[str, object]:
    """``meta`` with the security labels and tags added where missing (others kept)."""
    out: dict[str, object] = dict(meta or {})
    for key, required in (("security", SECURITY_LABELS), ("tag", TAGS)):
        existing = out.get(key)
        items: list[object] = list(existing) if isinstance(existing, list) else []
        current: list[dict[str, object]] = [dict(c) for c in items if isinstance(c, dict)]
        present = {(c.get("system"), c.get("code")) for c in current}
        for c in required:
            if (c["system"], c["code"]) not in present:
                current.append(dict(c))
        out[key] = current
    return out
