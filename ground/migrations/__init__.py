"""Schema migrations (Alembic). ``taqrir db upgrade`` and :func:`ground.db.upgrade` apply them.

The script folder is this package; revisions live in ``versions/``. Make a new one after changing
a table with ``.venv/bin/python -m taqrir.schema revision -m "what changed"`` (the roof knows every
room's tables; it autogenerates against a scratch SQLite database), then review it by hand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine

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
