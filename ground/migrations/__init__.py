"""Schema migrations (Alembic). ``taqrir db upgrade`` and :func:`ground.db.upgrade` apply them;
every other entry point only checks, with :func:`require_current`, and refuses an old schema.

The script folder is this package; revisions live in ``versions/``. Make a new one after changing
a table with ``.venv/bin/python -m taqrir.schema revision -m "what changed"`` (the roof knows every
room's tables; it autogenerates against a scratch SQLite database), then review it by hand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ground.errors import SchemaNotCurrent

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None, metadata: MetaData | None = None) -> Config:
    """Alembic's configuration for this script folder; ``metadata`` (every table) is needed only
    to autogenerate a revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if engine is not None:
        cfg.attributes["engine"] = engine
    if metadata is not None:
        cfg.attributes["metadata"] = metadata
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every revision up to ``revision`` on ``engine``'s database."""
    command.upgrade(alembic_config(engine), revision)


def require_current(engine: Engine) -> None:
    """:class:`~ground.errors.SchemaNotCurrent` unless the database is at the migrations' head(s).

    Only ``taqrir db upgrade`` (and the demo, on its own scratch database) migrate: a service that
    migrated on start would change a shared production schema whenever any process of a newer
    version started. On a never-migrated database the API answered every request 500 (issue 11,
    item 29); now every entry point stops first, saying what to run.
    """
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
