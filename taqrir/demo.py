"""``taqrir demo``: the main job end to end on embedded defaults, on one machine, no services.

Real DICOM studies (public test files shipped with the package: ``taqrir/samples/``, provenance in
its PROVENANCE.md) travel over the network (DICOM
C-STORE on loopback) to the listener; studies become stable, key images are rendered, the local
tiny model drafts English and Arabic sections, drafts become FHIR resources served by the API and
written as JSON files and as DICOM objects (a bilingual SR, an encapsulated report PDF and a key
image selection, ``sr.dcm``/``report.pdf``/``kos.dcm`` beside the JSON). The tiny model has random weights: its text is meaningless by design.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydicom import dcmread
from pynetdicom import AE, _config
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from audit.chain import AuditRecord
from ground.db import session_scope
from ground.errors import TaqrirError
from integrations.dicom.index import Patient, Study, list_studies, study_by_uid
from reporting.draft import Draft
from reporting.draft_record import DraftRecord
from workers.exports import export_dir

from . import wiring
from .cli_api import token
from .settings import Settings, load_settings

#: The demo's sample studies, shipped as package data (see PROVENANCE.md and manifest.json there).
SAMPLES = Path(__file__).resolve().parent / "samples" / "dicom"


@dataclass(frozen=True)
class DemoStudy:
    title: str
    paths: tuple[str, ...]


DEMO_STUDIES = (
    DemoStudy("CT chest, 3 axial slices", ("ct/series_dcmqi_ct3slice",)),
    DemoStudy("MR wrist, 16 coronal slices", ("mr/series_dcm4che_wrist",)),
    DemoStudy("CR chest PA (JPEG 2000, MONOCHROME1)", ("cr_dx/wg04_RG1_chest_PA/RG1_J2KI.dcm",)),
    DemoStudy("US echo cine, palette colour", ("us/dcm4che_US-PAL-8-10x-echo.dcm",)),
    DemoStudy("Whole-slide microscopy, 12-level pyramid", ("sm/cmu1_small_region_pyramid",)),
    DemoStudy("Endoscopy photo (RLE)", ("vl_pathology/wg04_VL1_RLE.dcm",)),
    DemoStudy("JPEG XL image no decoder can read (fails on purpose)", ("malformed/dcm4che_will-jxl.dcm",)),
)


def _files(study: DemoStudy) -> list[Path]:
    out: list[Path] = []
    for rel in study.paths:
        p = SAMPLES / rel
        out.extend(sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _files_sent_as_stored() -> Iterator[None]:
    """pynetdicom sends a file path's bytes as they are on disk only while its process-wide
    ``_config.STORE_SEND_CHUNKED_DATASET`` is set; otherwise ``send_c_store(path)`` decodes the
    file with ``dcmread`` and encodes it again (pynetdicom 3.0, ``Association.send_c_store``),
    which changes the bytes of some sample files (the CT series and the palette-colour echo: the
    listener would not receive what is stored) and holds whole datasets in memory. There is no
    per-call option, so the switch is set for the demo's sends only and put back afterwards:
    other senders in the process (the outbox's C-STORE SCU) keep pynetdicom's default."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_files(port: int, files: Sequence[Path], *, called: str = "TAQRIR", calling: str = "DEMO-PACS") -> list[int]:
    """C-STORE files as they are stored (each with its own transfer syntax) in one association."""
    metas = [dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title=calling)
    for pair in sorted({(str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"the listener on port {port} refused the association")
    statuses = []
    try:
        with _files_sent_as_stored():
            for f in files:
                rsp = assoc.send_c_store(f)
                statuses.append(int(rsp.Status) if rsp and "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


class DemoError(TaqrirError):
    """The demo cannot run as asked (its folder holds data it did not make)."""


#: Written into the demo's folder: only a folder holding it is wiped by a later demo.
DEMO_MARKER = ".taqrir-demo"


def prepare_data_dir(data_dir: Path, *, keep: bool) -> None:
    """Empty ``data_dir`` for a fresh demo (unless ``keep``), refusing to wipe a folder that an
    earlier demo did not make: data_dir may come from TAQRIR_DATA_DIR, where real data lives."""
    if data_dir.exists() and not keep and any(data_dir.iterdir()):
        if not (data_dir / DEMO_MARKER).is_file():
            raise DemoError(
                f"{data_dir} holds data that no demo made (no {DEMO_MARKER} in it); the demo would wipe it. "
                "Choose another folder (`taqrir demo --data-dir DIR`, or TAQRIR_DATA_DIR), or pass --keep"
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_MARKER).write_text("made by `taqrir demo`; a later demo may wipe this folder\n", "utf-8")


def run_demo(*, data_dir: Path, keep: bool = False, timeout_s: float = 170.0, dicom_port: int | None = None,
             api_port: int | None = None) -> int:
    t_start = time.monotonic()
    prepare_data_dir(data_dir, keep=keep)
    api_port = api_port or _free_port()
    settings = load_settings(
        data_dir=data_dir,
        log_level="WARNING",
        listener={"host": "127.0.0.1", "port": dicom_port or 0, "min_free_bytes": 0, "ae_title": "TAQRIR"},
        study={"stable_after": 2.0, "sweep_interval": 0.5},
        queue={"broker_url": "memory://"},
        api={"host": "127.0.0.1", "port": api_port, "base_url": f"http://127.0.0.1:{api_port}/fhir"},
    )
    logging.getLogger().setLevel(logging.ERROR)  # the demo reports failures itself
    for noisy in ("pydicom", "transformers"):  # libraries that configure their own handlers
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Imported here, not at the top: transformers costs about a second to import, and every
    # `taqrir` command imports this module; only the demo needs to quieten it.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # transformers is untyped here
    say = print
    say("Taqrir demo: research drafts only, never a clinical report.")
    say(f"  data: {settings.data_dir.resolve()}  (SQLite, local storage, in-process queue, tiny local model)")
    engine = wiring.migrated_engine(settings)  # the demo's own scratch database: it migrates it
    ctx = wiring.pipeline_context(settings, engine)
    say("  preparing the tiny model (random weights; first run builds it)...")
    t0 = time.monotonic()
    ctx.backend()
    say(f"  model ready in {time.monotonic() - t0:.1f}s")
    parts = wiring.receiving(settings, engine, ctx=ctx, signed_srs=False, sweep_every=None, atna=False)
    port = parts.start()
    api = wiring.start_api(wiring.api_app(settings, engine), host="127.0.0.1", port=settings.api.port,
                           log_level="warning", wait_s=20)
    say(f"  DICOM listener: AE TAQRIR on 127.0.0.1:{port}; FHIR API: {settings.api.base_url}")
    say("")
    sent: dict[str, str] = {}
    for demo_study in DEMO_STUDIES:
        files = _files(demo_study)
        statuses = send_files(port, files)
        uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        sent[uid] = demo_study.title
        ok = sum(1 for s in statuses if s == 0)
        say(f"  sent {demo_study.title}: {ok}/{len(files)} instances stored")
    say("")
    say("Drafting (a study is drafted once no instance has arrived for 2 s)...")
    last: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    rows: list[tuple[Study, Patient, int, list[str]]] = []
    while time.monotonic() < deadline:
        with session_scope(engine) as s:
            rows = [r for r in list_studies(s, limit=100) if r[0].study_instance_uid in sent]
        for study, _patient, _n, _mods in rows:
            if last.get(study.study_instance_uid) != study.state:
                last[study.study_instance_uid] = study.state
                say(f"  [{time.monotonic() - t_start:5.1f}s] {sent[study.study_instance_uid][:44]:<44} {study.state}")
        if rows and len(rows) == len(sent) and all(r[0].state in ("drafted", "failed") for r in rows):
            break
        time.sleep(0.3)
    parts.dispatcher.wait_idle()
    _print_results(settings, engine, sent, say)
    bearer = token(settings, "demo-reader", ["user/*.rs"], name="Demo Reader")
    say("")
    say("Read the drafts through the FHIR API (the demo's own API answered this query just now):")
    _show_api(settings.api.base_url, bearer, say)
    say(f"  .venv/bin/taqrir --data-dir {data_dir} api --api-port 8080 &   # or TAQRIR_DATA_DIR={data_dir}")
    say(f"  curl -H 'Authorization: Bearer {bearer}' 'http://127.0.0.1:8080/fhir/DiagnosticReport?_count=5'")
    say("")
    say("About the text: the tiny model has random weights, so its findings are meaningless words (English")
    say("and Arabic script). For real drafts point Taqrir at BiMediX2: TAQRIR_INFERENCE__BACKEND=sglang with")
    say("TAQRIR_INFERENCE__SERVER_URL=http://gpu-host:30000 (see deploy/sglang/), or a local checkpoint")
    say("prepared with `taqrir model prepare` and TAQRIR_INFERENCE__MODEL_PATH=/path/to/BiMediX2-8B-Bi-hf.")
    say(f"Demo finished in {time.monotonic() - t_start:.0f}s.")
    parts.close()
    api.stop(timeout=5)
    with session_scope(engine) as s:
        states = [r[0].state for r in list_studies(s, limit=100) if r[0].study_instance_uid in sent]
    expected_fail = 1
    return 0 if states.count("drafted") == len(sent) - expected_fail and states.count("failed") == expected_fail else 1


def _print_results(settings: Settings, engine: Engine, sent: dict[str, str], say: Callable[[str], None]) -> None:
    say("")
    say("Results:")
    first: Draft | None = None
    skipped: dict[str, str] = {}
    with session_scope(engine) as s:
        for uid, title in sent.items():
            study = study_by_uid(s, uid)
            if study is None:
                say(f"  {title}: not received")
                continue
            rec = s.exec(select(DraftRecord).where(col(DraftRecord.study_instance_uid) == uid)
                         .order_by(col(DraftRecord.version).desc())).first()
            if study.state == "drafted" and rec is not None:
                draft = Draft.model_validate_json(rec.draft_json)
                first = first or draft
                times = json.loads(rec.stage_times)
                say(f"  {title}: drafted from {len(draft.key_images)} key images "
                    f"(render {times.get('render_s', 0):.2f}s, model {times.get('infer_s', 0):.2f}s)")
                out = export_dir(settings, draft)
                say(f"      {out}/  draft.json, DiagnosticReport.json, Patient.json")
                dicom = [n for n in ("sr.dcm", "report.pdf", "kos.dcm") if (out / n).is_file()]
                if dicom:
                    say(f"      {out}/  {', '.join(dicom)}  (DICOM SR, report PDF, key images)")
                for kind, why in _skipped_objects(s, rec.draft_id).items():
                    skipped[kind] = why
            else:
                say(f"  {title}: {study.state}: {(study.failure_reason or '')[:160]}")
    if first is not None:
        say("")
        say("One draft, as stored (FHIR status 'partial', labelled AI-asserted and research-only):")
        say(f"  EN impression: {first.sections['en'].impression[:150]}")
        say(f"  AR impression: {first.sections['ar'].impression[:150]}")
        out = export_dir(settings, first)
        if (out / "sr.dcm").is_file():
            say("The same draft as DICOM objects for the PACS (research-labelled, VerificationFlag UNVERIFIED):")
            say(f"  {out / 'report.pdf'}  (open in any PDF reader; English and Arabic on one page)")
            say(f"  dsrdump {out / 'sr.dcm'}  (the bilingual SR tree); {out / 'kos.dcm'}: the key images")
    for kind, why in skipped.items():
        say(f"Not made on this machine ({kind}): {why}")


def _skipped_objects(s: Session, draft_id: str) -> dict[str, str]:
    """The DICOM objects publishing could not make for a draft, with why (its audit record)."""
    rec = s.exec(select(AuditRecord).where(col(AuditRecord.action) == "draft.dicom_objects",
                                           col(AuditRecord.entity_id) == draft_id)).first()
    skipped = json.loads(rec.details).get("skipped", {}) if rec is not None else {}
    return {str(k): str(v) for k, v in skipped.items()}


def _show_api(base_url: str, bearer: str, say: Callable[[str], None]) -> None:
    try:
        r = httpx.get(f"{base_url}/DiagnosticReport", params={"_count": "3"},
                      headers={"Authorization": f"Bearer {bearer}"}, timeout=10)
        bundle = r.json()
        say(f"  GET DiagnosticReport -> HTTP {r.status_code}: searchset Bundle, total={bundle.get('total')}, first status="
            f"{bundle['entry'][0]['resource']['status'] if bundle.get('entry') else '-'}")
    except (httpx.HTTPError, KeyError, ValueError) as err:
        say(f"  (the API did not answer: {err})")
