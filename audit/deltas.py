"""Draft versus signed report: how much did the clinician change, and how long did it take.

Pure metrics first (text in, numbers out; tested directly on English and Arabic), then the
``report_delta`` table and :func:`compute_study_deltas`, which fills it for every (draft, signed
report) pair of a study in the signed report's language. It is called whenever either side
arrives (:func:`audit.signed.store_signed_report`, the pipeline after ``draft.created``) and by
``taqrir research deltas``; it is idempotent (one row per pair, updated in place).

The metrics, all computed on the machine draft's text (findings, then impression) as hypothesis
and the signed text as reference, after the same normalisation (:func:`normalise`):

* ``char_edit_distance``: Levenshtein distance over characters divided by the longer length
  (rapidfuzz ``Levenshtein.normalized_distance``; 0 = identical, 1 = nothing in common).
* ``percent_edited``: the same over word tokens, times 100: the share of words inserted, deleted
  or replaced, the figure closest to what a radiologist means by "I changed a third of it".
* ``chrf`` and ``bleu``: sacrebleu's sentence chrF (character 6-grams, beta 2) and BLEU
  (``effective_order``; tokenizer ``13a`` for English, ``intl`` for Arabic), 0-100.
* ``rouge_l``: rouge-score's ROUGE-L F-measure with :class:`UnicodeTokenizer`: rouge-score's
  default tokenizer keeps only ``[a-z0-9]`` and scores any Arabic text 0.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from rapidfuzz.distance import Levenshtein
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.chrf import CHRF
from sqlalchemy import UniqueConstraint
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from audit.chain import AuditRecord
from audit.signed_report import SIGNED_STATUSES, SignedReport
from ground.clock import as_utc, utcnow
from ground.db import session_scope
from integrations.dicom.index import Study
from reporting.draft import Draft
from reporting.draft_record import DraftRecord

log = logging.getLogger(__name__)

# -- pure metrics --------------------------------------------------------------------------------

_ARABIC_DIACRITICS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")  # harakat, tatweel
_ALEF = str.maketrans({"\u0623": "\u0627", "\u0625": "\u0627", "\u0622": "\u0627", "\u0671": "\u0627",
                       "\u0649": "\u064a"})
_DIGITS = str.maketrans("\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"
                        "\u06f0\u06f1\u06f2\u06f3\u06f4\u06f5\u06f6\u06f7\u06f8\u06f9", "0123456789" * 2)
_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+", re.UNICODE)
_ARABIC_LETTER = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")
_LATIN_LETTER = re.compile("[A-Za-z]")


def normalise(text: str) -> str:
    """NFKC, lower case, Arabic diacritics and tatweel removed, alef/yaa forms unified, Eastern
    Arabic digits as ASCII, whitespace collapsed: differences no reader would call an edit."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _ARABIC_DIACRITICS.sub("", t).translate(_ALEF).translate(_DIGITS)
    return _SPACE.sub(" ", t).strip()


def tokens(text: str) -> list[str]:
    """Word tokens of the normalised text (letters and digits of any script)."""
    return _TOKEN.findall(normalise(text))


class UnicodeTokenizer:
    """A rouge-score tokenizer (``tokenize(text) -> list[str]``) that keeps Arabic."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def script_language(text: str) -> str | None:
    """'ar' or 'en' by which script has more letters; None for text without letters."""
    ar = len(_ARABIC_LETTER.findall(text))
    la = len(_LATIN_LETTER.findall(text))
    if ar == 0 and la == 0:
        return None
    return "ar" if ar >= la else "en"


@dataclass(frozen=True)
class TextDelta:
    """The text metrics of one draft/signed pair (see the module docstring)."""

    char_edit_distance: float
    percent_edited: float
    chrf: float
    bleu: float
    rouge_l: float


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
_CHRF = CHRF()
_BLEU = {"en": BLEU(tokenize="13a", effective_order=True), "ar": BLEU(tokenize="intl", effective_order=True)}


def text_delta(draft: str, signed: str, language: str) -> TextDelta:
    """How far the signed text is from the draft (draft = hypothesis, signed = reference)."""
    hyp, ref = normalise(draft), normalise(signed)
    words_h, words_r = _TOKEN.findall(hyp), _TOKEN.findall(ref)
    return TextDelta(
        char_edit_distance=round(Levenshtein.normalized_distance(hyp, ref), 6),
        percent_edited=round(100.0 * Levenshtein.normalized_distance(words_h, words_r), 4),
        chrf=round(_CHRF.sentence_score(hyp, [ref]).score, 4),
        bleu=round(_BLEU.get(language, _BLEU["en"]).sentence_score(hyp, [ref]).score, 4),
        rouge_l=round(_SCORER.score(ref, hyp)["rougeL"].fmeasure, 6),
    )


def draft_text(draft: Draft, language: str) -> str | None:
    """The draft's whole text in ``language`` (findings, then impression), or None."""
    sections = draft.sections.get(language)  # type: ignore[call-overload]
    if sections is None:
        return None
    return "\n".join(p.strip() for p in (sections.findings, sections.impression) if p.strip())


REVIEW_OUTCOMES = {"accept": "accepted", "edit": "edited", "reject": "rejected"}


# -- the table -----------------------------------------------------------------------------------


class ReportDelta(SQLModel, table=True):
    """One machine draft against one signed report of the same study, in the signed language."""

    __tablename__ = "report_delta"
    __table_args__ = (UniqueConstraint("draft_id", "signed_report_id", name="uq_report_delta_pair"),)

    id: int | None = Field(default=None, primary_key=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    draft_pk: int = Field(foreign_key="draft.id", index=True)
    draft_id: str = Field(max_length=64, index=True, description="draft.draft_id")
    draft_version: int = Field(description="The study version the draft was made from.")
    draft_superseded: bool = Field(default=False, description="A newer study version was drafted.")
    signed_report_id: int = Field(foreign_key="signed_report.id", index=True)
    signed_current: bool = Field(default=True, description="The signed report is the study's current one.")
    language: str = Field(max_length=2)
    char_edit_distance: float = Field(description="Normalised character Levenshtein distance, 0-1.")
    percent_edited: float = Field(description="Word-level Levenshtein distance / longer length, 0-100.")
    chrf: float = Field(description="sacrebleu sentence chrF, 0-100.")
    bleu: float = Field(description="sacrebleu sentence BLEU (effective order), 0-100.")
    rouge_l: float = Field(description="ROUGE-L F-measure with a tokenizer that keeps Arabic, 0-1.")
    draft_chars: int = 0
    signed_chars: int = 0
    review_outcome: str = Field(default="none", max_length=16, description="accepted | edited | rejected | none")
    reviewer: str | None = Field(default=None, max_length=256, description="Token subject of the reviewer.")
    reviewed_at: datetime | None = None
    arrival_to_draft_s: float | None = Field(default=None, description="Study first received -> draft created.")
    arrival_to_review_s: float | None = Field(default=None, description="Study first received -> $review.")
    arrival_to_signature_s: float | None = Field(
        default=None, description="Study first received -> signed (signed_at, else received_at).")
    computed_at: datetime = Field(default_factory=utcnow)


@dataclass(frozen=True)
class ReviewSeen:
    outcome: str
    reviewer: str
    at: datetime


def _review_of(session: Session, report_id: str | None) -> ReviewSeen | None:
    """The clinician's $review of a draft's DiagnosticReport, from the audit trail (the review
    itself lives in the report's history; the trail has who, when and which action)."""
    if not report_id:
        return None
    rec = session.exec(
        select(AuditRecord)
        .where(AuditRecord.entity_type == "DiagnosticReport", AuditRecord.entity_id == report_id,
               col(AuditRecord.action).startswith("fhir.review."))
        .order_by(col(AuditRecord.seq)).limit(1)
    ).first()
    if rec is None:
        return None
    action = rec.action.removeprefix("fhir.review.")
    return ReviewSeen(REVIEW_OUTCOMES.get(action, action), rec.actor, as_utc(rec.at))


def _seconds(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else round((as_utc(end) - as_utc(start)).total_seconds(), 3)


def compute_study_deltas(session: Session, study_pk: int) -> int:
    """(Re)compute every delta of a study in the caller's transaction; returns how many rows
    exist for it afterwards. Idempotent: a pair's row is updated in place."""
    study = session.get(Study, study_pk)
    if study is None:
        return 0
    signed = session.exec(
        select(SignedReport).where(col(SignedReport.study_pk) == study_pk,
                                   col(SignedReport.status).in_(sorted(SIGNED_STATUSES)))
    ).all()
    if not signed:
        return 0
    drafts = session.exec(select(DraftRecord).where(col(DraftRecord.study_pk) == study_pk)).all()
    if not drafts:
        return 0
    existing = {(d.draft_id, d.signed_report_id): d for d in session.exec(
        select(ReportDelta).where(col(ReportDelta.study_pk) == study_pk)).all()}
    arrival = as_utc(study.first_received_at)
    now = utcnow()
    count = 0
    for rec in drafts:
        draft = Draft.model_validate_json(rec.draft_json)
        review = _review_of(session, rec.fhir_report_id)  # set by the publish stage (and its sweep)
        for sr in signed:
            hyp = draft_text(draft, sr.language)
            if hyp is None:
                continue
            m = text_delta(hyp, sr.text, sr.language)
            row = existing.get((rec.draft_id, sr.id or 0)) or ReportDelta(
                study_pk=study_pk, draft_pk=rec.id or 0, draft_id=rec.draft_id, draft_version=rec.version,
                signed_report_id=sr.id or 0, language=sr.language, char_edit_distance=0, percent_edited=0,
                chrf=0, bleu=0, rouge_l=0)
            row.draft_superseded, row.signed_current = rec.superseded, sr.current
            row.char_edit_distance, row.percent_edited = m.char_edit_distance, m.percent_edited
            row.chrf, row.bleu, row.rouge_l = m.chrf, m.bleu, m.rouge_l
            row.draft_chars, row.signed_chars = len(hyp), len(sr.text)
            row.review_outcome = review.outcome if review else "none"
            row.reviewer = review.reviewer if review else None
            row.reviewed_at = review.at if review else None
            row.arrival_to_draft_s = _seconds(arrival, rec.created_at)
            row.arrival_to_review_s = _seconds(arrival, review.at) if review else None
            row.arrival_to_signature_s = _seconds(arrival, sr.signed_at or sr.received_at)
            row.computed_at = now
            session.add(row)
            count += 1
    session.flush()
    return count


def deltas_for_draft(session: Session, draft_id: str) -> list[ReportDelta]:
    """The delta rows of one draft (for the export and `taqrir studies`)."""
    return list(session.exec(select(ReportDelta).where(col(ReportDelta.draft_id) == draft_id)
                             .order_by(col(ReportDelta.language), col(ReportDelta.signed_report_id))).all())


def as_dict(row: ReportDelta) -> dict[str, object]:
    """A delta row as plain JSON values."""
    return json.loads(row.model_dump_json())  # type: ignore[no-any-return]


def recompute_all(engine: Engine) -> tuple[int, int]:
    """Recompute the deltas of every study with a signed report (``taqrir deltas``; e.g. after a
    clinician reviewed a draft whose signed report had already arrived). One transaction per
    study. Returns (studies, delta rows)."""
    with session_scope(engine) as s:
        studies = sorted(set(s.exec(select(SignedReport.study_pk)).all()))
    rows = 0
    for pk in studies:
        with session_scope(engine) as s:
            rows += compute_study_deltas(s, pk)
    return len(studies), rows
