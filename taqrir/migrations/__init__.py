"""Schema migrations (Alembic). ``taqrir db upgrade`` and :func:`taqrir.db.upgrade` apply them.

The script folder is this package; revisions live in ``versions/``. Make a new one after changing
a table with ``.venv/bin/python -m taqrir.migrations revision -m "what changed"`` (autogenerate
against a scratch SQLite database), then review it by hand.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every revision up to ``revision`` on ``engine``'s database."""
    command.upgrade(alembic_config(engine), revision)


def _revision(message: str) -> None:
    from taqrir.db import make_engine

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/scratch.db")
        if any(HERE.joinpath("versions").glob("*_*.py")):
            upgrade(engine)
        command.revision(alembic_config(engine), message=message, autogenerate=True)
