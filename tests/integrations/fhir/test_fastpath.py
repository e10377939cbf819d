"""The fast path (integrations.fhir.fastpath, integrations.fhir.pgreads) answers exactly as FastAPI does.

Two real uvicorn servers over one database, one with ``api.fast_path`` on (the default) and one
with it off, get the same requests: reads, searches, errors, auth and compartment refusals, and an
access that cannot be audited. Status, headers (but Date) and bodies must be byte-identical, except
the two fields a Bundle mints per response (its id and meta.lastUpdated), and the audit records
of both must be the same. On PostgreSQL the asyncpg reads must return what the SQLAlchemy reads
return.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import col, select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.fhir.errors import Unauthorized
from integrations.fhir.fastpath import FastPath
from integrations.fhir.interactions import FhirApi
from integrations.fhir.search import run_search
from integrations.fhir.search_params import parse_search
from integrations.fhir.store import fetch_current
from reporting.fhir.ids import patient_id
from tests.conftest import free_port
from tests.integrations.fhir.conftest import Server, start_server

_BUNDLE_ID = re.compile(r'^\{"resourceType":"Bundle","id":"[0-9a-f]{32}","meta":\{"lastUpdated":"[^"]+"\}')


@pytest.fixture
def general(fhir_server: Server) -> Iterator[str]:
    """A second server over the same database and key with the fast path off; same base URL in
    links, so that bodies compare byte for byte. Returns its own root (``http://host:port/fhir``)."""
    port = free_port()
    settings = fhir_server.settings.model_copy(update={
        "api": fhir_server.settings.api.model_copy(update={"port": port, "fast_path": False})})
    server, thread = start_server(settings, fhir_server.engine)
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _view(r: httpx.Response) -> tuple[int, list[tuple[str, str]], str]:
    # Date differs by the clock; a redirect's Location names the host:port that was asked
    headers = [(k, re.sub(r"//127\.0\.0\.1:\d+/", "//host/", v)) for k, v in r.headers.multi_items() if k.lower() != "date"]
    return r.status_code, headers, _BUNDLE_ID.sub('{"resourceType":"Bundle","id":"-","meta":{"lastUpdated":"-"}', r.text)


def _same(fast: str, general: str, path: str, headers: dict[str, str], params: Any = None) -> httpx.Response:
    a = httpx.get(fast + path, headers=headers, params=params, timeout=30)
    b = httpx.get(general + path, headers=headers, params=params, timeout=30)
    assert _view(a) == _view(b), (path, params)
    return a


def _cases(server: Server) -> list[tuple[str, Any]]:
    d0 = server.drafts[0]
    varied = patient_id(d0.study.patient.model_copy(update={"patient_id": f"{d0.study.patient.patient_id}-1"}))
    rid = server.report_ids[0]
    return [
        # reads of every type, unknown ids, invalid ids (FastAPI's 400 on both), unknown types
        (f"/DiagnosticReport/{rid}", None),
        (f"/Patient/{patient_id(d0.study.patient)}", None),
        ("/DiagnosticReport/dr-unknown", None),
        ("/DiagnosticReport/bad id!", None),
        ("/DiagnosticReport/abc%0A", None),
        ("/DiagnosticReport/" + "a" * 65, None),
        ("/Observation/1", None),
        ("/DiagnosticReport/", None),
        # the hot search, its pages (next/previous links), an empty page past the end, a patient with none
        ("/DiagnosticReport", {"patient": varied, "_count": "10"}),
        ("/DiagnosticReport", {"patient": varied, "_count": "2"}),
        ("/DiagnosticReport", {"patient": varied, "_count": "2", "_offset": "2"}),
        ("/DiagnosticReport", {"patient": varied, "_count": "2", "_offset": "50"}),
        ("/DiagnosticReport", {"patient": f"Patient/{varied}"}),
        ("/DiagnosticReport", {"subject": f"Patient/{varied}", "_count": "3"}),
        ("/DiagnosticReport", {"patient": "nobody"}),
        ("/ImagingStudy", {"patient": varied}),
        # other searches (general SQL on both) and bad parameters
        ("/DiagnosticReport", None),
        ("/DiagnosticReport", {"patient": varied, "_sort": "-date", "_count": "2"}),
        ("/DiagnosticReport", {"patient": varied, "_summary": "count"}),
        ("/DiagnosticReport", {"patient": varied, "_count": "0"}),
        ("/DiagnosticReport", {"_id": rid, "_include": "DiagnosticReport:subject", "_revinclude": "Provenance:target"}),
        ("/DiagnosticReport", {"status": "partial", "date": "ge2003-04-10"}),
        ("/DiagnosticReport", {"patient": [varied, varied]}),
        ("/DiagnosticReport", {"bogus": "1"}),
        ("/DiagnosticReport", {"_count": "abc"}),
        ("/DiagnosticReport", {"patient": "Group/1"}),
        ("/Provenance", {"target": f"DiagnosticReport/{rid}"}),
        ("/Observation", None),
        (f"/DiagnosticReport/{rid}/_history/1", None),
    ]


def test_fast_and_general_paths_answer_alike(fhir_server: Server, general: str) -> None:
    fast = fhir_server.base
    reader = fhir_server.headers()
    for path, params in _cases(fhir_server):
        _same(fast, general, path, reader, params)

    url = f"/DiagnosticReport/{fhir_server.report_ids[0]}"
    refusals = [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not.a.jwt"},
        fhir_server.headers(ttl_s=-3600),
        fhir_server.headers(["user/Patient.rs"]),
        fhir_server.headers(["user/DiagnosticReport.s"]),
    ]
    for h in refusals:
        r = _same(fast, general, url, h)
        assert r.status_code in (401, 403) and r.json()["resourceType"] == "OperationOutcome"
    assert _same(fast, general, url, {}).headers["WWW-Authenticate"].startswith("Bearer")
    assert _same(fast, general, "/DiagnosticReport", fhir_server.headers(["user/DiagnosticReport.r"])).status_code == 403

    # patient/ scopes: own report readable, another's refused, searches confined to the compartment
    d0 = fhir_server.drafts[0]
    mine = fhir_server.headers(["patient/DiagnosticReport.rs", "patient/Patient.r"], patient=patient_id(d0.study.patient))
    assert _same(fast, general, url, mine).status_code == 200
    assert _same(fast, general, f"/DiagnosticReport/{fhir_server.report_ids[1]}", mine).status_code == 404
    assert _same(fast, general, "/DiagnosticReport", mine).json()["total"] == 1
    other = patient_id(d0.study.patient.model_copy(update={"patient_id": f"{d0.study.patient.patient_id}-1"}))
    assert _same(fast, general, "/DiagnosticReport", mine, {"patient": other}).json()["total"] == 0
    assert _same(fast, general, "/Provenance", mine).status_code == 403
    assert _same(fast, general, "/DiagnosticReport", fhir_server.headers(["patient/DiagnosticReport.rs"])).status_code == 403

    # nothing is served unaudited, by either path
    with fhir_server.engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    try:
        assert _same(fast, general, url, reader).status_code == 503
        assert _same(fast, general, "/DiagnosticReport", reader, {"patient": other}).status_code == 503
    finally:
        with fhir_server.engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
    # and the writers carry on after a failed batch
    assert _same(fast, general, url, reader).status_code == 200


def test_reads_and_audit_survive_lost_connections(fhir_server: Server, general: str) -> None:
    """PostgreSQL restarted under the API (its connections killed): the next requests still succeed,
    on both paths (asyncpg reads, SQLAlchemy reads, the audit writers' own connections)."""
    if fhir_server.engine.dialect.name != "postgresql":
        pytest.skip("connections to kill are PostgreSQL's")
    fast, reader = fhir_server.base, fhir_server.headers()
    url = f"/DiagnosticReport/{fhir_server.report_ids[0]}"
    varied = patient_id(fhir_server.drafts[0].study.patient.model_copy(
        update={"patient_id": f"{fhir_server.drafts[0].study.patient.patient_id}-1"}))
    for _ in range(2):
        assert _same(fast, general, url, reader).status_code == 200
        assert _same(fast, general, "/DiagnosticReport", reader, {"patient": varied}).status_code == 200
        assert _same(fast, general, "/DiagnosticReport", reader, {"status": "partial"}).status_code == 200
        with fhir_server.engine.connect() as conn:
            killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one()
        assert killed >= 4  # each server's asyncpg, SQLAlchemy read and audit connections
    with session_scope(fhir_server.engine) as s:
        assert verify(s).ok


def _records(server: Server, actor: str) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    with session_scope(server.engine) as s:
        rows = s.exec(select(AuditRecord).where(AuditRecord.actor == actor).order_by(col(AuditRecord.seq))).all()
    out = []
    for r in rows:
        events = [{k: v for k, v in e.items() if k != "at"} for e in json.loads(r.details)["events"]]
        out.append((r.action, r.entity_type, r.entity_id, events))
    return out


def test_fast_and_general_paths_audit_alike(fhir_server: Server, general: str) -> None:
    served: dict[str, int] = {}
    for base, user in ((fhir_server.base, "dr.fast"), (general, "dr.general")):
        h = fhir_server.headers(user=user)
        for path, params in _cases(fhir_server):  # one at a time: each access is its own record
            r = httpx.get(base + path, headers=h, params=params, timeout=30)
            served[user] = served.get(user, 0) + (r.status_code == 200)
            served[user + " refused"] = served.get(user + " refused", 0) + (r.status_code >= 400)
    fast, slow = _records(fhir_server, "dr.fast"), _records(fhir_server, "dr.general")
    assert fast == slow
    assert {a for a, *_ in fast} == {"fhir.read", "fhir.search", "fhir.vread", "fhir.refused"}
    ok = [r for r in fast if r[0] != "fhir.refused"]
    assert len(ok) == served["dr.fast"] == served["dr.general"]  # one per access served
    refused = [r for r in fast if r[0] == "fhir.refused"]  # and one per refusal, alike on both doors (item 23)
    assert len(refused) == served["dr.fast refused"] == served["dr.general refused"] > 0
    with session_scope(fhir_server.engine) as s:
        assert verify(s).ok


def test_reads_match_the_sqlalchemy_reads(fhir_server: Server) -> None:
    api = FhirApi(fhir_server.settings, fhir_server.engine)
    if fhir_server.engine.dialect.name != "postgresql":
        assert api.pg is None  # SQLite: every read goes through SQLAlchemy in a worker thread
        return
    assert api.pg is not None
    pg = api.pg
    patients = [*sorted({patient_id(d.study.patient) for d in fhir_server.drafts}), "nobody"]

    async def compare() -> None:
        try:
            for rid in fhir_server.report_ids:
                with api.reading() as conn:
                    expected = fetch_current(conn, "DiagnosticReport", rid)
                assert await pg.current("DiagnosticReport", rid) == expected
            for rtype in ("DiagnosticReport", "ImagingStudy"):
                for pid in patients:
                    for count, offset in ((10, 0), (2, 0), (2, 2), (2, 4), (3, 50), (500, 0)):
                        q = parse_search(rtype, [("patient", pid), ("_count", str(count)), ("_offset", str(offset))])
                        assert pg.serves(q)
                        with api.reading() as conn:
                            expected_page = run_search(conn, q)
                        assert await pg.search(q) == expected_page, (rtype, pid, count, offset)
            for pairs in ([("patient", patients[0]), ("_sort", "date")], [("patient", patients[0]), ("_summary", "count")],
                          [("patient", patients[0]), ("status", "partial")], [("patient", f"{patients[0]},{patients[1]}")],
                          [("patient", patients[0]), ("patient", patients[1])], []):
                assert not pg.serves(parse_search("DiagnosticReport", pairs)), pairs
        finally:
            await api.aclose()

    asyncio.run(compare())


class _Downstream:
    """Stands for FastAPI: records what reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(f"{scope.get('method')} {scope['path']}")


class _Verifier:
    """Refuses every token: the fast path answering 401 shows it took the request."""

    def verify(self, authorization: str | None) -> None:
        raise Unauthorized("test")


def test_the_fast_path_takes_only_valid_gets_of_read_and_search() -> None:
    from integrations.fhir.deps import ResourceType
    from integrations.fhir.store import RESOURCE_TYPES

    assert {t.value for t in ResourceType} == set(RESOURCE_TYPES)  # the types the fast path routes

    class _Api:
        verifier = _Verifier()

        async def record_access(self, **_: Any) -> None:
            return None

    downstream = _Downstream()
    layer = FastPath(downstream, _Api())  # type: ignore[arg-type]

    async def call(method: str, path: str, *, type_: str = "http", root_path: str = "") -> int | None:
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {"type": type_, "method": method, "path": path, "root_path": root_path, "query_string": b"",
                 "headers": [(b"authorization", b"Bearer x")]}
        await layer(scope, receive, send)
        return int(sent[0]["status"]) if sent else None

    async def run() -> None:
        for path in ("/fhir/DiagnosticReport", "/fhir/Patient/p-1", "/fhir/Provenance/prov.1-a", "/fhir/Device"):
            assert await call("GET", path) == 401, path
        passed = [("POST", "/fhir/DiagnosticReport"), ("HEAD", "/fhir/DiagnosticReport/x"),
                  ("GET", "/fhir/metadata"), ("GET", "/fhir/Observation/1"), ("GET", "/fhir/DiagnosticReport/"),
                  ("GET", "/fhir/DiagnosticReport/bad id"), ("GET", "/fhir/DiagnosticReport/x\n"),
                  ("GET", "/fhir/DiagnosticReport/" + "a" * 65), ("GET", "/fhir/DiagnosticReport/x/_history"),
                  ("GET", "/fhir/DiagnosticReport/x/_history/1"), ("GET", "/docs"), ("GET", "/fhirDiagnosticReport")]
        for method, path in passed:
            assert await call(method, path) is None, path
        assert await call("GET", "/fhir/DiagnosticReport", root_path="/api") is None
        assert await call("GET", "/fhir/DiagnosticReport", type_="websocket") is None
        assert len(downstream.paths) == len(passed) + 2

    asyncio.run(run())
