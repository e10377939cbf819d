"""Alembic environment: runs on the engine handed in by :func:`ground.migrations.upgrade`; the
tables' metadata (for autogenerate only) is handed in by ``taqrir.schema``."""

from __future__ import annotations

from alembic import context

target_metadata = context.config.attributes.get("metadata")
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
