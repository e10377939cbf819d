"""The ``taqrir`` command. Subcommands are thin: build settings, engine and services, then call
the room that owns the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.engine import Engine

from audit.chain import export_jsonl, verify
from audit.deltas import recompute_all
from audit.ship import ShipError
from ground.db import session_scope
from ground.errors import SchemaNotCurrent
from inference.cli import model_app
from integrations.dicom.config import receiving_processes
from integrations.dicom.index import list_studies, study_by_uid
from integrations.dicom.outbox import OutboxState, counts, list_rows, replay
from integrations.hl7.server import Receiver, run
from reporting.consistency import ConsistencyResult
from workers.celery_app import QUEUES, configure, is_embedded
from workers.metrics import render_metrics
from workers.render import NothingRenderable, RenderedStudy, render_study, write_render_output
from workers.service import StudyGone, instance_inputs, reset_for_redraft
from workers.state import consistency_of_current_drafts

from . import wiring
from .cli_api import register
from .demo import DemoError, run_demo
from .logs import configure_logging
from .settings import DEFAULT_DATA_DIR, Settings, load_settings, with_places

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")
research_app = typer.Typer(no_args_is_help=True, help="Research audits: a de-identified export and its report.")
app.add_typer(research_app, name="research")

_state: dict[str, Settings] = {}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder of the embedded defaults (database, storage, keys); default data_dir "
    "(TAQRIR_DATA_DIR).")]
# One way to give a place and a port, in every command that serves: the same option names, the
# settings (listener.host/port, api.host/port) as their defaults.
DicomHostOpt = Annotated[str | None, typer.Option("--dicom-host", help="Address the DICOM listener binds (default listener.host).")]
DicomPortOpt = Annotated[int | None, typer.Option("--dicom-port", help="DICOM listener port (default listener.port).")]
ApiHostOpt = Annotated[str | None, typer.Option("--api-host", help="Address the FHIR API binds (default api.host).")]
ApiPortOpt = Annotated[int | None, typer.Option("--api-port", help="FHIR API port (default api.port).")]


@app.callback()
def _main(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Taqrir: research drafts of bilingual imaging reports. Never a signed clinical report."""
    if config is not None:
        # Processes this one starts (Celery worker children, `serve`'s workers) read it too.
        os.environ["TAQRIR_CONFIG"] = str(config.resolve())
    if data_dir is not None:
        os.environ["TAQRIR_DATA_DIR"] = str(data_dir.resolve())
    settings = load_settings(config)
    _state["settings"] = settings
    configure_logging(settings.log_level, settings.log_format)


def get_settings() -> Settings:
    if "settings" not in _state:
        _state["settings"] = load_settings()
    return _state["settings"]


def _engine() -> Engine:
    """The database, at the schema this Taqrir needs; otherwise the command stops and says to run
    ``taqrir db upgrade`` (only that command, and the demo, migrate)."""
    try:
        return wiring.open_engine(get_settings())
    except SchemaNotCurrent as err:
        typer.echo(f"taqrir: {err}", err=True)
        raise typer.Exit(2) from err


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision."""
    settings = get_settings()
    wiring.migrated_engine(settings).dispose()
    typer.echo(f"schema up to date at {settings.database_url.split('@')[-1]}")


@app.command()
def listen(
    port: Annotated[int | None, typer.Option("--dicom-port", "--port", help="DICOM listener port (default listener.port).")] = None,
    host: Annotated[str | None, typer.Option("--dicom-host", "--host", help="Address to bind (default listener.host).")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Override listener.ae_title.")] = None,
) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) until interrupted."""
    settings = with_places(get_settings(), dicom_host=host, dicom_port=port)
    if ae_title is not None:
        settings.listener.ae_title = ae_title
    # unset: one receiving process per core (an embedded listener, as the demo's, stays at one)
    settings.listener.processes = receiving_processes(settings.listener.processes)
    parts = wiring.receiving(settings, _engine())
    # SIGTERM stops as Ctrl-C does: what was journaled is indexed and the journal closed
    # (integrations.dicom.intake), instead of being left to the next start's replay.
    signal.signal(signal.SIGTERM, lambda signum, frame: parts.listener.request_stop())
    bound = parts.start()
    typer.echo(f"Taqrir listening as {settings.listener.ae_title} on port {bound} with "
               f"{settings.listener.processes} receiving process(es) (Ctrl-C to stop)")
    parts.listener.wait()
    parts.close()


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: render, infer, publish, export.")] = "render,infer,publish,export",
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Run a Celery worker for the drafting pipeline (needs a real broker, e.g. Redis)."""
    settings = get_settings()
    unknown = set(queues.split(",")) - set(QUEUES)
    if unknown:
        raise typer.BadParameter(f"unknown queues {sorted(unknown)}; choose from {QUEUES}")
    if is_embedded(settings.queue):
        raise typer.BadParameter("queue.broker_url is memory:// (embedded): set TAQRIR_QUEUE__BROKER_URL=redis://...")
    _engine().dispose()  # refuse an old schema here, before the pool's children start taking tasks
    wiring.install_worker_context()
    app_ = configure(settings.queue)
    app_.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "--pool", "prefork",
                      "--loglevel", settings.log_level.upper(), "-n", f"taqrir-{queues.replace(',', '-')}@%h"])


@app.command()
def serve(
    workers: Annotated[int, typer.Option(help="Worker processes to start (all queues).")] = 2,
    dicom_host: DicomHostOpt = None,
    dicom_port: DicomPortOpt = None,
    api_host: ApiHostOpt = None,
    api_port: ApiPortOpt = None,
) -> None:
    """Listener, workers and FHIR API together: a single-host install with real Redis."""
    settings = with_places(get_settings(), dicom_host=dicom_host, dicom_port=dicom_port, api_host=api_host,
                           api_port=api_port)
    if is_embedded(settings.queue):
        raise typer.BadParameter("serve needs a real broker: set TAQRIR_QUEUE__BROKER_URL=redis://127.0.0.1:6379/0 "
                                 "(or run `taqrir demo` for the embedded single-process version)")
    engine = _engine()
    # Each worker leads its own process group, so that stopping it reaches its pool children too
    # (Celery's prefork pool), even if the worker itself dies without stopping them.
    procs = [subprocess.Popen([sys.executable, "-m", "taqrir", "worker", "--queues", "render,infer,publish,export"],
                              start_new_session=True)
             for _ in range(workers)]
    parts = wiring.receiving(settings, engine)
    # SIGTERM (systemd, docker, kill) ends serve as Ctrl-C does: through the finally below, which
    # stops every child. Without a handler the process would die at once and leave its workers
    # running, still connected to the broker.
    signal.signal(signal.SIGTERM, lambda signum, frame: parts.listener.request_stop())
    try:
        port = parts.start()
        api = wiring.start_api(wiring.api_app(settings, engine, metrics=True), host=settings.api.host,
                               port=settings.api.port, log_level=settings.log_level.lower())
        typer.echo(f"Taqrir serving: DICOM {settings.listener.ae_title}@{port}, FHIR {settings.api.base_url}, "
                   f"{workers} worker(s), metrics at /metrics (Ctrl-C or SIGTERM to stop)")
        parts.listener.wait()
        parts.stop_background()
        api.stop(timeout=10)
    finally:
        parts.listener.stop()
        stop_process_groups(procs, grace_s=settings.queue.shutdown_grace_s)
        parts.dispatcher.close()


def stop_process_groups(procs: list[subprocess.Popen[bytes]], *, grace_s: float) -> None:
    """SIGTERM each child's process group (a Celery worker and its pool: a warm shutdown that
    lets running tasks finish), wait up to ``grace_s`` seconds, then SIGKILL what is left."""
    def signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    for p in procs:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        signal_group(p, signal.SIGKILL)  # the worker if it hung, and any pool child it left behind
        p.wait()


@app.command()
def redraft(study_uid: Annotated[str, typer.Argument(help="Study Instance UID (see `taqrir studies`).")]) -> None:
    """Replay drafting of a failed (or drafted) study's current version; retries a failed publish."""
    settings = get_settings()
    engine = _engine()
    try:
        version, moved = reset_for_redraft(engine, study_uid)
    except StudyGone as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    if not moved:
        typer.echo(f"study {study_uid} is receiving, or drafting is under way; nothing to replay now")
        return
    dispatcher = wiring.dispatcher(settings, engine)
    dispatcher.resend(study_uid, version, "render")
    dispatcher.wait_idle()
    dispatcher.close()
    typer.echo(f"study {study_uid} version {version} sent for drafting again")


@app.command()
def render(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID in the index.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the key images and provenance.json.")],
) -> None:
    """Render a received study's key images to a folder, to look at what the model sees."""
    settings = get_settings()
    engine = _engine()
    ctx = wiring.pipeline_context(settings, engine)
    with session_scope(engine) as session:
        study = study_by_uid(session, study_uid)
        if study is None:
            typer.echo(f"study {study_uid} is not in the index; see `taqrir studies`", err=True)
            raise typer.Exit(2)
        inputs = instance_inputs(ctx, session, study)
    try:
        rendered = render_study(inputs, settings.render)
    except NothingRenderable as err:
        # Say why, and leave the same provenance.json a render writes (decisions, failures,
        # skipped instances) for whoever looks into it; exit 1 so scripts notice.
        path = write_render_output(err.rendered or RenderedStudy(), out_dir)
        typer.echo(f"nothing renderable in study {study_uid}:", err=True)
        result = err.rendered
        reasons = [f"  series {d.series_instance_uid}: {d.reason}" for d in result.decisions] if result else []
        reasons += [f"  instance {sop}: {why}" for _, sop, why in (result.skipped if result else [])]
        typer.echo("\n".join(reasons or ["  the study has no instances"]), err=True)
        typer.echo(f"reasons written to {path}", err=True)
        raise typer.Exit(1) from None
    path = write_render_output(rendered, out_dir)
    typer.echo(f"key images and provenance written to {path.parent}")


@app.command()
def metrics() -> None:
    """Print the pipeline metrics in Prometheus text format."""
    typer.echo(render_metrics(_engine()).decode(), nl=False)


@app.command()
def demo(
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder for the demo's database, storage and drafts (default: data_dir when set, as "
        "TAQRIR_DATA_DIR or `taqrir --data-dir`; else ./taqrir-demo).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep what an earlier demo left in data_dir.")] = False,
    dicom_port: DicomPortOpt = None,
    api_port: ApiPortOpt = None,
) -> None:
    """The end-to-end demo: real DICOM studies over the network to drafts as FHIR JSON and DICOM SR/PDF/KOS."""
    settings = get_settings()
    if data_dir is None:
        data_dir = settings.data_dir if settings.data_dir != DEFAULT_DATA_DIR else Path("taqrir-demo")
    try:
        code = run_demo(data_dir=data_dir, keep=keep, dicom_port=dicom_port, api_port=api_port)
    except DemoError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


app.add_typer(model_app, name="model", help="Checkpoints: prepare a released BiMediX2, make a tiny one, serve one.")
register(app, get_settings, with_places)


@app.command()
def studies(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List received studies with their state."""
    with session_scope(_engine()) as session:
        rows = list_studies(session, limit=limit)
        stored = consistency_of_current_drafts(session, [(st.id or 0, st.version) for st, *_ in rows])
    checks = {pk: ConsistencyResult.model_validate_json(text) if text else None for pk, text in stored.items()}
    if as_json:
        for study, patient, count, mods in rows:
            check = checks.get(study.id or 0)
            typer.echo(json.dumps({
                "study_instance_uid": study.study_instance_uid, "patient_id": patient.patient_id,
                "modalities": mods, "instances": count, "state": study.state, "version": study.version,
                "last_received_at": study.last_received_at.isoformat(), "failure_reason": study.failure_reason,
                "consistency": check.model_dump(mode="json") if check else None,
            }, ensure_ascii=False))
        return
    if not rows:
        typer.echo("no studies received yet")
        return
    typer.echo(f"{'STATE':<10} {'VER':>3} {'INST':>5} {'MODALITY':<10} {'PATIENT':<16} {'EN/AR':<8} STUDY UID")
    for study, patient, count, mods in rows:
        check = checks.get(study.id or 0)
        verdict = "-" if check is None else "ok" if check.consistent else f"{len(check.mismatches)} diff"
        line = (f"{study.state:<10} {study.version:>3} {count:>5} {','.join(mods)[:10]:<10} "
                f"{patient.patient_id[:16]:<16} {verdict:<8} {study.study_instance_uid}")
        if study.failure_reason:
            line += f"\n{'':>10} reason: {study.failure_reason[:200]}"
        if check is not None and not check.consistent:
            for m in check.mismatches[:5]:
                line += (f"\n{'':>10} EN/AR {m.kind} in {m.section}: {m.detail}"
                         + (f" (en: {m.english or '-'} | ar: {m.arabic or '-'})" if m.english or m.arabic else ""))
        typer.echo(line)


@app.command()
def hl7(
    port: Annotated[int | None, typer.Option(help="Override hl7.port.")] = None,
    host: Annotated[str | None, typer.Option(help="Override hl7.host.")] = None,
    replay: Annotated[bool, typer.Option("--replay", help="Process the kept, refused messages again and exit.")] = False,
) -> None:
    """Receive signed reports from the RIS: HL7 v2 ORU^R01 over MLLP (answers AA/AE/AR)."""
    settings = get_settings()
    if port is not None:
        settings.hl7.port = port
    if host is not None:
        settings.hl7.host = host
    engine = _engine()
    if replay:
        counts = Receiver(settings.hl7, engine).replay()
        typer.echo("replayed: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing to replay"))
        return
    run(settings.hl7, engine)


@app.command()
def deltas() -> None:
    """Recompute every draft-versus-signed delta (idempotent; e.g. after late reviews)."""
    studies, rows = recompute_all(_engine())
    typer.echo(f"recomputed {rows} deltas of {studies} studies with a signed report")


outbox_app = typer.Typer(help="Draft objects queued for PACS destinations (C-STORE).", invoke_without_command=True)
app.add_typer(outbox_app, name="outbox")


@outbox_app.callback()
def outbox_list(
    ctx: typer.Context,
    state: Annotated[list[str] | None, typer.Option("--state", "-s", help="Only these states (repeatable): "
                                                     "pending, sending, sent, failed, dead.")] = None,
    limit: Annotated[int, typer.Option(help="How many rows, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List outbox rows: what is pending, failed (retrying), dead (with why) and sent."""
    if ctx.invoked_subcommand is not None:
        return
    bad = set(state or []) - {s.value for s in OutboxState}
    if bad:
        raise typer.BadParameter(f"unknown states {sorted(bad)}")
    with session_scope(_engine()) as session:
        rows = list_rows(session, states=state or [], limit=limit)
        totals = counts(session)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r.model_dump(mode="json"), ensure_ascii=False))
        return
    by_dest: dict[str, dict[str, int]] = {}
    for (dest, st), (n, _attempts) in totals.items():
        by_dest.setdefault(dest, {})[st] = n
    for dest, states in sorted(by_dest.items()):
        typer.echo(f"{dest}: " + ", ".join(f"{n} {st}" for st, n in sorted(states.items())))
    if not rows:
        typer.echo("the outbox is empty" if not totals else "no rows in these states")
        return
    typer.echo(f"{'ID':>6} {'STATE':<8} {'TRIES':>5} {'DESTINATION':<14} {'KIND':<11} {'NEXT TRY (UTC)':<19} SOP INSTANCE UID")
    for r in rows:
        nxt = r.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if r.state in ("pending", "failed") else ""
        typer.echo(f"{r.id:>6} {r.state:<8} {r.attempts:>5} {r.destination[:14]:<14} {r.kind:<11} {nxt:<19} "
                   f"{r.sop_instance_uid}")
        if r.last_error and r.state in ("failed", "dead"):
            typer.echo(f"{'':>6} reason: {r.last_error[:300]}")
        if r.commitment:
            typer.echo(f"{'':>6} storage commitment: {r.commitment}")


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Outbox row ids (see `taqrir outbox`).")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Replay every dead row (after fixing the cause).")] = False,
) -> None:
    """Replay outbox rows now: the named ones, every dead one (--dead), or every failed one."""
    settings = get_settings()
    engine = _engine()
    with session_scope(engine) as session:
        replayed = replay(session, ids=ids or [], dead=dead, actor=f"cli:{os.environ.get('USER', 'unknown')}")
    if not replayed:
        typer.echo("nothing to replay (sent and sending rows are left alone)")
        return
    dispatcher = wiring.dispatcher(settings, engine)
    for row_id in replayed:
        dispatcher.export(row_id)
    dispatcher.wait_idle()
    dispatcher.close()
    typer.echo(f"replayed {len(replayed)} row(s): {', '.join(map(str, replayed))}")


@app.command("audit-verify")
def audit_verify() -> None:
    """Recompute the audit hash chain and report the first broken record, if any."""
    with session_scope(_engine()) as session:
        v = verify(session)
    if v.ok:
        typer.echo(f"audit chain intact: {v.checked} records")
    else:
        typer.echo(f"audit chain BROKEN at record {v.first_bad_seq}: {v.reason}", err=True)
        raise typer.Exit(1)


@app.command("audit-export")
def audit_export(out: Annotated[Path, typer.Argument(help="JSON Lines file to write.")]) -> None:
    """Export the audit trail (with its hashes) for analysis."""
    with session_scope(_engine()) as session, out.open("w", encoding="utf-8") as f:
        n = export_jsonl(session, f)
    typer.echo(f"wrote {n} records to {out}")


@app.command("audit-ship")
def audit_ship(
    once: Annotated[bool, typer.Option("--once", help="Send what is pending, then exit (0 sent/caught up, 1 failed).")] = False,
) -> None:
    """Send the audit trail to the ATNA collector (atna.*) as RFC 5424 syslog over TLS, from its cursor."""
    settings = get_settings()
    if not settings.atna.host:
        raise typer.BadParameter("set atna.host (TAQRIR_ATNA__HOST) to the collector; see README 'For auditors'")
    shipper = wiring.atna_shipper(settings, _engine())
    if once:
        try:
            n = shipper.ship_all()
        except ShipError as err:
            typer.echo(f"ATNA shipping to {settings.atna.collector} failed ({'permanent' if err.permanent else 'transient'}): "
                       f"{err}", err=True)
            raise typer.Exit(1) from err
        typer.echo(f"sent {n} audit records to {settings.atna.collector}; caught up")
        return
    typer.echo(f"shipping the audit trail to {settings.atna.collector} (Ctrl-C to stop)")
    try:
        shipper.run()
    except KeyboardInterrupt:
        shipper.stop()


@research_app.command("export")
def research_export(
    out: Annotated[Path, typer.Argument(help="Folder for drafts.parquet, drafts.jsonl, the data dictionary and manifest.")],
    since: Annotated[str | None, typer.Option(help="Only drafts made at or after this ISO date or date-time (UTC).")] = None,
    modality: Annotated[str | None, typer.Option(help="Only studies with a series of this modality (e.g. CT).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an export already in OUT.")] = False,
) -> None:
    """Export every draft version, de-identified, as Parquet and JSON Lines (one row per version)."""
    # Imported here (not for a cycle): the research export and report bring pyarrow, pandas and
    # matplotlib, about 0.7 s of CPU that every other `taqrir` command would pay at start
    # (`taqrir --help`, measured with everything at the top: 3.8 s CPU; with these two here: 3.1 s).
    from audit.research.export import ExportFilter, ResearchError, export, parse_since

    settings = get_settings()
    try:
        summary = export(_engine(), settings.research, out, ExportFilter(parse_since(since), modality),
                         overwrite=overwrite)
    except ResearchError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    typer.echo(f"exported {summary.rows} draft versions to {out} in {summary.seconds:.1f} s "
               f"(export {summary.export_id}; data dictionary in {out / 'data-dictionary.md'})")


@research_app.command("report")
def research_report(
    out: Annotated[Path, typer.Argument(help="Folder of a research export; report.html is written there.")],
) -> None:
    """One self-contained HTML page of plots (acceptance, edits, latency, consistency, volume)."""
    # Imported here for the start-up cost only: see research_export.
    from audit.research.export import ResearchError
    from audit.research.report import write_report

    try:
        summary = write_report(_engine(), out)
    except ResearchError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err
    typer.echo(f"report of {summary.rows} draft versions written to {summary.path}")


def main() -> None:
    app()
