"""The report as a document, per language: HTML and plain text, disclaimer first.

Pure functions (sections in, bytes out) shared by every output that shows the text. Arabic HTML
is right-to-left (``<html lang="ar" dir="rtl">``, HTML Living Standard, the ``dir`` attribute).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from reporting.draft import Language, Sections
from reporting.labels import DISCLAIMER, SECTION_TITLES

DIRECTION: dict[Language, str] = {"en": "ltr", "ar": "rtl"}


@dataclass(frozen=True)
class ReviewNote:
    """Who reviewed the text, shown under the disclaimer of a reviewed version."""

    reviewer: str
    action: str
    at: str


_REVIEWED = {
    "en": "Reviewed by {who} ({action}) at {at}.",
    "ar": "راجعه {who} ({action}) في {at}.",
}


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in text.split("\n\n") if p.strip()] or [""]
    return "".join("<p>" + html.escape(p).replace("\n", "<br/>") + "</p>" for p in parts)


def render_html(sections: Sections, language: Language, review: ReviewNote | None = None) -> bytes:
    """A complete UTF-8 HTML document of one language's report."""
    t = SECTION_TITLES[language]
    reviewed = ""
    if review is not None:
        reviewed = '<p class="review">' + html.escape(
            _REVIEWED[language].format(who=review.reviewer, action=review.action, at=review.at)
        ) + "</p>"
    doc = (
        "<!DOCTYPE html>"
        f'<html lang="{language}" dir="{DIRECTION[language]}">'
        f'<head><meta charset="utf-8"/><title>{html.escape(t["report"])}</title></head>'
        f'<body><p class="disclaimer"><strong>{html.escape(DISCLAIMER[language])}</strong></p>'
        f"{reviewed}"
        f"<h1>{html.escape(t['report'])}</h1>"
        f"<h2>{html.escape(t['findings'])}</h2>{_paragraphs(sections.findings)}"
        f"<h2>{html.escape(t['impression'])}</h2>{_paragraphs(sections.impression)}"
        "</body></html>"
    )
    return doc.encode("utf-8")


def render_plain(sections: Sections, language: Language, review: ReviewNote | None = None) -> bytes:
    """The same report as UTF-8 plain text."""
    t = SECTION_TITLES[language]
    lines = [DISCLAIMER[language], ""]
    if review is not None:
        lines += [_REVIEWED[language].format(who=review.reviewer, action=review.action, at=review.at), ""]
    lines += [t["report"], "", t["findings"], sections.findings.strip(), "", t["impression"], sections.impression.strip(), ""]
    return "\n".join(lines).encode("utf-8")


def narrative_div(sections: dict[Language, Sections], review: ReviewNote | None = None) -> str:
    """The XHTML narrative (FHIR R4 Narrative.div): disclaimer and impression in both languages.

    Only elements and attributes allowed in FHIR narrative are used (R4 narrative.html#xhtml).
    """
    blocks = []
    for lang in ("en", "ar"):
        if lang not in sections:
            continue
        t = SECTION_TITLES[lang]
        reviewed = ""
        if review is not None:
            reviewed = "<p>" + html.escape(
                _REVIEWED[lang].format(who=review.reviewer, action=review.action, at=review.at)
            ) + "</p>"
        blocks.append(
            f'<div lang="{lang}" xml:lang="{lang}" dir="{DIRECTION[lang]}">'
            f"<p><b>{html.escape(DISCLAIMER[lang])}</b></p>{reviewed}"
            f"<p><b>{html.escape(t['impression'])}:</b> {html.escape(sections[lang].impression)}</p>"
            "</div>"
        )
    return '<div xmlns="http://www.w3.org/1999/xhtml">' + "".join(blocks) + "</div>"
