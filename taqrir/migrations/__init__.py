"""Schema migrations. Placeholder path until the Alembic tree lands: create_all on the metadata."""

from __future__ import annotations

from sqlalchemy.engine import Engine


def upgrade(engine: Engine) -> None:
    from taqrir.db import import_models

    import_models().metadata.create_all(engine)
