"""The migrations: the tables they make are the tables the code declares, and the data migrations
of issue 12 (the draft's report id copied into ``draft``; the draft JSON stored once) keep every
draft, up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import select

from ground.db import make_engine, session_scope
from ground.migrations import alembic_config, upgrade
from reporting.draft_record import DraftRecord
from taqrir.schema import metadata
from tests.factories.db import reset_postgres_schema
from tests.factories.signed import add_draft, add_study

BEFORE_BACKFILL = "5b0e3c7d9a21"
BEFORE_DROP = "7d2a9c4e1f60"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def bare(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty, never-migrated database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = request.getfixturevalue("pg_server_url")
        reset_postgres_schema(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _published(engine: Engine, *, study_uid: str = "1.2.826.0.1.3680043.8.498.7001") -> list[str]:
    """Three drafts of one study, at a revision where fhir_draft still holds draft_json: v1 published but
    never recorded on its draft row, v2 published and recorded, v3 not published."""
    with session_scope(engine) as s:
        study = add_study(s, study_uid=study_uid, accession="A7001")
        recs = [add_draft(s, study, version=v) for v in (1, 2, 3)]
        recs[1].fhir_report_id = "dr-recorded"
        ids = [r.draft_id for r in recs]
        for rec, report in ((recs[0], "dr-from-fhir"), (recs[1], "dr-other")):
            s.execute(text("INSERT INTO fhir_draft (draft_id, report_id, study_uid, published_at, draft_json) "
                           "VALUES (:d, :r, :u, CURRENT_TIMESTAMP, :j)"),
                      {"d": rec.draft_id, "r": report, "u": study_uid, "j": rec.draft_json})
    return ids


def _columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_the_head_schema_is_what_the_code_declares(bare: Engine) -> None:
    upgrade(bare)
    with bare.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), metadata())
    assert diffs == []


def test_the_report_id_is_copied_and_the_draft_json_is_kept_once(bare: Engine) -> None:
    upgrade(bare, BEFORE_BACKFILL)
    ids = _published(bare)
    upgrade(bare)
    with session_scope(bare) as s:
        got = {r.draft_id: r.fhir_report_id for r in s.exec(select(DraftRecord)).all()}
    assert got == {ids[0]: "dr-from-fhir", ids[1]: "dr-recorded", ids[2]: None}
    assert "draft_json" not in _columns(bare, "fhir_draft")
    # and back: the column is restored from the draft table
    from alembic import command

    command.downgrade(alembic_config(bare), BEFORE_DROP)
    with bare.connect() as conn:
        rows = dict(conn.execute(text("SELECT f.draft_id, f.draft_json = d.draft_json FROM fhir_draft f "
                                      "JOIN draft d ON d.draft_id = f.draft_id")).all())
    assert rows == {ids[0]: True, ids[1]: True}


def test_a_published_draft_without_its_draft_row_stops_the_drop(bare: Engine) -> None:
    upgrade(bare, BEFORE_DROP)
    ids = _published(bare)
    with bare.begin() as conn:
        conn.execute(text("DELETE FROM draft WHERE draft_id = :d"), {"d": ids[0]})
    with pytest.raises(RuntimeError, match="only copy"):
        upgrade(bare)
    assert "draft_json" in _columns(bare, "fhir_draft")
