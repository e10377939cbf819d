"""The one-page bilingual report as a PDF, and its Encapsulated PDF wrapper (PS3.3 A.45.1).

Renderer: WeasyPrint, because Arabic must be shaped (contextual letter forms, lam-alef
ligatures; HarfBuzz via Pango) and ordered (the Unicode Bidirectional Algorithm, FriBidi), with
digits and Latin abbreviations inside Arabic sentences kept in the right order; the page is plain
HTML/CSS with ``dir="rtl"`` on the Arabic block. Alternatives tried by the project: fpdf2 with
uharfbuzz needs explicit fallback fonts for the Latin letters and parentheses that Noto Naskh
Arabic lacks (otherwise they vanish silently), and the arabic-reshaper + python-bidi recipe
double-shapes on engines that already shape. Fonts come from Debian and are embedded (subset),
so any reader shows the same page: Noto Sans (``fonts-noto-core``) for English, Amiri
(``fonts-hosny-amiri``, a Naskh face with Latin letters of its own) for Arabic, Noto Naskh Arabic
as the fallback. Amiri rather than Noto Naskh Arabic because, tried here with poppler 22.12,
text extracted from Noto Naskh Arabic (and Noto Kufi) loses a line's order when a word carries a
mark such as tanwin (``شهرًا``), which Amiri's mark placement does not; both shape the same.
``tests/run.sh`` installs the fonts.

The page: a red "AI draft, unverified, research only" banner in both languages, a
patient/study header, English (left to right) beside Arabic (right to left), each column ending
with the research-only disclaimer in its language, then the key images as thumbnails with their
labels.

Text extraction: poppler's ``pdftotext`` picks one reading direction per *page* (by counting
strong left-to-right against right-to-left characters) and, on a page where English dominates,
emits the words of Arabic lines in visual order. The PDF itself holds the Arabic as shaped glyphs
with correct ToUnicode maps (lam-alef included, with Noto Naskh Arabic); extracting the Arabic
column's region (``pdftotext -x -y -W -H``) or any page where Arabic dominates gives it in
logical order. Keeping each language in its own column (disclaimer included) keeps that region
one rectangle. A typical
draft fits one A4 page; longer text flows onto further pages rather than being cut.

Both functions are pure (data in, bytes/dataset out); reading the key-image PNGs from storage is
the caller's business. Building the PDF is the slow part (see ``bench/dicom_objects.py``).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from typing import Final

from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from reporting.dicom.concepts import REPORT_DOCUMENT
from reporting.dicom.equipment import Equipment, dicom_dt
from reporting.dicom.errors import DicomObjectError, PdfRendererMissing
from reporting.dicom.evidence import key_instances
from reporting.dicom.modules import RESEARCH_LABEL, new_object
from reporting.dicom.source import SourceAttributes
from reporting.dicom.uids import object_uids
from reporting.draft import Draft, Language, Sections
from reporting.labels import DISCLAIMER, SECTION_TITLES

log = logging.getLogger(__name__)

PDF_SOP_CLASS: Final = str(EncapsulatedPDFStorage)
PDF_SERIES_DESCRIPTION: Final = f"{RESEARCH_LABEL} - report PDF"
DOCUMENT_TITLE: Final = "AI draft report (unverified, research only)"
BANNER: Final[dict[Language, str]] = {
    "en": "AI DRAFT - UNVERIFIED - RESEARCH ONLY",
    "ar": "مسودة ذكاء اصطناعي - غير موثقة - للبحث فقط",
}
THUMBNAIL_PX: Final = 320
EMPTY: Final[dict[Language, str]] = {"en": "(no text)", "ar": "(لا يوجد نص)"}


def thumbnail(png: bytes, size: int = THUMBNAIL_PX) -> bytes:
    """A key image scaled to fit ``size`` pixels, as JPEG (quality 90): the PDF embeds JPEG as
    is (DCTDecode), where a PNG would be decoded and compressed again; a printed 40 mm preview
    loses nothing visible. The model's PNG stays the reference (its SHA-256 is recorded)."""
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        copy = im.convert("L") if im.mode in ("I", "I;16", "F", "1") else im.convert("RGB") \
            if im.mode not in ("L", "RGB") else im.copy()
        copy.thumbnail((size, size))
        out = io.BytesIO()
        copy.save(out, format="JPEG", quality=90)
        return out.getvalue()


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _paragraphs(text: str, lang: Language) -> str:
    parts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not parts:
        return f'<p class="empty">{_e(EMPTY[lang])}</p>'
    return "".join("<p>" + "<br/>".join(_e(line) for line in p.split("\n")) + "</p>" for p in parts)


def _section(sections: Sections, lang: Language) -> str:
    t = SECTION_TITLES[lang]
    direction = "rtl" if lang == "ar" else "ltr"
    return (
        f'<section lang="{lang}" dir="{direction}">'
        f"<h1>{_e(t['report'])}</h1>"
        f"<h2>{_e(t['findings'])}</h2>{_paragraphs(sections.findings, lang)}"
        f"<h2>{_e(t['impression'])}</h2>{_paragraphs(sections.impression, lang)}"
        f'<p class="disclaimer"><strong>{_e(DISCLAIMER[lang])}</strong></p>'
        "</section>"
    )


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def _time(value: str) -> str:
    return f"{value[:2]}:{value[2:4]}" if len(value) >= 4 else value


def _age(value: str) -> str:
    """An AS value for reading: ``060Y`` -> ``60 years``."""
    units = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}
    if len(value) == 4 and value[:3].isdigit() and value[3] in units:
        return f"{int(value[:3])} {units[value[3]]}"
    return value


def _person(value: str) -> str:
    """A PN value for reading: first component group, ``Family^Given`` -> ``Family, Given``."""
    first = value.split("=")[0]
    parts = [p for p in first.split("^") if p]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "") if parts else value


def _header(draft: Draft, source: SourceAttributes) -> str:
    sex = {"M": "male", "F": "female", "O": "other"}.get(source.patient_sex, "")
    name = _person(source.patient_name)
    if "=" in source.patient_name:  # ideographic/phonetic groups: show them too
        name += " (" + " / ".join(g.replace("^", " ") for g in source.patient_name.split("=")[1:] if g) + ")"
    modalities = ", ".join(draft.study.modalities)
    rows = [
        ("Patient", f"<bdi>{_e(name)}</bdi>", "Patient ID", _e(source.patient_id)),
        ("Birth date / sex / age", _e(" / ".join(x for x in (_date(source.patient_birth_date), sex,
                                                             _age(source.patient_age)) if x)),
         "Accession", _e(source.accession_number)),
        ("Study", f"<bdi>{_e(source.study_description or modalities)}</bdi>", "Study date",
         _e(" ".join(x for x in (_date(source.study_date), _time(source.study_time)) if x))),
    ]
    body = "".join(f'<tr><td class="k">{a}</td><td>{b}</td><td class="k">{c}</td><td>{d}</td></tr>'
                   for a, b, c, d in rows)
    body += (f'<tr><td class="k">Study UID</td><td colspan="3" class="uid">{_e(source.study_instance_uid)}'
             f" (version {draft.study.version})</td></tr>")
    return f'<table class="header">{body}</table>'


def _images(draft: Draft, pngs: Mapping[str, bytes]) -> str:
    if not draft.key_images:
        return '<p class="empty">No key images were recorded for this draft.</p>'
    figures = []
    for ki in draft.key_images:
        png = pngs.get(ki.sha256)
        if png is None:
            picture = '<div class="missing">image not available</div>'
        else:
            data = base64.b64encode(thumbnail(png)).decode("ascii")
            picture = f'<img src="data:image/jpeg;base64,{data}" alt="{_e(ki.label)}"/>'
        caption = _e(ki.label or "key image") + (f" ({_e(ki.window)})" if ki.window else "")
        figures.append(f"<figure>{picture}<figcaption><bdi>{caption}</bdi></figcaption></figure>")
    return '<div class="images">' + "".join(figures) + "</div>"


@functools.cache
def _stylesheet() -> str:
    """The page's CSS (package data, ``report.css``), read once per process."""
    return resources.files("reporting.dicom").joinpath("report.css").read_text("utf-8")


def report_html(draft: Draft, source: SourceAttributes, key_image_pngs: Mapping[str, bytes],
                *, sections: Mapping[Language, Sections] | None = None, review_note: str = "") -> str:
    """The report page as HTML (what :func:`render_report_pdf` prints)."""
    text = dict(sections or draft.sections)
    css = _stylesheet()
    langs: list[Language] = [lang for lang in ("en", "ar") if lang in text]
    review = f'<p class="review">{_e(review_note)}</p>' if review_note else ""
    model = draft.model
    provenance = (f"Draft {_e(draft.draft_id)} - made {_e(draft.created_at.isoformat(timespec='seconds'))} by "
                  f"{_e(model.model_name)} ({_e(model.backend)}, revision {_e(model.model_revision[:23])}), prompt "
                  f"{_e(model.prompt_template_id)}.")
    return (
        '<!DOCTYPE html><html lang="en" dir="ltr"><head><meta charset="utf-8"/>'
        f"<title>{_e(DOCUMENT_TITLE)}</title><style>{css}</style></head><body>"
        f'<div class="banner"><span class="en" lang="en">{_e(BANNER["en"])}</span>'
        f'<span class="ar" lang="ar" dir="rtl">{_e(BANNER["ar"])}</span></div>'
        f"{_header(draft, source)}{review}"
        '<div class="report">' + "".join(_section(text[lang], lang) for lang in langs) + "</div>"
        f"{_images(draft, key_image_pngs)}"
        f'<p class="provenance">{provenance}</p>'
        "</body></html>"
    )


def render_report_pdf(draft: Draft, source: SourceAttributes, key_image_pngs: Mapping[str, bytes],
                      *, sections: Mapping[Language, Sections] | None = None, review_note: str = "") -> bytes:
    """The bilingual report as PDF bytes.

    ``key_image_pngs`` maps a key image's SHA-256 (``KeyImageRef.sha256``, the PNG the model saw)
    to its PNG bytes; a key image without bytes is shown as "image not available".
    """
    try:
        from weasyprint import HTML  # heavy import (Pango): only where a PDF is made
    except (ImportError, OSError) as err:  # WeasyPrint raises OSError when it cannot load Pango
        raise PdfRendererMissing(
            f"no report PDF: WeasyPrint cannot load its text libraries ({err}). Install Pango and the "
            "report's fonts (Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0 "
            "fonts-noto-core fonts-hosny-amiri); the SR and KOS are made without them"
        ) from err

    document = HTML(string=report_html(draft, source, key_image_pngs, sections=sections,
                                       review_note=review_note)).render()
    if len(document.pages) > 1:
        log.info("report of draft %s takes %d pages", draft.draft_id, len(document.pages))
    pdf = document.write_pdf()
    if not isinstance(pdf, bytes) or not pdf.startswith(b"%PDF"):
        raise DicomObjectError(f"WeasyPrint gave no PDF for draft {draft.draft_id}")
    return pdf


def build_encapsulated_pdf(draft: Draft, source: SourceAttributes, equipment: Equipment, pdf: bytes,
                           *, created: datetime | None = None) -> Dataset:
    """``pdf`` as an Encapsulated PDF instance (Modality DOC) in the draft's study, research-labelled."""
    if not pdf.startswith(b"%PDF"):
        raise DicomObjectError("the bytes to encapsulate are not a PDF (no %PDF header)")
    when = created or draft.created_at
    ds = new_object(sop_class_uid=PDF_SOP_CLASS, uids=object_uids(draft, "pdf"), source=source, modality="DOC",
                    series_description=PDF_SERIES_DESCRIPTION, created=when, equipment=equipment,
                    model=draft.model)
    ds.ConversionType = "WSD"  # SC Equipment (C.8.6.1): made on a workstation, not digitised
    da, tm = dicom_dt(when)
    ds.AcquisitionDateTime = da + tm + "+0000"
    ds.BurnedInAnnotation = "YES"  # the page shows patient identification
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    code = Dataset()
    code.CodeValue = REPORT_DOCUMENT.value
    code.CodingSchemeDesignator = REPORT_DOCUMENT.scheme_designator
    code.CodeMeaning = REPORT_DOCUMENT.meaning
    ds.ConceptNameCodeSequence = [code]
    ds.VerificationFlag = "UNVERIFIED"
    sources = []
    for _series, sop_class, sop_uid, _frames in key_instances(draft):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        sources.append(item)
    if sources:
        ds.SourceInstanceSequence = sources
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    return ds
