"""The ``taqrir`` command. Subcommands are thin: build settings, engine and services, then call
the room that owns the work."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")

_state: dict[str, Settings] = {}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file.")]


@app.callback()
def _main(config: ConfigOpt = None) -> None:
    """Taqrir: research drafts of bilingual imaging reports. Never a signed clinical report."""
    settings = load_settings(config)
    _state["settings"] = settings
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def get_settings() -> Settings:
    if "settings" not in _state:
        _state["settings"] = load_settings()
    return _state["settings"]


def _engine():  # type: ignore[no-untyped-def]
    from .db import make_engine, upgrade

    engine = make_engine(get_settings().database_url)
    upgrade(engine)
    return engine


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision."""
    from .db import make_engine, upgrade

    settings = get_settings()
    upgrade(make_engine(settings.database_url))
    typer.echo(f"schema up to date at {settings.database_url.split('@')[-1]}")


@app.command()
def listen(
    port: Annotated[Optional[int], typer.Option(help="Override listener.port.")] = None,
    ae_title: Annotated[Optional[str], typer.Option(help="Override listener.ae_title.")] = None,
) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE) until interrupted."""
    from integrations.dicom.listener import Listener
    from integrations.dicom.storage import LocalStorage

    settings = get_settings()
    if port is not None:
        settings.listener.port = port
    if ae_title is not None:
        settings.listener.ae_title = ae_title
    listener = Listener(
        settings=settings.listener,
        study_settings=settings.study,
        engine=_engine(),
        storage=LocalStorage.from_url(settings.storage_url),
        handoff=_handoff(settings),
    )
    bound = listener.start()
    typer.echo(f"Taqrir listening as {settings.listener.ae_title} on port {bound} (Ctrl-C to stop)")
    listener.wait()


def _handoff(settings: Settings):  # type: ignore[no-untyped-def]
    """The function that receives stable studies: the drafting pipeline when it is importable."""
    from integrations.dicom.stability import log_handoff

    try:
        from workers.pipeline import make_handoff
    except ImportError:
        return log_handoff
    return make_handoff(settings)


@app.command()
def studies(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List received studies with their state."""
    from integrations.dicom.index import list_studies

    from .db import session_scope

    with session_scope(_engine()) as session:
        rows = list_studies(session, limit=limit)
    if as_json:
        for study, patient, count, mods in rows:
            typer.echo(json.dumps({
                "study_instance_uid": study.study_instance_uid, "patient_id": patient.patient_id,
                "modalities": mods, "instances": count, "state": study.state, "version": study.version,
                "last_received_at": study.last_received_at.isoformat(), "failure_reason": study.failure_reason,
            }, ensure_ascii=False))
        return
    if not rows:
        typer.echo("no studies received yet")
        return
    typer.echo(f"{'STATE':<10} {'VER':>3} {'INST':>5} {'MODALITY':<10} {'PATIENT':<16} STUDY UID")
    for study, patient, count, mods in rows:
        line = f"{study.state:<10} {study.version:>3} {count:>5} {','.join(mods)[:10]:<10} {patient.patient_id[:16]:<16} {study.study_instance_uid}"
        if study.failure_reason:
            line += f"\n{'':>10} reason: {study.failure_reason[:200]}"
        typer.echo(line)


@app.command("audit-verify")
def audit_verify() -> None:
    """Recompute the audit hash chain and report the first broken record, if any."""
    from audit.chain import verify

    from .db import session_scope

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
    from audit.chain import export_jsonl

    from .db import session_scope

    with session_scope(_engine()) as session, out.open("w", encoding="utf-8") as f:
        n = export_jsonl(session, f)
    typer.echo(f"wrote {n} records to {out}")


def main() -> None:
    app()
