"""A real uvicorn server with the FHIR API over each test database, and tokens for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import Engine

from ground.db import session_scope
from integrations.fhir.app import create_app
from integrations.fhir.auth import issue_token
from integrations.fhir.store import publish_draft
from reporting.draft import Draft
from taqrir.settings import Settings, load_settings
from tests.conftest import free_port
from tests.factories.drafts import (
    ARABIC_NAME,
    CT_3SLICE,
    CT_SMALL,
    MR_SMALL,
    draft_from_dicom,
    draft_variant,
)
from tests.factories.stored import store_draft
from workers.dicom_objects import store_verified_sr

READER_SCOPES = ["user/*.rs"]
REVIEWER_SCOPES = ["user/*.rs", "user/DiagnosticReport.u"]


@dataclass
class Server:
    """A running API: its base URL, settings, engine and the drafts it serves."""

    base: str
    settings: Settings
    engine: Engine
    drafts: list[Draft]
    report_ids: list[str]

    def token(self, scopes: list[str] | None = None, user: str = "dr.reader", **kw: object) -> str:
        return issue_token(self.settings.api, self.settings.data_dir, user, scopes or READER_SCOPES, **kw)  # type: ignore[arg-type]

    def headers(self, scopes: list[str] | None = None, user: str = "dr.reader", **kw: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scopes, user, **kw)}"}

    def client(self, scopes: list[str] | None = None, user: str = "dr.reader") -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers(scopes, user), timeout=30)


def corpus_drafts(variants: int = 24) -> list[Draft]:
    """Real studies of the corpus plus ``variants`` variants of the CT series over 4 patients."""
    base = draft_from_dicom(CT_3SLICE)
    real = [base, draft_from_dicom([CT_SMALL]), draft_from_dicom([ARABIC_NAME]), draft_from_dicom([MR_SMALL])]
    return real + [draft_variant(base, n, patients=4) for n in range(1, variants + 1)]


def start_server(settings: Settings, engine: Engine) -> tuple[uvicorn.Server, threading.Thread]:
    """uvicorn serving create_app() on settings.api.port, in a thread; returns when it accepts."""
    config = uvicorn.Config(create_app(settings, engine, store_verified_sr=store_verified_sr), host="127.0.0.1", port=settings.api.port,
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread


@pytest.fixture
def fhir_server(engine: Engine, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    settings = load_settings(data_dir=tmp_path / "data", database_url=str(engine.url.render_as_string(hide_password=False)),
                             api={"port": port, "base_url": f"http://127.0.0.1:{port}/fhir"})
    drafts = corpus_drafts()
    with session_scope(engine) as s:
        ids = [publish_draft(s, store_draft(s, d)) for d in drafts]
    server, thread = start_server(settings, engine)
    try:
        yield Server(f"http://127.0.0.1:{port}/fhir", settings, engine, drafts, ids)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
