"""Everything the server sends is valid R4: checked by the independent validator (official R4
JSON schema), in both response modes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from ground.db import session_scope
from integrations.fhir.store import publish_draft
from taqrir.settings import load_settings
from tests.conftest import free_port
from tests.factories.stored import store_draft
from tests.fhir_validator.validator import assert_valid_r4
from tests.integrations.fhir.conftest import READER_SCOPES, Server, corpus_drafts, start_server


def _served(server: Server) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with server.client(READER_SCOPES) as c:
        out.append(httpx.get(f"{server.base}/metadata").json())
        for rtype in ("DiagnosticReport", "Patient", "ImagingStudy", "Device", "Provenance"):
            bundle = c.get(f"/{rtype}", params={"_count": "50"}).json()
            out.append(bundle)
            for entry in bundle["entry"]:
                out.append(c.get(f"/{rtype}/{entry['resource']['id']}").json())
        out.append(c.get("/DiagnosticReport", params={"_include": "DiagnosticReport:subject", "_revinclude": "Provenance:target",
                                                      "_count": "3"}).json())
        out.append(c.get(f"/DiagnosticReport/{server.report_ids[0]}/_history").json())
        out.append(c.get("/DiagnosticReport", params={"nope": "1"}).json())
    return out


@pytest.mark.parametrize("mode", ["model", "raw"])
def test_served_json_is_valid_r4(engine: Engine, tmp_path: Any, mode: str) -> None:
    port = free_port()
    settings = load_settings(data_dir=tmp_path / "d", database_url=engine.url.render_as_string(hide_password=False),
                             api={"port": port, "base_url": f"http://127.0.0.1:{port}/fhir", "response_mode": mode})
    drafts = corpus_drafts(variants=3)
    with session_scope(engine) as s:
        ids = [publish_draft(s, store_draft(s, d)) for d in drafts]
    uv, thread = start_server(settings, engine)
    try:
        served = _served(Server(f"http://127.0.0.1:{port}/fhir", settings, engine, drafts, ids))
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
    types = {r["resourceType"] for r in served}
    assert types == {"CapabilityStatement", "Bundle", "DiagnosticReport", "Patient", "ImagingStudy", "Device",
                     "Provenance", "OperationOutcome"}
    assert_valid_r4(*served)
