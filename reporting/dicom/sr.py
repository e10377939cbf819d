"""The draft as a DICOM Enhanced SR document with a TID 2000 "Basic Diagnostic Imaging Report" tree.

Why this shape (PS3.16 TID 2000/2001/2002, IHE Radiology SINR): a narrative report is a root
CONTAINER ``(18748-4, LN, "Diagnostic Imaging Report")`` with section CONTAINERs Findings
(121070) and Impressions (121072) holding TEXT items Finding (121071) and Impression (121073).
Each section carries its language as a HAS CONCEPT MOD ``(121049, DCM, "Language of Content Item
and Descendants")`` = ``en`` or ``ar`` (TID 1204), one set of sections per language. The
research-only disclaimer is content too (TEXT ``Comment``, both languages), ahead of the
sections, because viewers such as OHIF show the text but not Verification/Preliminary flags.

The drafting model is the observer (TID 1001/1004, a Device observer whose Device Observer UID is
the model's Device UID) and is identified by TID 4019 "Algorithm Identification" (name, version =
checkpoint revision, parameters = prompt template and sampling), as IHE AI Results asks; the
same algorithm is a Contributing Equipment item (see :mod:`reporting.dicom.equipment`).

Line layout for viewers: OHIF shows TEXT under 121071 "Finding" as preformatted text (line
breaks kept, long lines not wrapped; its screenshots here) and wraps 121073 "Impression". So
findings are written as one TEXT item per sentence, a sentence longer than
:data:`FINDING_LINE_CHARS` characters broken at word boundaries with CR LF (the text line
terminator of PS3.5 6.1.3); each impression paragraph is one item. A radiologist reads short
lines, never a line running off the screen, and other viewers lose nothing.

Arabic TEXT values are wrapped in Unicode right-to-left isolates (:func:`directional`) so that
viewers which lay text out left to right still show them in Arabic order.

Enhanced SR (not Comprehensive) because the tree holds no coordinates: it is the most widely
accepted SR class that still allows the coded TID 4019 items. Content items come from
highdicom's ``ContainerContentItem``/``TextContentItem`` and templates; the document modules
are written with pydicom (:mod:`reporting.dicom.modules`), so the output does not depend on
the clock and the key images need not be read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import EnhancedSRStorage

from reporting.dicom.concepts import (
    COMMENT,
    DIAGNOSTIC_IMAGING_REPORT,
    FINDING,
    FINDINGS,
    IMPRESSION,
    IMPRESSIONS,
    LANGUAGE,
    LANGUAGE_OF_CONTENT,
)
from reporting.dicom.equipment import Equipment, lo
from reporting.dicom.evidence import evidence_sequence
from reporting.dicom.modules import RESEARCH_LABEL, new_object
from reporting.dicom.source import SourceAttributes
from reporting.dicom.uids import ObjectUids, device_uid, object_uids
from reporting.draft import Draft, Language, Sections
from reporting.labels import DISCLAIMER

SR_SOP_CLASS: Final = str(EnhancedSRStorage)
DRAFT_SERIES_DESCRIPTION: Final = f"{RESEARCH_LABEL} - Taqrir SR"
FINDING_LINE_CHARS: Final = 90
EMPTY_TEXT: Final[dict[Language, str]] = {"en": "[no text]", "ar": "[لا يوجد نص]"}
"""Shown in place of a section the model left empty: visible, never invented content."""

_SENTENCE_END = re.compile(r"(?<=[.!?؟。])\s+")

#: Unicode bidirectional isolates (UAX #9, 2.7): RIGHT-TO-LEFT ISOLATE ... POP DIRECTIONAL ISOLATE.
RLI: Final = "\u2067"
PDI: Final = "\u2069"


def directional(text: str, lang: Language) -> str:
    """Arabic text wrapped in a right-to-left isolate.

    Viewers lay SR text out left to right: OHIF's SR viewport, seen in its screenshots here, put
    an Arabic sentence's full stop on the wrong side and, where Latin text sits inside Arabic
    ("(BiMediX2)"), showed the Arabic phrases in the wrong order. Inside RLI ... PDI the Unicode
    Bidirectional Algorithm orders the text right to left whatever the surrounding direction;
    the marks are invisible, and a reader that compares text strips U+2066..U+2069. A line break
    ends an isolate (it separates paragraphs), so each line gets its own.
    """
    if lang != "ar" or not text:
        return text
    return "\r\n".join(f"{RLI}{line}{PDI}" for line in text.split("\r\n"))


def _chunks(sentence: str, limit: int) -> list[str]:
    """A sentence cut at spaces into pieces of at most ``limit`` characters (a word longer than
    ``limit`` is cut inside)."""
    out: list[str] = []
    current = ""
    for word in sentence.split():
        while len(word) > limit:
            if current:
                out.append(current)
                current = ""
            out.append(word[:limit])
            word = word[limit:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > limit:
            out.append(current)
            current = word
        else:
            current = candidate
    if current:
        out.append(current)
    return out


def finding_lines(text: str, limit: int = FINDING_LINE_CHARS) -> list[str]:
    """Findings text as one item per sentence, a long sentence broken into lines of at most
    ``limit`` characters (CR LF) at word boundaries."""
    items: list[str] = []
    for paragraph in text.splitlines():
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            if sentence.strip():
                items.append("\r\n".join(_chunks(sentence.strip(), limit)))
    return items


def impression_paragraphs(text: str) -> list[str]:
    """Impression text as paragraphs (blank-line separated; single line breaks become spaces)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if p]


def _language(lang: Language) -> CodeContentItem:
    return CodeContentItem(name=LANGUAGE_OF_CONTENT, value=LANGUAGE[lang], relationship_type="HAS CONCEPT MOD")


def _section(concept: Code, item_concept: Code, lines: list[str], lang: Language) -> ContainerContentItem:
    section = ContainerContentItem(name=concept, relationship_type="CONTAINS", is_content_continuous=False)
    section.ContentSequence = Sequence([_language(lang)])
    for line in lines or [EMPTY_TEXT[lang]]:
        section.ContentSequence.append(TextContentItem(name=item_concept, value=directional(line, lang),
                                                       relationship_type="CONTAINS"))
    return section


def _comment(text: str, lang: Language) -> TextContentItem:
    item = TextContentItem(name=COMMENT, value=directional(text, lang), relationship_type="CONTAINS")
    item.ContentSequence = Sequence([_language(lang)])
    return item


def report_content(
    draft: Draft,
    sections: dict[Language, Sections],
    *,
    notes: Mapping[Language, list[str]] | None = None,
    person: PersonObserverIdentifyingAttributes | None = None,
) -> ContainerContentItem:
    """The TID 2000 root: observers, algorithm, disclaimer (+ review notes), then per language
    Findings and Impressions. Languages in the order English, Arabic."""
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000", is_content_continuous=False)
    # TID 2000 row 2: the document's language (the Arabic sections override it for themselves)
    items: list[Dataset] = [_language("en")]
    if person is not None:
        items.extend(ObserverContext(observer_type=codes.DCM.Person, observer_identifying_attributes=person))
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(draft.model), name=lo(draft.model.model_name),
        manufacturer_name=lo(draft.model.manufacturer), model_name=lo(draft.model.model_name),
    )
    items.extend(ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    parameters = [f"prompt template {draft.model.prompt_template_id} sha256:{draft.model.prompt_template_sha256}"]
    parameters += [f"{k}={v}" for k, v in sorted(draft.model.sampling.items())]
    items.extend(AlgorithmIdentification(name=draft.model.model_name, version=draft.model.model_revision,
                                         parameters=parameters))
    langs: list[Language] = [lang for lang in ("en", "ar") if lang in sections]
    for lang in langs:
        items.append(_comment(DISCLAIMER[lang], lang))
        for note in (notes or {}).get(lang, ()):
            items.append(_comment(note, lang))
    for lang in langs:
        items.append(_section(FINDINGS, FINDING, finding_lines(sections[lang].findings), lang))
        items.append(_section(IMPRESSIONS, IMPRESSION, impression_paragraphs(sections[lang].impression), lang))
    root.ContentSequence = Sequence(items)
    return root


def sr_document(
    draft: Draft,
    source: SourceAttributes,
    equipment: Equipment,
    *,
    uids: ObjectUids,
    content: ContainerContentItem,
    series_description: str,
    created: datetime,
) -> Dataset:
    """An Enhanced SR dataset around ``content`` (flags are set by the caller)."""
    if source.study_instance_uid != draft.study.study_instance_uid:
        raise ValueError(
            f"source attributes are of study {source.study_instance_uid}, the draft of "
            f"{draft.study.study_instance_uid}: read the source from an instance of the drafted study"
        )
    ds = new_object(sop_class_uid=SR_SOP_CLASS, uids=uids, source=source, modality="SR",
                    series_description=series_description, created=created, equipment=equipment,
                    model=draft.model)
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    evidence = evidence_sequence(draft)
    if evidence:
        ds.CurrentRequestedProcedureEvidenceSequence = evidence
    for element in content:
        ds[element.tag] = element
    return ds


def build_draft_sr(draft: Draft, source: SourceAttributes, equipment: Equipment) -> Dataset:
    """The machine draft as an SR: UNVERIFIED, PARTIAL, PRELIMINARY (PS3.3 C.17.2), research-labelled.

    The same draft gives the same Series/SOP Instance UIDs and the same bytes.
    """
    ds = sr_document(draft, source, equipment, uids=object_uids(draft, "sr"),
                     content=report_content(draft, dict(draft.sections)),
                     series_description=DRAFT_SERIES_DESCRIPTION, created=draft.created_at)
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    return ds
