"""Database engine and sessions: a SQLite file by default, PostgreSQL by URL.

Engines are built by :func:`make_engine` from settings and passed to what needs them; nothing here
connects at import time. Tables are SQLModel classes that live beside the room that owns them
(index in ``integrations.dicom.index``, audit in ``audit.chain``, pipeline state in
``workers.state``, FHIR resources in ``integrations.fhir.store``); the roof's ``taqrir.schema``
imports them all so that one metadata holds the whole schema for Alembic's autogenerate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from ground import migrations


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and foreign keys, so that the
    listener, workers and API can share one file; PostgreSQL gets a pre-pinged pool."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Take transactions into our hands: pysqlite's deferred BEGIN lets two processes read
            # the same audit chain head and then race; BEGIN IMMEDIATE serialises every
            # transaction, read-only ones included (a long read such as `audit-export` makes
            # writers wait up to the busy timeout). Acceptable for the embedded single-host
            # default; PostgreSQL, the production database, has no such limit.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (``taqrir db upgrade``)."""
    migrations.upgrade(engine)
