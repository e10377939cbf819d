"""Many draft versions in the database at once, for the research-export benchmark and the report's
screenshot: studies of five modalities, drafts with bilingual text (some inconsistent), stage
times, reviews in the audit trail, signed reports and their deltas.

Rows go in with bulk INSERTs (SQLAlchemy core, executemany) in the shapes the pipeline, the FHIR
review and :mod:`audit.signed` store. The texts come from a small pool of EN/AR pairs; their
consistency checks and draft-versus-signed metrics are computed once per pair with the real code
(:func:`reporting.consistency.check_sections`, :func:`audit.deltas.text_delta`) and reused.
Latencies are synthetic (log-normal), not measurements.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from audit.chain import ChainEvent, record_many
from audit.deltas import ReportDelta, text_delta
from audit.signed_report import SignedReport
from ground.db import session_scope
from integrations.dicom.index import Patient, Series, Study
from reporting.consistency import check_sections
from reporting.draft import Sections
from reporting.draft_record import DraftRecord
from tests.factories.drafts import sample_draft

MODALITIES = (("CT", "CHEST", 0.40), ("CR", "CHEST", 0.25), ("MR", "BRAIN", 0.20), ("US", "ABDOMEN", 0.10),
              ("SM", "", 0.05))

# (english, arabic draft, english signed, arabic signed) per modality; the second MR and CT pairs
# have an Arabic that disagrees with the English
TEXTS: dict[str, list[tuple[Sections, Sections, str, str]]] = {
    "CT": [
        (Sections(findings="Small left pleural effusion. No pneumothorax.", impression="Small left pleural effusion."),
         Sections(findings="انصباب جنبي صغير في الجهة اليسرى. لا يوجد استرواح صدري.", impression="انصباب جنبي أيسر صغير."),
         "Small left pleural effusion. No pneumothorax.\nSmall left pleural effusion.",
         "انصباب جنبي صغير في الجهة اليسرى. لا يوجد استرواح صدري.\nانصباب جنبي أيسر صغير."),
        (Sections(findings="A 12 mm nodule in the right upper lobe.", impression="Right upper lobe nodule."),
         Sections(findings="عقيدة بقياس ١٢ ملم في الفص العلوي الأيسر.", impression="عقيدة في الفص العلوي الأيسر."),
         "A 14 mm spiculated nodule in the right upper lobe.\nRight upper lobe nodule, suspicious; CT follow-up.",
         "عقيدة شوكية بقياس ١٤ ملم في الفص العلوي الأيمن.\nعقيدة مشبوهة في الفص العلوي الأيمن."),
    ],
    "CR": [
        (Sections(findings="The lungs are clear. Heart size is normal.", impression="No acute abnormality."),
         Sections(findings="الرئتان صافيتان. حجم القلب طبيعي.", impression="لا يوجد تشوه حاد."),
         "The lungs are clear. Heart size is normal.\nNo acute abnormality.",
         "الرئتان صافيتان. حجم القلب طبيعي.\nلا يوجد تشوه حاد."),
        (Sections(findings="Fracture of the left 7th rib.", impression="Left rib fracture."),
         Sections(findings="كسر في الضلع السابع الأيسر.", impression="كسر في الضلع الأيسر."),
         "Fractures of the left 7th and 8th ribs. No pneumothorax.\nLeft rib fractures.",
         "كسر في الضلعين السابع والثامن الأيسرين. لا يوجد استرواح صدري.\nكسور في الأضلاع اليسرى."),
    ],
    "MR": [
        (Sections(findings="No acute infarct. No hemorrhage.", impression="Normal MRI of the brain."),
         Sections(findings="لا يوجد احتشاء حاد. لا يوجد نزف.", impression="تصوير طبيعي للدماغ."),
         "No acute infarct. No hemorrhage.\nNormal MRI of the brain.",
         "لا يوجد احتشاء حاد. لا يوجد نزف.\nتصوير طبيعي للدماغ."),
        (Sections(findings="Acute infarct in the left frontal lobe.", impression="Acute left frontal infarct."),
         Sections(findings="احتشاء حاد في الفص الجبهي الأيمن.", impression="احتشاء جبهي أيمن حاد."),
         "Acute infarct in the left frontal lobe, 2 cm.\nAcute left frontal infarct.",
         "احتشاء حاد في الفص الجبهي الأيسر بقياس ٢ سم.\nاحتشاء جبهي أيسر حاد."),
    ],
    "US": [
        (Sections(findings="Gallbladder stone measuring 8 mm without wall thickening.", impression="Cholelithiasis."),
         Sections(findings="حصاة في المرارة بقياس ٨ ملم دون تسمك في الجدار.", impression="حصاة مرارية."),
         "Gallbladder stone measuring 8 mm without wall thickening.\nCholelithiasis.",
         "حصاة في المرارة بقياس ٨ ملم دون تسمك في الجدار.\nحصاة مرارية."),
    ],
    "SM": [
        (Sections(findings="Tissue sections without a mass.", impression="No tumor identified."),
         Sections(findings="مقاطع نسيجية بدون كتلة.", impression="لم يتم تحديد ورم."),
         "Tissue sections with a small focus of tumor.\nTumor present.",
         "مقاطع نسيجية مع بؤرة صغيرة من الورم.\nيوجد ورم."),
    ],
}


@dataclass(frozen=True)
class Variant:
    draft_json: str  # with @UID@ / @DID@ placeholders
    consistent: bool
    consistency: str
    signed: tuple[str, str]
    deltas: dict[str, Any]  # lang -> TextDelta


def _variants() -> dict[str, list[Variant]]:
    base = sample_draft()
    out: dict[str, list[Variant]] = {}
    for modality, body, _ in MODALITIES:
        ref = base.study.model_copy(update={
            "study_instance_uid": "@UID@", "modalities": (modality,),
            "series": tuple(s.model_copy(update={"modality": modality, "body_part": body or None,
                                                 "series_instance_uid": "@UID@.1"}) for s in base.study.series[:1]),
        })
        out[modality] = []
        for en, ar, signed_en, signed_ar in TEXTS[modality]:
            sections = {"en": en, "ar": ar}
            d = base.model_copy(update={"draft_id": "@DID@", "study": ref, "sections": sections})
            check = check_sections(sections)  # type: ignore[arg-type]
            whole = {lang: f"{s.findings}\n{s.impression}" for lang, s in sections.items()}
            deltas = {"en": text_delta(whole["en"], signed_en, "en"), "ar": text_delta(whole["ar"], signed_ar, "ar")}
            out[modality].append(Variant(d.model_dump_json(), check.consistent, check.model_dump_json(),
                                         (signed_en, signed_ar), deltas))
    return out


def _chunks(rows: list[dict[str, Any]], n: int = 5000) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def load(engine: Engine, drafts: int, *, seed: int = 7, start: datetime = datetime(2026, 6, 1, tzinfo=UTC),
         days: int = 180, reviewed: float = 0.5, signed: float = 0.6) -> int:
    """Insert ``drafts`` draft versions (and their studies, reviews, signed reports, deltas)."""
    rng = random.Random(seed)
    variants = _variants()
    mods = [m for m, _, _ in MODALITIES]
    weights = [w for _, _, w in MODALITIES]
    n_patients = max(1, drafts // 3)
    patients = [{"id": i + 1, "patient_id": f"BP{i:07d}", "issuer": "", "name": f"BENCH^PATIENT{i}", "sex": "MF"[i % 2],
                 "birth_date": date(1940 + i % 60, 1 + i % 12, 1 + i % 28)} for i in range(n_patients)]
    studies, series, recs, signed_rows, delta_rows, events = [], [], [], [], [], []
    draft_pk = 0
    study_pk = 0
    signed_pk = 0
    while draft_pk < drafts:
        study_pk += 1
        modality = rng.choices(mods, weights)[0]
        uid = f"1.2.826.0.1.3680043.8.498.9{study_pk:09d}"
        arrival = start + timedelta(seconds=rng.uniform(0, days * 86400))
        versions = 2 if rng.random() < 0.1 and draft_pk + 2 <= drafts else 1
        studies.append({"id": study_pk, "study_instance_uid": uid, "patient_pk": rng.randint(1, n_patients),
                        "study_date": arrival.date(), "accession_number": f"BA{study_pk:09d}",
                        "patient_age": f"{rng.randint(18, 95):03d}Y", "state": "drafted", "version": versions,
                        "first_received_at": arrival, "last_received_at": arrival, "state_changed_at": arrival,
                        "attempts": 0})
        series.append({"id": study_pk, "series_instance_uid": f"{uid}.1", "study_pk": study_pk, "modality": modality,
                       "body_part": {m: b for m, b, _ in MODALITIES}[modality] or None, "number": 1})
        variant_ix = rng.randrange(len(variants[modality]))
        v = variants[modality][variant_ix]
        last_rec: dict[str, Any] = {}
        for version in range(1, versions + 1):
            draft_pk += 1
            did = hashlib.sha256(f"{uid}|{version}".encode()).hexdigest()[:32]
            created = arrival + timedelta(seconds=rng.lognormvariate(3.4, 0.5) + 30 * (version - 1))
            model_s = round(rng.lognormvariate(2.9, 0.35), 3)
            times = {"queue_s": round(rng.lognormvariate(-1.0, 0.8), 4), "render_s": round(rng.lognormvariate(-3.5, 0.4), 4),
                     "infer_s": round(model_s * 1.02, 3), "model_latency_s": model_s,
                     "persist_s": round(rng.lognormvariate(-4.5, 0.3), 4), "publish_s": round(rng.lognormvariate(-3.0, 0.4), 4)}
            rid = "dr-" + did[:40]
            last_rec = {"id": draft_pk, "draft_id": did, "study_pk": study_pk, "study_instance_uid": uid, "version": version,
                        "config_sha256": "bench", "superseded": version < versions,
                        "draft_json": v.draft_json.replace("@UID@", uid).replace("@DID@", did),
                        "stage_times": json.dumps(times), "created_at": created, "published_at": created,
                        "fhir_report_id": rid, "consistent": v.consistent, "consistency": v.consistency,
                        "guard": json.dumps({"passed": True, "model_calls": 2 if rng.random() < 0.93 else 3,
                                             "arabic_mode": "translate"})}
            recs.append(last_rec)
        if rng.random() < reviewed:
            action = rng.choices(["accept", "edit", "reject"], [0.55 if v.consistent else 0.2, 0.35, 0.1])[0]
            events.append(ChainEvent(f"fhir.review.{action}", f"reviewer{rng.randint(1, 12)}", "DiagnosticReport",
                                     last_rec["fhir_report_id"], details={"bench": True}))
        if rng.random() < signed:
            signed_at = last_rec["created_at"] + timedelta(hours=rng.lognormvariate(1.5, 0.6))
            unchanged = rng.random() < (0.5 if v.consistent else 0.1)
            for lang, text in zip(("en", "ar"), v.signed, strict=True):
                signed_pk += 1
                if unchanged:
                    s = json.loads(v.draft_json)["sections"][lang]
                    text = f"{s['findings']}\n{s['impression']}"
                signed_rows.append({"id": signed_pk, "study_pk": study_pk, "study_instance_uid": uid,
                                    "accession_number": f"BA{study_pk:09d}", "source": "hl7", "source_id": f"M{signed_pk}",
                                    "source_version": "", "status": "final", "language": lang, "findings": "",
                                    "impression": "", "text": text, "signer_name": None, "signer_id": f"rad{rng.randint(1, 12)}",
                                    "signed_at": signed_at, "received_at": signed_at, "current": True, "raw_ref": None})
                m = v.deltas[lang]
                # a clinician edits more or less of the same draft: the pool pair's figures, jittered
                f = rng.uniform(0.4, 1.4)
                metrics = ({"char_edit_distance": 0.0, "percent_edited": 0.0, "chrf": 100.0, "bleu": 100.0, "rouge_l": 1.0}
                           if unchanged else {"char_edit_distance": min(1.0, m.char_edit_distance * f),
                                              "percent_edited": min(100.0, m.percent_edited * f),
                                              "chrf": max(0.0, 100 - (100 - m.chrf) * f),
                                              "bleu": max(0.0, 100 - (100 - m.bleu) * f),
                                              "rouge_l": max(0.0, 1 - (1 - m.rouge_l) * f)})
                delta_rows.append({"study_pk": study_pk, "draft_pk": last_rec["id"], "draft_id": last_rec["draft_id"],
                                   "draft_version": last_rec["version"], "draft_superseded": False,
                                   "signed_report_id": signed_pk, "signed_current": True, "language": lang,
                                   "draft_chars": 100, "signed_chars": len(text), "review_outcome": "none",
                                   "computed_at": signed_at, **metrics})
    with engine.begin() as conn:
        for table, rows in ((Patient, patients), (Study, studies), (Series, series), (DraftRecord, recs),
                            (SignedReport, signed_rows), (ReportDelta, delta_rows)):
            for chunk in _chunks(rows):
                conn.execute(table.__table__.insert(), chunk)  # type: ignore[attr-defined]
        if conn.dialect.name == "postgresql":
            for table in ("patient", "study", "series", "draft", "signed_report"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT coalesce(max(id), 1) FROM {table}))")
    for i in range(0, len(events), 5000):
        with session_scope(engine) as s:
            record_many(s, events[i:i + 5000])
    # planner statistics, as autovacuum would have gathered them on a database filled over months
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    return len(recs)
