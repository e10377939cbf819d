"""The drafting pipeline's service functions: what each stage does, free of Celery.

Tasks (``workers.tasks``) are thin shells over these. Every function takes the study by its
Instance UID and version, checks that this version is still the one to work on, does its work
idempotently (a redelivered or duplicated message finds the work done and moves on), and moves
the study's state with a compare-and-set, audited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select, update

from audit.chain import record
from audit.deltas import compute_study_deltas
from ground.clock import as_utc, utcnow
from ground.db import session_scope, writer_lock
from ground.errors import PermanentError
from inference.backend import InferenceBackend, make_backend
from inference.drafting import draft_report
from inference.types import BilingualReport, StudyContext
from integrations.dicom.export import deliver
from integrations.dicom.index import Patient, Study, study_by_uid, study_contents
from integrations.dicom.lifecycle import (
    ACTIVE,
    StudyEvent,
    StudyState,
    claim_stale,
    count_attempt,
    heartbeat,
    reset_attempts,
    transition,
)
from integrations.dicom.outbox import expire_commitments, rows_of_draft, take_due, with_siblings
from integrations.fhir.store import fetch_current, publish_draft
from reporting.consistency import check_sections
from reporting.draft import (
    Draft,
    KeyImageRef,
    ModelProvenance,
    PatientRef,
    Sections,
    SeriesRef,
    StudyRef,
)
from reporting.draft_record import DraftRecord
from reporting.fhir.ids import patient_id
from storage import Storage, key_component, open_storage, write_atomic
from workers.config import PipelineSettings
from workers.dicom_objects import locate_inputs, write_draft_objects
from workers.exports import enqueue_export, export_dir
from workers.render import InstanceInput, RenderedStudy, instance_input, render_files, render_study
from workers.render.output import provenance
from workers.state import KeyImageSet

log = logging.getLogger(__name__)

ACTOR = "taqrir-pipeline"


class StudyGone(PermanentError):
    """The study or version a message names no longer needs work (deleted, or superseded)."""


@dataclass
class PipelineContext:
    """Everything the stages need, built once per process by the entry point."""

    settings: PipelineSettings
    engine: Engine
    storage: Storage
    backend_factory: Callable[[], InferenceBackend] | None = None
    _backend: InferenceBackend | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: PipelineSettings, engine: Engine) -> PipelineContext:
        return cls(settings=settings, engine=engine, storage=open_storage(settings.storage_url))

    def backend(self) -> InferenceBackend:
        """The inference backend, made on first use (a model loads once per worker process)."""
        with self._lock:
            if self._backend is None:
                factory = self.backend_factory or (
                    lambda: make_backend(self.settings.inference, data_dir=self.settings.data_dir)
                )
                self._backend = factory()
            return self._backend

    @property
    def config_sha256(self) -> str:
        """Identity of the pipeline configuration: a draft is unique per study version and this.

        Only settings that change what a draft says take part (rendering, which model, prompts,
        sampling, guards), so render hosts and inference hosts agree although their operational
        settings (devices, timeouts, credentials, URLs) differ.
        """
        payload = {
            "render": self.settings.render.model_dump(mode="json", exclude={"rules_file"}),
            "rules": _file_sha256(self.settings.render.rules_file),
            "inference": self.settings.inference.model_dump(mode="json", include=DRAFT_AFFECTING_INFERENCE),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


#: Inference settings that change a draft's content (see PipelineContext.config_sha256).
DRAFT_AFFECTING_INFERENCE = {
    "backend", "model_name", "structured_output", "temperature", "top_p", "max_new_tokens", "seed",
    "arabic_mode", "english_script", "arabic_min_ratio", "max_section_chars", "prompt_version",
    "tiny_max_new_tokens",
}


def _file_sha256(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.exists() else None


def draft_id_for(study_uid: str, version: int, config_sha256: str) -> str:
    return hashlib.sha256(f"{study_uid}|{version}|{config_sha256}".encode()).hexdigest()[:32]


# -- helpers -------------------------------------------------------------------------------

def _current(session: Session, study_uid: str, version: int) -> Study:
    study = study_by_uid(session, study_uid)
    if study is None:
        raise StudyGone(f"study {study_uid} is not in the index")
    if study.version != version:
        raise StudyGone(f"study {study_uid} version {version} was superseded by version {study.version}")
    return study


def _move(session: Session, study: Study, event: StudyEvent, **details: Any) -> bool:
    """The lifecycle's compare-and-set of ``event`` on this version, audited (False: the study
    moved on)."""
    return transition(session, study_pk=study.id or 0, study_uid=study.study_instance_uid, version=study.version,
                      event=event, actor=ACTOR, reason=details.get("reason"), details=details)


def enqueue_state(engine: Engine, study_uid: str, version: int) -> bool:
    """stable -> queued (audited). False when the study moved on meanwhile."""
    with session_scope(engine) as s:
        try:
            study = _current(s, study_uid, version)
        except StudyGone:
            return False
        return _move(s, study, StudyEvent.enqueue)


def fail(engine: Engine, study_uid: str, version: int, reason: str) -> None:
    """End this version in ``failed`` with its reason (shown by ``taqrir studies``)."""
    with session_scope(engine) as s:
        try:
            study = _current(s, study_uid, version)
        except StudyGone:
            return
        _move(s, study, StudyEvent.fail, reason=reason[:2000])
    log.warning("study %s v%d failed: %s", study_uid, version, reason[:300])


def instance_inputs(ctx: PipelineContext, session: Session, study: Study) -> list[InstanceInput]:
    """Index rows -> the renderer's input, without reading a single header from disk."""
    return [instance_input(ctx.storage.path(r.storage_key), series, r)
            for series, rows in study_contents(session, study.id or 0) for r in rows]


# -- stage 1: render -------------------------------------------------------------------------

def _count_attempt(session: Session, study: Study, cap: int) -> None:
    """Every stage start counts (the lifecycle's :func:`count_attempt`)."""
    count_attempt(session, study_pk=study.id or 0, version=study.version, attempts=study.attempts, cap=cap)


def _attempt_cap(ctx: PipelineContext) -> int:
    return 3 * (ctx.settings.queue.max_retries + 2)


def render_stage(ctx: PipelineContext, study_uid: str, version: int) -> bool:
    """Render key images for this version (once). True when inference should follow."""
    cfg = ctx.config_sha256
    with session_scope(ctx.engine) as s:
        study = _current(s, study_uid, version)
        if StudyState(study.state) not in ACTIVE:
            raise StudyGone(f"study {study_uid} v{version} is {study.state}: nothing to render")
        done = s.exec(select(KeyImageSet.id).where(KeyImageSet.study_pk == study.id, KeyImageSet.version == version,
                                                   KeyImageSet.config_sha256 == cfg)).first()
        if done is not None:
            return True
        _count_attempt(s, study, _attempt_cap(ctx))
        queue_s = max((utcnow() - as_utc(study.state_changed_at)).total_seconds(), 0.0) \
            if study.state == StudyState.queued.value else 0.0
        _move(s, study, StudyEvent.render)
        inputs = instance_inputs(ctx, s, study)
        study_pk = study.id or 0
    t0 = time.perf_counter()
    rendered: RenderedStudy = render_study(inputs, ctx.settings.render)  # NothingRenderable is permanent
    folder = key_images_folder(study_uid, version, cfg)
    # One folder, all or nothing: a concurrent delivery never sees half-written PNGs, and the
    # first complete set wins (storage.put_folder).
    names = ctx.storage.put_folder(folder, render_files(rendered))
    render_s = time.perf_counter() - t0
    manifest = provenance(rendered, [n for n in names if n.endswith(".png")])
    with session_scope(ctx.engine) as s:
        try:
            with s.begin_nested():
                s.add(KeyImageSet(study_pk=study_pk, version=version, config_sha256=cfg, folder_key=folder,
                                  manifest=json.dumps(manifest, ensure_ascii=False), render_s=render_s,
                                  queue_s=queue_s))
        except IntegrityError:
            log.info("key images of %s v%d were rendered by another delivery", study_uid, version)
            return True
        record(s, action="study.rendered", actor=ACTOR, entity_type="Study", entity_id=study_uid,
               details={"version": version, "key_images": len(rendered.key_images), "render_s": round(render_s, 4),
                        "decisions": manifest["decisions"], "failures": manifest["failures"]})
    return True


# -- stage 2: infer and persist --------------------------------------------------------------

def _study_ref(session: Session, study: Study) -> StudyRef:
    patient = session.get(Patient, study.patient_pk)
    assert patient is not None
    series = []
    for s, rows in study_contents(session, study.id or 0):
        series.append(SeriesRef(series_instance_uid=s.series_instance_uid, modality=s.modality, body_part=s.body_part,
                                description=s.description, number=s.number, instance_count=len(rows),
                                sop_class_uids=tuple(sorted({r.sop_class_uid for r in rows}))))
    started = datetime.combine(study.study_date, study.study_time) if study.study_date and study.study_time else (
        datetime.combine(study.study_date, datetime.min.time()) if study.study_date else None)
    return StudyRef(
        study_instance_uid=study.study_instance_uid, version=study.version, accession_number=study.accession_number,
        started=started, description=study.description,
        modalities=tuple(sorted({s.modality for s in series if s.modality})),
        patient=PatientRef(patient_id=patient.patient_id, issuer=patient.issuer or None, name=patient.name,
                           sex=patient.sex if patient.sex in ("M", "F", "O") else None,  # type: ignore[arg-type]
                           birth_date=patient.birth_date, age=study.patient_age),
        series=tuple(series),
    )


def _context(ref: StudyRef, manifest: dict[str, Any]) -> StudyContext:
    chosen = {d["series_instance_uid"] for d in manifest["decisions"] if d["chosen"]}
    chosen_series = [s for s in ref.series if s.series_instance_uid in chosen] or list(ref.series)
    primary = chosen_series[0]
    return StudyContext(
        modality=primary.modality or (ref.modalities[0] if ref.modalities else "OT"),
        body_part=primary.body_part,
        study_description=ref.description,
        series_descriptions=[s.description for s in chosen_series if s.description],
        patient_age=ref.patient.age,
        patient_sex=ref.patient.sex,
        image_labels=[ki["label"] for ki in manifest["key_images"]],
    )


def build_draft(draft_id: str, ref: StudyRef, report: BilingualReport, manifest: dict[str, Any], cfg: str) -> Draft:
    """The Draft domain object from the index, the key images and the model's answer (pure)."""
    p = report.provenance
    return Draft(
        draft_id=draft_id,
        study=ref,
        sections={
            "en": Sections(findings=report.english.findings, impression=report.english.impression),
            "ar": Sections(findings=report.arabic.findings, impression=report.arabic.impression),
        },
        key_images=tuple(
            KeyImageRef(series_instance_uid=ki["series_instance_uid"], sop_instance_uids=tuple(ki["sop_instance_uids"]),
                        sop_class_uid=ki["sop_class_uid"], frames=tuple(ki["frames"]), label=ki["label"],
                        sha256=ki["sha256"], window=ki["window"])
            for ki in manifest["key_images"]
        ),
        model=ModelProvenance(
            backend=p.backend, model_name=p.model_name, model_revision=p.model_revision,
            prompt_template_id=p.prompt_template_id, prompt_template_sha256=p.prompt_template_sha256,
            sampling={k: v for k, v in p.sampling.items() if isinstance(v, (int, float, str)) or v is None},
            image_sha256=tuple(p.image_sha256), prompt_tokens=p.prompt_tokens,
            completion_tokens=p.completion_tokens, latency_s=p.latency_s,
        ),
        created_at=utcnow(),
        pipeline_config_sha256=cfg,
    )


@contextmanager
def _heartbeat(engine: Engine, study_pk: int, version: int, every_s: float) -> Iterator[None]:
    """While a long stage runs, keep its state timestamp fresh so the recovery sweep does not
    mistake it for lost work (and start a duplicate inference on busy GPUs)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                with session_scope(engine) as s:
                    heartbeat(s, study_pk=study_pk, version=version, state=StudyState.inferring)
            except Exception:
                log.warning("heartbeat for study %d v%d failed", study_pk, version)

    thread = threading.Thread(target=beat, name="taqrir-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def infer_stage(ctx: PipelineContext, study_uid: str, version: int) -> str:
    """Ask the model for this version's draft and store it (once). Returns the draft id."""
    cfg = ctx.config_sha256
    draft_id = draft_id_for(study_uid, version, cfg)
    with session_scope(ctx.engine) as s:
        study = _current(s, study_uid, version)
        if s.exec(select(DraftRecord.id).where(DraftRecord.draft_id == draft_id)).first() is not None:
            _move(s, study, StudyEvent.draft_found)
            return draft_id
        if StudyState(study.state) not in ACTIVE:
            raise StudyGone(f"study {study_uid} v{version} is {study.state}: nothing to infer")
        kis = s.exec(select(KeyImageSet).where(KeyImageSet.study_pk == study.id, KeyImageSet.version == version,
                                               KeyImageSet.config_sha256 == cfg)).first()
        if kis is None:
            raise PermanentError(
                f"no key images for {study_uid} v{version} with pipeline configuration {cfg[:12]}: render "
                "and inference hosts must share storage and draft-affecting settings"
            )
        _count_attempt(s, study, _attempt_cap(ctx))
        _move(s, study, StudyEvent.infer)
        ref = _study_ref(s, study)
        study_pk = study.id or 0
        manifest = json.loads(kis.manifest)
        folder, render_s, queue_s = kis.folder_key, kis.render_s, kis.queue_s
    images = [ctx.storage.read(f"{folder}/{ki['file']}") for ki in manifest["key_images"]]
    t0 = time.perf_counter()
    with _heartbeat(ctx.engine, study_pk, version, max(ctx.settings.queue.requeue_after / 3, 1.0)):
        report = draft_report(ctx.backend(), images, _context(ref, manifest), ctx.settings.inference)
    infer_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    draft = build_draft(draft_id, ref, report, manifest, cfg)
    checks = draft_checks(draft, report)
    with session_scope(ctx.engine) as s:
        study = _current(s, study_uid, version)
        if not _move(s, study, StudyEvent.drafted, draft_id=draft_id):
            # another delivery finished (or failed) this version meanwhile: store nothing
            raise StudyGone(f"study {study_uid} v{version} is {study.state}; this delivery's draft is dropped")
        try:
            with s.begin_nested():
                s.add(DraftRecord(draft_id=draft_id, study_pk=study_pk, study_instance_uid=study_uid,
                                  version=version, config_sha256=cfg, draft_json=draft.model_dump_json(),
                                  stage_times=json.dumps({"queue_s": queue_s, "render_s": render_s,
                                                          "infer_s": infer_s,
                                                          "model_latency_s": report.provenance.latency_s}),
                                  **checks))
        except IntegrityError:
            log.info("draft %s already stored by another delivery", draft_id)
            return draft_id
        # Older versions' drafts are superseded when this draft is *published* (publish_stage), with
        # their FHIR reports in the same transaction: until then they are what integrators see.
        reset_attempts(s, study_pk=study_pk)
        record(s, action="draft.created", actor=ACTOR, entity_type="Draft", entity_id=draft_id,
               details={"study": study_uid, "version": version, "model": draft.model.model_name,
                        "model_revision": draft.model.model_revision, "backend": draft.model.backend,
                        "prompt_template": draft.model.prompt_template_id,
                        "prompt_sha256": draft.model.prompt_template_sha256,
                        "images": list(draft.model.image_sha256), "sampling": draft.model.sampling,
                        "tokens": [draft.model.prompt_tokens, draft.model.completion_tokens],
                        "consistent": checks["consistent"]})
        # a signed report that came back before this draft (or for an older version) is compared now
        compute_study_deltas(s, study_pk)
    _add_stage_time(ctx.engine, draft_id, persist_s=time.perf_counter() - t1)
    return draft_id


def _supersede_older(s: Session, study_pk: int, study_uid: str, version: int, by_draft_id: str) -> None:
    """Mark the drafts of older versions of the study superseded by ``by_draft_id``, audited (in
    the transaction that publishes ``by_draft_id``, which supersedes their FHIR reports too)."""
    older = s.exec(select(DraftRecord).where(col(DraftRecord.study_pk) == study_pk, col(DraftRecord.version) < version,
                                             col(DraftRecord.superseded).is_(False))).all()
    for rec in older:
        rec.superseded = True
        s.add(rec)
        record(s, action="draft.superseded", actor=ACTOR, entity_type="Draft", entity_id=rec.draft_id,
               details={"study": study_uid, "version": rec.version, "by_draft": by_draft_id, "by_version": version})


def draft_checks(draft: Draft, report: BilingualReport) -> dict[str, Any]:
    """What is stored with every draft about its text (pure): the bilingual consistency check of
    its sections (reporting.consistency) and the output guard's result (a stored draft passed it;
    ``model_calls`` above two means a language was rejected once and drawn again)."""
    result = check_sections(draft.sections)
    guard = {"passed": True, "model_calls": report.provenance.attempts, "arabic_mode": report.provenance.arabic_mode}
    return {"consistent": result.consistent, "consistency": result.model_dump_json(), "guard": json.dumps(guard)}


def record_rejected_output(ctx: PipelineContext, study_uid: str, version: int, reason: str,
                           raw_outputs: Sequence[str]) -> str:
    """Keep what the model said when its output was rejected (for researchers), as a file in
    storage referenced from the audit trail. Returns the storage key."""
    key = f"rejected/{key_component(study_uid)}/v{version}-{uuid.uuid4().hex[:8]}.json"
    body = json.dumps({"study": study_uid, "version": version, "reason": reason, "raw_outputs": list(raw_outputs)},
                      ensure_ascii=False, indent=2).encode()
    ctx.storage.put(key, body)
    with session_scope(ctx.engine) as s:
        record(s, action="draft.rejected", actor=ACTOR, entity_type="Study", entity_id=study_uid,
               outcome="failure", details={"version": version, "reason": reason[:500], "outputs_key": key,
                                           "outputs_sha256": hashlib.sha256(body).hexdigest()})
    return key


def _add_stage_time(engine: Engine, draft_id: str, **times: float) -> None:
    with session_scope(engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == draft_id)).one()
        merged = {**json.loads(rec.stage_times), **times}
        rec.stage_times = json.dumps(merged)
        s.add(rec)


# -- stage 3: publish ------------------------------------------------------------------------

def publish_stage(ctx: PipelineContext, draft_id: str) -> str | None:
    """Make the draft available as FHIR resources, JSON files and DICOM objects (once). Returns
    the report id.

    Order: resources (idempotent), then the files (atomically: JSON, then ``sr.dcm``,
    ``report.pdf``, ``kos.dcm`` beside them and the DICOM files in storage), then the export
    outbox rows and ``published_at`` in one transaction; a crash anywhere leaves the draft
    unpublished, and the sweep publishes it again (same UIDs, same files).
    """
    objects_on = ctx.settings.dicom_objects.enabled
    t0 = time.perf_counter()
    with session_scope(ctx.engine) as s:
        rec = s.exec(select(DraftRecord).where(DraftRecord.draft_id == draft_id)).first()
        if rec is None:
            raise StudyGone(f"draft {draft_id} does not exist")
        if rec.published_at is not None:
            return rec.fhir_report_id
        if rec.superseded:
            raise StudyGone(f"draft {draft_id} was superseded by a newer study version; not published")
        draft = Draft.model_validate_json(rec.draft_json)
        # In one transaction: this draft's resources, the older versions' drafts marked superseded
        # and their FHIR reports superseded (cancelled, linked to this one, with a Provenance:
        # integrations.fhir.store.publish_draft), each audited (issue 11, item 10).
        report_id = publish_draft(s, draft, actor=ACTOR)
        _supersede_older(s, rec.study_pk, rec.study_instance_uid, rec.version, draft_id)
        resources = {rt: fetch_current(s, rt, rid).json_text for rt, rid in _published_ids(draft, report_id)}
        inputs = locate_inputs(ctx.storage, s, draft) if objects_on else None  # files are read below
    out = export_dir(ctx.settings, draft)
    out.mkdir(parents=True, exist_ok=True)
    files = {"draft.json": draft.model_dump_json(indent=2)}
    files.update({f"{rt}.json": json.dumps(json.loads(text), indent=2, ensure_ascii=False) for rt, text in resources.items()})
    for name, text in files.items():
        write_atomic(out / name, text.encode())
    # DICOM SR, report PDF and KOS (issue 13): built and written (deterministically, so a rerun
    # rewrites the same files) before the draft is marked published; queued for export in the
    # same transaction as that mark.
    objects = write_draft_objects(ctx.settings, ctx.storage, draft, inputs, out) if inputs is not None else None
    with session_scope(ctx.engine) as s:
        if objects is not None and objects.written:
            enqueue_export(s, ctx.settings, draft, objects.written)
            details: dict[str, object] = {"study": draft.study.study_instance_uid,
                                          "objects": {o.kind: o.sop_instance_uid for o in objects.written}}
            if objects.skipped:
                details["skipped"] = objects.skipped
            record(s, action="draft.dicom_objects", actor=ACTOR, entity_type="Draft", entity_id=draft_id,
                   details=details)
        s.exec(update(DraftRecord).where(col(DraftRecord.draft_id) == draft_id)
               .values(published_at=utcnow(), fhir_report_id=report_id, publish_error=None))
    _add_stage_time(ctx.engine, draft_id, publish_s=time.perf_counter() - t0)
    return report_id


def publish_failed(engine: Engine, draft_id: str, reason: str) -> None:
    """A publish that cannot succeed as is: recorded on the draft (the sweep stops resending it;
    ``taqrir redraft`` tries again)."""
    with session_scope(engine) as s:
        s.exec(update(DraftRecord).where(col(DraftRecord.draft_id) == draft_id)
               .values(publish_error=reason[:2000]))
        record(s, action="draft.publish_failed", actor=ACTOR, entity_type="Draft", entity_id=draft_id,
               outcome="failure", details={"reason": reason[:500]})
    log.error("publishing draft %s failed: %s", draft_id, reason[:300])


def _published_ids(draft: Draft, report_id: str) -> list[tuple[str, str]]:
    return [("DiagnosticReport", report_id), ("Patient", patient_id(draft.study.patient))]


def key_images_folder(study_uid: str, version: int, config_sha256: str) -> str:
    """Storage key of a study version's key-image folder (PNGs and ``provenance.json``)."""
    return f"keyimages/{key_component(study_uid)}/v{version}-{config_sha256[:8]}"


# -- stage 4: export to PACS destinations ---------------------------------------------------

def export_stage(ctx: PipelineContext, row_id: int) -> str | None:
    """Deliver one outbox row (``integrations.dicom.export``), with the due rows of the same draft
    and destination on the same association; returns the row's new state, None when it was not
    due or another worker holds it. Failures are recorded on the rows, never raised."""
    with session_scope(ctx.engine) as s:
        rows = with_siblings(s, row_id)
    done = deliver(ctx.engine, ctx.settings.export, rows, storage_root=ctx.storage.root)
    return next((d.state.value for d in done if d.row_id == row_id), None)


def exports_of_draft(engine: Engine, draft_id: str) -> list[int]:
    """Outbox rows a publish just queued (sent at once; the sweep covers a lost message)."""
    with session_scope(engine) as s:
        return rows_of_draft(s, draft_id)


def due_exports(ctx: PipelineContext) -> list[int]:
    """Outbox rows whose attempt is due and whose task was not sent recently (the sweep's)."""
    with session_scope(ctx.engine) as s:
        expire_commitments(s, timeout_s=ctx.settings.export.commitment_timeout)
        return take_due(s, lease_s=ctx.settings.export.sending_lease,
                        redispatch_after_s=ctx.settings.queue.requeue_after)


# -- recovery -----------------------------------------------------------------------------

STAGE_OF = {
    StudyState.stable.value: "render",
    StudyState.queued.value: "render",
    StudyState.rendering.value: "render",
    StudyState.inferring.value: "infer",
}


def stale_work(engine: Engine, *, older_than_s: float) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Studies whose stage has not moved for ``older_than_s`` (their message was probably lost:
    Redis restarted, a worker host vanished), and drafts never published. Running stages keep
    their timestamp fresh (heartbeat), so they are not taken for lost. Touches what it returns so
    that concurrent sweepers do not all re-enqueue it."""
    cutoff = utcnow().timestamp() - older_than_s
    studies: list[tuple[str, int, str]] = []
    with session_scope(engine) as s:
        writer_lock(s)  # before reading and claiming study rows (ground.db: lock order)
        rows = s.exec(select(Study).where(col(Study.state).in_(list(STAGE_OF)))).all()
        for st in rows:
            if as_utc(st.state_changed_at).timestamp() > cutoff:
                continue
            if claim_stale(s, study_pk=st.id or 0, state=st.state, seen=st.state_changed_at):
                studies.append((st.study_instance_uid, st.version, STAGE_OF[st.state]))
        pending = s.exec(
            select(DraftRecord).where(col(DraftRecord.published_at).is_(None), col(DraftRecord.publish_error).is_(None),
                                      col(DraftRecord.superseded).is_(False))
        ).all()
        unpublished = []
        for d in pending:
            last = as_utc(d.publish_attempted_at or d.created_at).timestamp()
            if last <= cutoff:
                d.publish_attempted_at = utcnow()
                s.add(d)
                unpublished.append(d.draft_id)
    return studies, unpublished


def reset_for_redraft(engine: Engine, study_uid: str) -> tuple[int, bool]:
    """``taqrir redraft``: a failed or drafted study's current version goes back to ``queued``.
    A drafted version keeps its draft (drafting is idempotent; an unpublished or failed publish is
    tried again); a failed one gets another try. Work in flight is left alone (returns False)."""
    with session_scope(engine) as s:
        study = study_by_uid(s, study_uid)
        if study is None:
            raise StudyGone(f"study {study_uid} is not in the index; see `taqrir studies`")
        moved = _move(s, study, StudyEvent.redraft, redraft=True)  # resets the attempt count
        if moved:
            s.exec(update(DraftRecord).where(col(DraftRecord.study_pk) == study.id, col(DraftRecord.version) == study.version)
                   .values(publish_error=None))
        return study.version, moved
