"""Shared fixtures: real databases (SQLite file and PostgreSQL), the DICOM corpus, free ports."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from ground.db import make_engine, upgrade
from tests.factories.db import reset_postgres_schema

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
DICOM_DIR = DATA / "dicom"

PG_ADMIN_URL = os.environ.get("TAQRIR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    assert DICOM_DIR.is_dir(), f"{DICOM_DIR} is missing: the corpus ships with the repository"
    return DICOM_DIR


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1)
    name = f"taqrir_t_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({err}); start it (see .ci/run)")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database URL: once as a SQLite file, once as PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'taqrir.db'}"
    else:
        url = request.getfixturevalue("pg_server_url")
        reset_postgres_schema(url)
    eng = make_engine(url)
    upgrade(eng)
    eng.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()
