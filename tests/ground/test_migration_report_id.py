"""Revision 7d2a9c4e1f60 copies a published draft's report id from ``fhir_draft`` into ``draft``, so
the audit room finds a draft's review without importing the FHIR room (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from ground.clock import utcnow
from ground.db import make_engine, session_scope
from ground.migrations import upgrade
from integrations.fhir.store import FhirDraft
from reporting.draft_record import DraftRecord
from tests.factories.db import reset_postgres_schema
from tests.factories.signed import add_draft, add_study

BEFORE = "5b0e3c7d9a21"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    url: str = request.getfixturevalue("pg_server_url")
    reset_postgres_schema(url)
    return url


def test_upgrade_copies_only_the_ids_that_fhir_draft_alone_knew(old_db_url: str) -> None:
    engine = make_engine(old_db_url)
    upgrade(engine, BEFORE)
    with session_scope(engine) as s:
        study = add_study(s, study_uid="1.2.826.0.1.3680043.8.498.7001", accession="A7001")
        unrecorded = add_draft(s, study, version=1)  # published, but the worker never recorded it
        recorded = add_draft(s, study, version=2)
        recorded.fhir_report_id = "dr-recorded"
        unpublished = add_draft(s, study, version=3)
        for rec, report in ((unrecorded, "dr-from-fhir"), (recorded, "dr-other")):
            s.add(FhirDraft(draft_id=rec.draft_id, report_id=report, study_uid=study.study_instance_uid,
                            published_at=utcnow(), draft_json=rec.draft_json))
        ids = (unrecorded.draft_id, recorded.draft_id, unpublished.draft_id)
    upgrade(engine)
    with session_scope(engine) as s:
        got = {r.draft_id: r.fhir_report_id for r in s.exec(select(DraftRecord)).all()}
    engine.dispose()
    assert got == {ids[0]: "dr-from-fhir", ids[1]: "dr-recorded", ids[2]: None}
