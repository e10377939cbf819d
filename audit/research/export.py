"""``taqrir research export``: every draft version as one de-identified row, in Parquet and JSON
Lines, streamed in batches, with its data dictionary and a manifest, recorded in the audit trail.

Reads, per batch of ``research.batch_rows`` drafts (keyset on the draft's primary key, one short
transaction per batch so that SQLite writers are not held up): the draft rows with their study and
patient, the clinician's review from the audit trail (``fhir.review.*``), the study's current
signed reports (:mod:`audit.signed`) and the draft-versus-signed deltas (:mod:`audit.deltas`).
Rows are built by :func:`build_row` (pure) and written by pyarrow's ``ParquetWriter`` one record
batch at a time, so memory is bounded by one batch whatever the export's size. The files are
written under temporary names and renamed into place once complete.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func
from sqlalchemy import select as sa_select  # sqlmodel's select takes at most four columns
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from audit.chain import AuditRecord, record
from audit.deltas import ReportDelta
from audit.signed_report import SIGNED_STATUSES, SignedReport
from ground.clock import as_utc, utcnow
from ground.db import session_scope
from ground.errors import TaqrirError
from integrations.dicom.index import Patient, Series, Study
from reporting.consistency import CHECKER_VERSION, check_sections
from reporting.draft import Sections
from reporting.draft_record import DraftRecord

from .columns import COLUMNS, NAMES, SCHEMA, dictionary_markdown
from .config import ResearchSettings
from .deid import Deidentifier, age_years

log = logging.getLogger(__name__)

PARQUET = "drafts.parquet"
JSONL = "drafts.jsonl"
DICTIONARY = "data-dictionary.md"
MANIFEST = "manifest.json"
REVIEW_OUTCOMES = {"accept": "accepted", "edit": "edited", "reject": "rejected"}


class ResearchError(TaqrirError):
    """A research export or report cannot be made as asked."""


@dataclass(frozen=True)
class ExportFilter:
    """Which drafts: made at or after ``since`` (aware UTC), with ``modality`` in the study."""

    since: datetime | None = None
    modality: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"since": self.since.isoformat() if self.since else None, "modality": self.modality}


@dataclass
class ExportSummary:
    export_id: str
    out_dir: Path
    rows: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256


@dataclass(frozen=True)
class Review:
    outcome: str
    reviewer: str
    at: datetime


@dataclass
class Related:
    """What one batch's rows need beyond the draft row itself."""

    reviews: dict[str, Review] = field(default_factory=dict)  # report id -> first review
    signed: dict[tuple[int, str], SignedRow] = field(default_factory=dict)  # (study pk, lang) -> current
    deltas: dict[tuple[str, int], DeltaRow] = field(default_factory=dict)  # (draft id, signed id) -> delta


def parse_since(value: str | None) -> datetime | None:
    """``2026-11-01`` or an ISO 8601 instant (naive = UTC) as an aware UTC datetime."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise ResearchError(f"--since {value!r} is not an ISO date or date-time (e.g. 2026-11-01)") from err
    return as_utc(parsed)


# -- pure: one row -----------------------------------------------------------------------------

def _num(sampling: Mapping[str, Any], key: str, kind: type) -> Any:
    v = sampling.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return kind(v)


class DraftRow(NamedTuple):
    """The columns of a draft, its study and its patient that a row is made from (read as plain
    rows, not ORM objects: loading three entities per draft cost more than everything else)."""

    id: int
    draft_id: str
    study_pk: int
    version: int
    superseded: bool
    draft_json: str
    stage_times: str
    created_at: datetime
    published_at: datetime | None
    fhir_report_id: str | None
    consistency: str | None
    guard: str | None
    study_instance_uid: str
    first_received_at: datetime
    study_date: date | None
    patient_age: str | None
    patient_id: str
    patient_issuer: str
    patient_sex: str | None


_ROW_COLUMNS: tuple[Any, ...] = (
    DraftRecord.id, DraftRecord.draft_id, DraftRecord.study_pk, DraftRecord.version, DraftRecord.superseded,
    DraftRecord.draft_json, DraftRecord.stage_times, DraftRecord.created_at, DraftRecord.published_at,
    DraftRecord.fhir_report_id, DraftRecord.consistency, DraftRecord.guard, Study.study_instance_uid,
    Study.first_received_at, Study.study_date, Study.patient_age, Patient.patient_id, Patient.issuer, Patient.sex,
)


def build_row(r: DraftRow, rel: Related, deid: Deidentifier, settings: ResearchSettings) -> dict[str, Any]:
    """One export row (keys = :data:`~audit.research.columns.NAMES`) from a stored draft (pure)."""
    rec = study = patient = r
    d = json.loads(rec.draft_json)
    model = d["model"]
    sampling = model.get("sampling") or {}
    ref = d["study"]
    series = ref.get("series") or []
    key_images = d.get("key_images") or []
    patient_key = deid.pseudonym("patient", patient.patient_issuer or "", patient.patient_id)
    times = json.loads(rec.stage_times or "{}")
    arrival = as_utc(study.first_received_at)
    created = as_utc(rec.created_at)
    sections = d.get("sections") or {}
    text = settings.include_text

    def section(lang: str, name: str) -> str:
        return str((sections.get(lang) or {}).get(name, "")) if text else ""

    if rec.consistency:  # as stored: read, not re-validated (it was made by ConsistencyResult)
        check_json, source = rec.consistency, "stored"
        stored = json.loads(check_json)
        consistent, mismatches = bool(stored["consistent"]), stored.get("mismatches") or []
        found = {m["kind"] for m in mismatches}
        kinds = [k for k in ("number", "laterality", "negation", "term") if k in found]
    else:
        check = check_sections({k: Sections(**v) for k, v in sections.items() if k in ("en", "ar")})
        check_json, source = check.model_dump_json(), "recomputed"
        consistent, mismatches, kinds = check.consistent, list(check.mismatches), list(check.kinds)
    guard = json.loads(rec.guard) if rec.guard else {}
    review = rel.reviews.get(rec.fhir_report_id or "")
    signed = {lang: rel.signed.get((rec.study_pk, lang)) for lang in ("en", "ar")}
    current = next((s for s in (signed["en"], signed["ar"]) if s is not None), None)
    primary = next((s for s in series if s.get("modality")), series[0] if series else {})

    row: dict[str, Any] = {
        "draft_pseudonym": deid.pseudonym("draft", rec.draft_id),
        "study_pseudonym": deid.pseudonym("study", study.study_instance_uid),
        "patient_pseudonym": patient_key,
        "study_version": rec.version,
        "superseded": bool(rec.superseded),
        "published": rec.published_at is not None,
        "study_date": deid.day(study.study_date, patient_key),
        "drafted_at": deid.instant(created, patient_key),
        "patient_sex": patient.patient_sex if patient.patient_sex in ("M", "F", "O") else None,
        "patient_age_years": age_years(study.patient_age),
        "modality": primary.get("modality"),
        "modalities": list(ref.get("modalities") or []),
        "body_part": primary.get("body_part"),
        "series_count": len(series),
        "instance_count": sum(int(s.get("instance_count") or 0) for s in series),
        "key_image_count": len(key_images),
        "key_image_sha256": [str(k.get("sha256", "")) for k in key_images],
        "key_image_labels": [str(k.get("label", "")) for k in key_images],
        "prompt_template_id": model.get("prompt_template_id"),
        "prompt_template_sha256": model.get("prompt_template_sha256"),
        "model_backend": model.get("backend"),
        "model_name": model.get("model_name"),
        "model_revision": model.get("model_revision"),
        "sampling_json": json.dumps(sampling, sort_keys=True),
        "temperature": _num(sampling, "temperature", float),
        "top_p": _num(sampling, "top_p", float),
        "max_new_tokens": _num(sampling, "max_new_tokens", int) or _num(sampling, "max_tokens", int),
        "seed": _num(sampling, "seed", int),
        "prompt_tokens": int(model.get("prompt_tokens") or 0),
        "completion_tokens": int(model.get("completion_tokens") or 0),
        "model_latency_s": float(times.get("model_latency_s", model.get("latency_s") or 0.0)),
        "queue_s": times.get("queue_s"),
        "render_s": times.get("render_s"),
        "infer_s": times.get("infer_s"),
        "persist_s": times.get("persist_s"),
        "publish_s": times.get("publish_s"),
        "arrival_to_draft_s": round((created - arrival).total_seconds(), 3),
        "arrival_to_review_s": round((review.at - arrival).total_seconds(), 3) if review else None,
        "arrival_to_signature_s": (round((as_utc(current.signed_at or current.received_at) - arrival).total_seconds(), 3)
                                   if current else None),
        "en_findings": section("en", "findings"),
        "en_impression": section("en", "impression"),
        "ar_findings": section("ar", "findings"),
        "ar_impression": section("ar", "impression"),
        "guard_passed": guard.get("passed"),
        "guard_model_calls": guard.get("model_calls"),
        "consistent": consistent,
        "consistency_mismatches": len(mismatches),
        "consistency_kinds": kinds,
        "consistency_json": check_json,
        "consistency_source": source,
        "review_outcome": review.outcome if review else "none",
        "reviewer_pseudonym": deid.pseudonym("reviewer", review.reviewer) if review else None,
        "reviewer_role": settings.reviewer_roles.get(review.reviewer, settings.default_reviewer_role) if review else None,
        "reviewed_at": deid.instant(review.at, patient_key) if review else None,
        "signed_status": current.status if current else None,
        "signed_source": current.source if current else None,
        "signed_at": deid.instant(as_utc(current.signed_at or current.received_at), patient_key) if current else None,
        "signer_pseudonym": (deid.pseudonym("signer", current.signer_id or current.signer_name or "")
                             if current and (current.signer_id or current.signer_name) else None),
        "signed_en_text": (signed["en"].text if signed["en"] and text else ""),
        "signed_ar_text": (signed["ar"].text if signed["ar"] and text else ""),
    }
    for lang in ("en", "ar"):
        sr = signed[lang]
        delta = rel.deltas.get((rec.draft_id, sr.id or 0)) if sr is not None else None
        for metric in ("char_edit_distance", "percent_edited", "chrf", "bleu", "rouge_l"):
            row[f"{lang}_{metric}"] = float(getattr(delta, metric)) if delta is not None else None
    return row


# -- queries ---------------------------------------------------------------------------------

def _filtered(stmt: Any, flt: ExportFilter) -> Any:
    if flt.since is not None:
        stmt = stmt.where(col(DraftRecord.created_at) >= flt.since)
    if flt.modality:
        stmt = stmt.where(col(DraftRecord.study_pk).in_(
            select(Series.study_pk).where(func.upper(col(Series.modality)) == flt.modality.upper())))
    return stmt


def count_drafts(session: Session, flt: ExportFilter) -> int:
    return int(session.exec(_filtered(select(func.count()).select_from(DraftRecord), flt)).one())


class SignedRow(NamedTuple):
    id: int
    study_pk: int
    language: str
    status: str
    source: str
    text: str
    signer_id: str | None
    signer_name: str | None
    signed_at: datetime | None
    received_at: datetime


class DeltaRow(NamedTuple):
    draft_id: str
    signed_report_id: int
    char_edit_distance: float
    percent_edited: float
    chrf: float
    bleu: float
    rouge_l: float


def _related(session: Session, lo: int, hi: int) -> Related:
    """Reviews, current signed reports and deltas of the drafts with ids in ``lo..hi``: each one
    query joined on that id range (no parameter lists: compiling and sending IN lists of a batch's
    thousands of ids cost more than the queries), read as plain rows."""
    rel = Related()
    in_range = col(DraftRecord.id).between(lo, hi)
    # entity ids from the draft range as a subquery, and nothing else the planner could prefer:
    # SQLite otherwise walks the entity_type index and compares every review with every draft
    reviews = session.execute(
        sa_select(col(AuditRecord.entity_id), col(AuditRecord.action), col(AuditRecord.actor),
                  col(AuditRecord.at), col(AuditRecord.entity_type))
        .where(col(AuditRecord.entity_id).in_(sa_select(col(DraftRecord.fhir_report_id)).where(in_range)),
               col(AuditRecord.action).startswith("fhir.review."))
        .order_by(col(AuditRecord.seq))
    ).all()
    for rid, action, actor, at, entity_type in reviews:
        if entity_type != "DiagnosticReport":
            continue
        verb = action.removeprefix("fhir.review.")
        rel.reviews.setdefault(rid, Review(REVIEW_OUTCOMES.get(verb, verb), actor, as_utc(at)))
    studies = sa_select(col(DraftRecord.study_pk)).where(in_range)
    signed = [SignedRow(*r) for r in session.execute(
        sa_select(col(SignedReport.id), col(SignedReport.study_pk), col(SignedReport.language), col(SignedReport.status), col(SignedReport.source), col(SignedReport.text), col(SignedReport.signer_id), col(SignedReport.signer_name), col(SignedReport.signed_at), col(SignedReport.received_at))
        .where(col(SignedReport.study_pk).in_(studies), col(SignedReport.current).is_(True),
               col(SignedReport.status).in_(sorted(SIGNED_STATUSES)))
        .order_by(col(SignedReport.id))
    ).all()]
    for sr in signed:
        rel.signed[(sr.study_pk, sr.language)] = sr  # the newest wins
    if signed:
        deltas = session.execute(
            sa_select(col(ReportDelta.draft_id), col(ReportDelta.signed_report_id), col(ReportDelta.char_edit_distance), col(ReportDelta.percent_edited), col(ReportDelta.chrf), col(ReportDelta.bleu), col(ReportDelta.rouge_l))
            .where(col(ReportDelta.draft_pk).between(lo, hi))
        ).all()
        rel.deltas = {(d[0], d[1]): DeltaRow(*d) for d in deltas}
    return rel


def iter_rows(engine: Engine, settings: ResearchSettings, flt: ExportFilter,
              deid: Deidentifier) -> Iterator[list[dict[str, Any]]]:
    """Batches of export rows, oldest draft first; one short read transaction per batch."""
    last = 0
    while True:
        with Session(engine) as s:
            stmt = (sa_select(*_ROW_COLUMNS)
                    .join(Study, col(Study.id) == col(DraftRecord.study_pk))
                    .join(Patient, col(Patient.id) == col(Study.patient_pk))
                    .where(col(DraftRecord.id) > last)
                    .order_by(col(DraftRecord.id)).limit(settings.batch_rows))
            batch = [DraftRow(*row) for row in s.execute(_filtered(stmt, flt)).all()]
            if not batch:
                return
            rel = _related(s, batch[0].id, batch[-1].id)
            rows = [build_row(r, rel, deid, settings) for r in batch]
            last = batch[-1].id
        yield rows


# -- files -----------------------------------------------------------------------------------

def dictionary_page(settings: ResearchSettings | None = None) -> str:
    """The data dictionary written beside an export (and, without settings, committed in docs/)."""
    head = [
        "# Taqrir research export: data dictionary",
        "",
        "One row per draft version (a study re-drafted after late instances has a row per version).",
        f"Files: `{PARQUET}` (Apache Parquet, zstd) and `{JSONL}` (JSON Lines, UTF-8, the same rows and keys);",
        f"`{MANIFEST}` says when and how the export was made (filters, date policy, row count, SHA-256 of each file).",
        "",
        "Loading it (pandas with pyarrow installed):",
        "",
        "```python",
        "import pandas as pd",
        f'df = pd.read_parquet("OUT/{PARQUET}")                      # list columns load as arrays',
        f'df = pd.read_json("OUT/{JSONL}", lines=True, dtype=False)  # or the JSON Lines',
        'df.groupby(["modality", "review_outcome"]).size()',
        "```",
        "",
        "De-identification: identifiers are keyed hashes (HMAC-SHA256 under `research.pseudonym_key`), never",
        "the identifiers themselves; no names, birth dates, accession numbers, UIDs or descriptions are exported.",
        "Dates follow `research.dates` (none / year / shifted / full); durations (`*_s`) are always kept.",
        "Free text (the `*_findings`, `*_impression` and `signed_*_text` columns) is exported as written",
        "unless `research.include_text` is false.",
        "",
    ]
    if settings is not None:
        head += [f"This export: dates = `{settings.dates}`, include_text = `{settings.include_text}`.", ""]
    return "\n".join(head) + "\n## Columns\n\n" + dictionary_markdown()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int) -> Any:
    """A progress bar on stderr when it is a terminal; a no-op object otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", file=sys.stderr, disable=not sys.stderr.isatty(),
                desc="research export", dynamic_ncols=True)


def export(engine: Engine, settings: ResearchSettings, out_dir: Path, flt: ExportFilter, *,
           actor: str | None = None, overwrite: bool = False) -> ExportSummary:
    """Write the export to ``out_dir`` and record it in the audit trail."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARQUET).exists() and not overwrite:
        raise ResearchError(f"{out_dir} already holds an export ({PARQUET}); choose another folder or pass --overwrite")
    deid = Deidentifier(settings.pseudonym_key.get_secret_value().encode("utf-8"), settings.dates,
                        settings.date_shift_max_days)
    export_id = uuid.uuid4().hex
    actor = actor or f"cli:{getpass.getuser()}"
    t0 = time.perf_counter()
    tmp = {name: out_dir / f".{name}.{export_id[:8]}.tmp" for name in (PARQUET, JSONL)}
    n = 0
    with session_scope(engine) as s:
        total = count_drafts(s, flt)
    try:
        with pq.ParquetWriter(tmp[PARQUET], SCHEMA, compression="zstd") as writer, \
                tmp[JSONL].open("w", encoding="utf-8") as jsonl, _progress(total) as bar:
            for rows in iter_rows(engine, settings, flt, deid):
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
                jsonl.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                n += len(rows)
                bar.update(len(rows))
        for name, path in tmp.items():
            os.replace(path, out_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    (out_dir / DICTIONARY).write_text(dictionary_page(settings), "utf-8")
    files = {name: _sha256(out_dir / name) for name in (PARQUET, JSONL, DICTIONARY)}
    seconds = time.perf_counter() - t0
    manifest = {
        "export_id": export_id, "made_at": utcnow().isoformat(), "rows": n, "filters": flt.describe(),
        "dates": settings.dates, "include_text": settings.include_text, "consistency_checker": CHECKER_VERSION,
        "columns": list(NAMES), "files": files, "seconds": round(seconds, 3),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2), "utf-8")
    with session_scope(engine) as s:
        record(s, action="research.export", actor=actor, entity_type="ResearchExport", entity_id=export_id,
               details={"rows": n, "filters": flt.describe(), "dates": settings.dates,
                        "include_text": settings.include_text, "columns": len(COLUMNS), "files": files})
    log.info("research export %s: %d rows in %.1f s", export_id, n, seconds)
    return ExportSummary(export_id, out_dir, n, seconds, files)




if __name__ == "__main__":  # python -m audit.research.export > docs/research-export.md
    sys.stdout.write(dictionary_page())
