"""``taqrir api`` and ``taqrir token``: wired into the main CLI by :func:`register`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

import typer
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ground.db import make_engine
from ground.errors import TaqrirError
from taqrir.settings import Settings
from workers.dicom_objects import store_verified_sr

from .app import create_app
from .auth import InvalidScope, issue_token

__all__ = ["api", "create_app", "register", "token"]

log = logging.getLogger(__name__)


class SchemaNotCurrent(TaqrirError):
    """The database's schema is not the one this version of Taqrir needs."""


def check_schema(engine: Engine) -> None:
    """:class:`SchemaNotCurrent` unless the database is at the migrations' head(s) (issue 11,
    item 29: on a never-migrated database the API answered every request 500)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from ground.migrations import alembic_config

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    where = engine.url.render_as_string(hide_password=True).split("@")[-1]
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except SQLAlchemyError as err:
        raise SchemaNotCurrent(f"cannot read the schema version of {where}: {type(err).__name__}; check "
                               "database_url, then run `taqrir db upgrade`") from err
    if not current:
        raise SchemaNotCurrent(f"the database {where} has never been migrated: run `taqrir db upgrade` first")
    if current != heads:
        raise SchemaNotCurrent(f"the database {where} is at schema {', '.join(sorted(current))}, this Taqrir needs "
                               f"{', '.join(sorted(heads))}: run `taqrir db upgrade` (with the newest Taqrir)")


def api(settings: Settings) -> None:
    """Serve the FHIR API with uvicorn on ``api.host:api.port`` (after :func:`check_schema`)."""
    import uvicorn

    engine = make_engine(settings.database_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()

    log.info("FHIR API on %s:%d (base %s), %d worker(s)", settings.api.host, settings.api.port,
             settings.api.base_url, settings.api.workers)
    host, port, level = settings.api.host, settings.api.port, settings.log_level.lower()
    if settings.api.workers > 1:
        # worker processes rebuild settings from the environment (TAQRIR_CONFIG included)
        uvicorn.run("integrations.fhir.asgi:create", factory=True, workers=settings.api.workers,
                    host=host, port=port, log_level=level, access_log=False)
        return
    engine = make_engine(settings.database_url)
    uvicorn.run(create_app(settings, engine, store_verified_sr=store_verified_sr), host=host, port=port, log_level=level, access_log=False)


def token(settings: Settings, user: str, scopes: list[str], *, patient: str | None = None,
          ttl_s: int | None = None, name: str | None = None) -> str:
    """A bearer token for ``user`` signed with the local key (data_dir/api-key)."""
    return issue_token(settings.api, settings.data_dir, user, scopes, patient=patient, ttl_s=ttl_s, name=name)


def register(app: typer.Typer, get_settings: Callable[[], Settings],
             with_places: Callable[..., Settings] | None = None) -> None:
    """Add the ``api`` and ``token`` commands to ``app``. ``with_places`` applies the command
    line's address and port (the roof's one way of doing it, shared with listen/serve/demo)."""

    @app.command("api")
    def api_command(
        host: Annotated[str | None, typer.Option("--api-host", "--host", help="Address to bind (default api.host).")] = None,
        port: Annotated[int | None, typer.Option("--api-port", "--port", help="TCP port (default api.port).")] = None,
    ) -> None:
        """Serve the FHIR R4 API (research drafts)."""
        settings = get_settings()
        if with_places is not None:
            settings = with_places(settings, api_host=host, api_port=port)
        try:
            api(settings)
        except SchemaNotCurrent as err:
            typer.echo(f"taqrir api: {err}", err=True)
            raise typer.Exit(2) from err

    @app.command("token")
    def token_command(
        user: Annotated[str, typer.Argument(help="Subject of the token (the reviewer's user name).")],
        scope: Annotated[list[str], typer.Option("--scope", "-s", help="SMART scope, e.g. user/DiagnosticReport.rs (repeatable).")],
        patient: Annotated[str | None, typer.Option(help="Patient id for patient/ scopes.")] = None,
        ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds (default api.token_ttl_s).")] = None,
        name: Annotated[str | None, typer.Option(help="Display name of the user (shown as reviewer).")] = None,
    ) -> None:
        """Print a bearer token signed with the local HS256 key."""
        scopes = [s for item in scope for s in item.split()]
        try:
            typer.echo(token(get_settings(), user, scopes, patient=patient, ttl_s=ttl, name=name))
        except InvalidScope as err:
            typer.echo(f"taqrir token: {err}", err=True)
            raise typer.Exit(2) from err
