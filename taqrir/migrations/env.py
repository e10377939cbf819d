"""Alembic environment: runs on the engine handed in by :func:`taqrir.migrations.upgrade`."""

from __future__ import annotations

from alembic import context

from taqrir.db import import_models

target_metadata = import_models().metadata
engine = context.config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
