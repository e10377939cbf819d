"""Issue 11, the FHIR API part (items 10-26): each test failed before its fix, on SQLite and PostgreSQL,
through a real uvicorn server; where both doors (FastPath, FastAPI routes) answer, both are compared."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import col, select

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.fhir.store import publish_draft
from reporting.draft import Draft
from reporting.fhir.ids import patient_id, report_id
from tests.factories.stored import store_draft
from tests.fhir_validator.validator import assert_valid_r4
from tests.integrations.fhir.conftest import REVIEWER_SCOPES, Server
from tests.integrations.fhir.test_fastpath import _same, general  # noqa: F401 - the fixture

FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"


def _params(action: str, **text_: str) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "action", "valueCode": action}] + [
        {"name": k.replace("_", "-"), "valueString": v} for k, v in text_.items()]}


def _review(server: Server, rid: str, body: dict[str, Any], version: int = 1, user: str = "dr.amal") -> httpx.Response:
    h = server.headers(REVIEWER_SCOPES, user=user)
    return httpx.post(f"{server.base}/DiagnosticReport/{rid}/$review", headers={**h, "If-Match": f'W/"{version}"'},
                      json=body, timeout=30)


def _version_two(d: Draft) -> Draft:
    study = d.study.model_copy(update={"version": d.study.version + 1})
    return d.model_copy(update={"draft_id": d.draft_id + "-v2", "study": study,
                                "created_at": d.created_at + timedelta(hours=1)})


def _audit(server: Server, action: str) -> list[AuditRecord]:
    with session_scope(server.engine) as s:
        return list(s.exec(select(AuditRecord).where(AuditRecord.action == action).order_by(col(AuditRecord.seq))).all())


# -- item 10 -----------------------------------------------------------------------------------

def test_10_a_newer_version_supersedes_the_older_draft(fhir_server: Server) -> None:
    old_draft, old_rid = fhir_server.drafts[0], fhir_server.report_ids[0]
    new_draft = _version_two(old_draft)
    with session_scope(fhir_server.engine) as s:
        new_rid = publish_draft(s, store_draft(s, new_draft))
    assert new_rid == report_id(new_draft) != old_rid
    h = fhir_server.headers()
    old = httpx.get(f"{fhir_server.base}/DiagnosticReport/{old_rid}", headers=h).json()
    new = httpx.get(f"{fhir_server.base}/DiagnosticReport/{new_rid}", headers=h).json()
    assert new["status"] == "partial"
    assert old["status"] == "cancelled" and old["meta"]["versionId"] == "2"
    links = [e for e in old.get("extension", []) if e["url"].endswith("superseded-by")]
    assert links and links[0]["valueReference"]["reference"] == f"DiagnosticReport/{new_rid}"
    # searchable: the study's partial drafts are only the current one; the link is a Provenance
    uid = f"urn:dicom:uid|urn:oid:{old_draft.study.study_instance_uid}"
    found = httpx.get(f"{fhir_server.base}/DiagnosticReport", params={"identifier": uid, "status": "partial"},
                      headers=h).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [new_rid]
    provs = httpx.get(f"{fhir_server.base}/Provenance", params={"target": f"DiagnosticReport/{old_rid}"},
                      headers=h).json()
    sup = [e["resource"] for e in provs["entry"] if e["resource"]["activity"].get("text", "").startswith("superseded")]
    assert len(sup) == 1
    assert {t["reference"] for t in sup[0]["target"]} == {f"DiagnosticReport/{old_rid}/_history/2",
                                                          f"DiagnosticReport/{new_rid}/_history/1"}
    assert sup[0]["entity"][0] == {"role": "revision", "what": {"reference": f"DiagnosticReport/{old_rid}/_history/1"}}
    assert_valid_r4(old, new, provs)
    # reviewing the superseded draft is refused with a clear OperationOutcome; the new one can be
    r = _review(fhir_server, old_rid, _params("accept"), version=2)
    assert r.status_code == 409 and r.json()["resourceType"] == "OperationOutcome"
    assert new_rid in r.json()["issue"][0]["diagnostics"] and r.json()["issue"][0]["code"] == "business-rule"
    assert _review(fhir_server, new_rid, _params("accept")).status_code == 200
    # audited, and publishing again changes nothing
    rec = _audit(fhir_server, "fhir.supersede")
    assert len(rec) == 1 and rec[0].entity_id == old_rid and json.loads(rec[0].details)["by"] == new_rid
    with session_scope(fhir_server.engine) as s:
        publish_draft(s, new_draft)
        assert verify(s).ok
    assert len(_audit(fhir_server, "fhir.supersede")) == 1


def test_10_an_older_draft_published_late_is_superseded_at_once(fhir_server: Server) -> None:
    d = fhir_server.drafts[5]
    v2, v3 = _version_two(d), _version_two(_version_two(d))
    with session_scope(fhir_server.engine) as s:
        r3 = publish_draft(s, store_draft(s, v3))
        r2 = publish_draft(s, store_draft(s, v2))
    h = fhir_server.headers()
    assert httpx.get(f"{fhir_server.base}/DiagnosticReport/{r2}", headers=h).json()["status"] == "cancelled"
    assert httpx.get(f"{fhir_server.base}/DiagnosticReport/{r3}", headers=h).json()["status"] == "partial"


# -- item 11 -----------------------------------------------------------------------------------

def test_11_review_answers_only_after_its_commit(fhir_server: Server) -> None:
    """A commit that fails makes the review fail: the answer comes after the commit, not before."""
    eng = fhir_server.engine
    with eng.begin() as conn:
        if eng.dialect.name == "postgresql":
            conn.execute(text("CREATE FUNCTION t_fail() RETURNS trigger LANGUAGE plpgsql AS "
                              "$$ BEGIN RAISE EXCEPTION 'commit refused'; END $$"))
            conn.execute(text("CREATE CONSTRAINT TRIGGER t_fail AFTER INSERT ON fhir_resource_history "
                              "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION t_fail()"))
        else:  # a deferred foreign key that the new history row violates: checked at COMMIT
            conn.execute(text("CREATE TABLE t_parent (id INTEGER PRIMARY KEY)"))
            conn.execute(text("CREATE TABLE t_child (pid INTEGER REFERENCES t_parent(id) DEFERRABLE INITIALLY DEFERRED)"))
            conn.execute(text("CREATE TRIGGER t_fail AFTER INSERT ON fhir_resource_history "
                              "BEGIN INSERT INTO t_child VALUES (42); END"))
    rid = fhir_server.report_ids[2]
    r = _review(fhir_server, rid, _params("accept"))
    assert r.status_code >= 500 and r.json()["resourceType"] == "OperationOutcome", r.text
    with eng.begin() as conn:
        conn.execute(text("DROP TRIGGER t_fail" + (" ON fhir_resource_history" if eng.dialect.name == "postgresql" else "")))
    current = httpx.get(f"{fhir_server.base}/DiagnosticReport/{rid}", headers=fhir_server.headers()).json()
    assert current["status"] == "partial" and current["meta"]["versionId"] == "1"
    r = _review(fhir_server, rid, _params("accept"))
    assert r.status_code == 200
    # a read right after the 200 sees the reviewed version
    again = httpx.get(f"{fhir_server.base}/DiagnosticReport/{rid}", headers=fhir_server.headers())
    assert again.json()["meta"]["versionId"] == "2" and again.json()["status"] == "final"


# -- item 12 -----------------------------------------------------------------------------------

def test_12_concurrent_reviews_one_wins_the_rest_412(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[3]
    h = {**fhir_server.headers(REVIEWER_SCOPES, user="dr.race"), "If-Match": 'W/"1"'}
    start = threading.Barrier(8)
    codes: list[int] = []

    def go(i: int) -> None:
        body = _params("edit", impression_en=f"Edit {i}.") if i % 2 else _params("accept")
        start.wait()
        codes.append(httpx.post(f"{fhir_server.base}/DiagnosticReport/{rid}/$review", headers=h, json=body,
                                timeout=60).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [412] * 7, codes
    with session_scope(fhir_server.engine) as s:
        assert verify(s).ok


# -- items 13, 14, 15 ---------------------------------------------------------------------------

def test_13_14_bad_input_is_400_never_5xx(fhir_server: Server, general: str) -> None:  # noqa: F811
    h = fhir_server.headers()
    rid = fhir_server.report_ids[0]
    cases: list[tuple[str, Any]] = [
        ("/DiagnosticReport", {"_count": "²"}),
        ("/DiagnosticReport", {"identifier": "abc\x00def"}),
        ("/DiagnosticReport", {"patient": "x\x00"}),
        ("/DiagnosticReport", [("_sort", ",".join(["date"] * 3000))]),
        ("/DiagnosticReport", [("status", "partial")] * 3000),
        ("/DiagnosticReport", [("identifier", "x")] * 400),
        ("/DiagnosticReport", [("identifier", ",".join(f"v{i}" for i in range(2000)))]),
        ("/DiagnosticReport", [("_id", ",".join(f"v{i}" for i in range(2000)))]),
    ]
    for path, params in cases:
        r = _same(fhir_server.base, general, path, h, params)
        assert r.status_code == 400, (params if len(str(params)) < 200 else str(params)[:200], r.status_code, r.text[:300])
        assert r.json()["resourceType"] == "OperationOutcome"
    for q in ("_count=%C2%B2", "_offset=%C2%B2"):
        r = httpx.get(f"{fhir_server.base}/DiagnosticReport/{rid}/_history?{q}", headers=h)
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


def test_14_statement_timeout_on_postgres(fhir_server: Server) -> None:
    if fhir_server.engine.dialect.name != "postgresql":
        pytest.skip("statement_timeout is PostgreSQL's")
    import asyncio

    from integrations.fhir.errors import QueryTooCostly
    from integrations.fhir.interactions import FhirApi
    settings = fhir_server.settings.model_copy(update={
        "api": fhir_server.settings.api.model_copy(update={"statement_timeout_ms": 200})})
    api = FhirApi(settings, fhir_server.engine)

    async def run() -> None:
        with pytest.raises(QueryTooCostly):  # the general reads (SQLAlchemy in a thread)
            await api.query(lambda conn: conn.execute(text("SELECT pg_sleep(2)")).all())
        assert api.pg is not None
        with pytest.raises(QueryTooCostly):  # the hot reads (asyncpg on the loop)
            await api.pg._fetch("SELECT pg_sleep(2)", [])
        await api.aclose()

    asyncio.run(run())


def test_15_overlong_review_text_is_refused(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[4]
    r = _review(fhir_server, rid, _params("edit", impression_en="x" * (2 * 1024 * 1024)))
    assert r.status_code in (400, 413) and r.json()["resourceType"] == "OperationOutcome"
    r = _review(fhir_server, rid, _params("edit", findings_en="y" * 40_000))
    assert r.status_code == 400 and "40000" in r.json()["issue"][0]["diagnostics"]
    r = _review(fhir_server, rid, _params("edit", findings_en="nul\x00byte"))
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert _review(fhir_server, rid, _params("edit", findings_en="z" * 10_000)).status_code == 200


# -- item 16 -----------------------------------------------------------------------------------

def test_16_a_stale_translation_is_not_shown(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[6]
    assert "ar" in fhir_server.drafts[6].sections
    r = _review(fhir_server, rid, _params("edit", impression_en="Normal study."))
    assert r.status_code == 200
    rep = r.json()
    assert rep["conclusion"] == "Normal study." and "_conclusion" not in rep
    assert [f["language"] for f in rep["presentedForm"]] == ["en", "en"]
    assert fhir_server.drafts[6].sections["ar"].impression not in rep["text"]["div"]
    assert_valid_r4(rep)
    rec = _audit(fhir_server, "fhir.review.edit")[-1]
    assert json.loads(rec.details)["dropped_translations"] == ["ar"]


# -- item 17 -----------------------------------------------------------------------------------

def test_17_history_entries_have_request_and_response(fhir_server: Server) -> None:
    rid = fhir_server.report_ids[7]
    assert _review(fhir_server, rid, _params("accept")).status_code == 200
    hist = httpx.get(f"{fhir_server.base}/DiagnosticReport/{rid}/_history", headers=fhir_server.headers()).json()
    e2, e1 = hist["entry"]
    assert e2["request"] == {"method": "PUT", "url": f"DiagnosticReport/{rid}"}
    assert e1["request"] == {"method": "POST", "url": "DiagnosticReport"}
    assert e2["response"]["status"] == "200 OK" and e1["response"]["status"] == "201 Created"
    assert e2["response"]["etag"] == 'W/"2"' and e2["fullUrl"].endswith(f"/DiagnosticReport/{rid}")
    from fhir.resources.R4B.bundle import Bundle
    Bundle.model_validate(hist)
    assert_valid_r4(hist)


# -- item 18 -----------------------------------------------------------------------------------

def test_18_charset_406_and_304(fhir_server: Server, general: str) -> None:  # noqa: F811
    rid = fhir_server.report_ids[0]
    h = fhir_server.headers()
    for base in (fhir_server.base, general):
        for path in (f"/DiagnosticReport/{rid}", "/DiagnosticReport", "/metadata", "/DiagnosticReport/nope"):
            assert httpx.get(base + path, headers=h).headers["content-type"] == FHIR_JSON_UTF8, path
    url = f"/DiagnosticReport/{rid}"
    for extra, params in [({"Accept": "application/fhir+xml"}, None), ({"Accept": "application/xml"}, None),
                          ({}, {"_format": "xml"}), ({}, {"_format": "application/fhir+xml"})]:
        for path in (url, "/DiagnosticReport"):
            r = _same(fhir_server.base, general, path, {**h, **extra}, params)
            assert r.status_code == 406 and r.json()["resourceType"] == "OperationOutcome", (path, extra, params)
    for accept in ("application/fhir+json", "application/json", "*/*", "application/fhir+xml;q=0.9, application/fhir+json"):
        assert _same(fhir_server.base, general, url, {**h, "Accept": accept}).status_code == 200
    etag = httpx.get(fhir_server.base + url, headers=h).headers["ETag"]
    for base in (fhir_server.base, general):
        r = httpx.get(base + url, headers={**h, "If-None-Match": etag})
        assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == etag
        assert httpx.get(base + url, headers={**h, "If-None-Match": 'W/"99"'}).status_code == 200
    _same(fhir_server.base, general, url, {**h, "If-None-Match": etag})


# -- item 19, 20, 21 ------------------------------------------------------------------------------

def test_19_date_search_rules(fhir_server: Server, general: str) -> None:  # noqa: F811
    h = fhir_server.headers()

    def ids(params: Any) -> set[str]:
        body = _same(fhir_server.base, general, "/DiagnosticReport", h, {**params, "_count": "500"}).json()
        return {e["resource"]["id"] for e in body.get("entry", [])}

    every = ids({})
    dated = {e for e in every if "effectiveDateTime" in httpx.get(
        f"{fhir_server.base}/DiagnosticReport/{e}", headers=h).json()}
    assert dated != every, "the corpus needs an undated report for this test"
    some = next(iter(dated))
    eff = httpx.get(f"{fhir_server.base}/DiagnosticReport/{some}", headers=h).json()["effectiveDateTime"]
    assert ids({"date": f"ne{eff}"}) == dated - {some}
    # fractions are kept: a tenth of a second later is another instant
    assert some in ids({"date": f"eq{eff}"})
    if "." not in eff:
        base_s = eff[:19]
        tz = eff[19:]
        assert some not in ids({"date": f"eq{base_s}.5{tz}"})
        assert some in ids({"date": f"eq{base_s}.0{tz}"})
    # a time without offset is read in the server's zone (api.study_timezone, UTC here), not refused
    naive = eff[:19]
    r = _same(fhir_server.base, general, "/DiagnosticReport", h, {"date": f"ge{naive}"})
    assert r.status_code == 200
    assert eff.endswith(("Z", "+00:00")) and some in ids({"date": f"eq{naive}"})


def test_20_provenance_target_in_the_stored_versioned_form(fhir_server: Server, general: str) -> None:  # noqa: F811
    rid = fhir_server.report_ids[0]
    h = fhir_server.headers()
    r = _same(fhir_server.base, general, "/Provenance", h, {"target": f"DiagnosticReport/{rid}/_history/1"})
    assert r.status_code == 200 and r.json()["total"] == 1
    assert r.json()["entry"][0]["resource"]["target"][0]["reference"] == f"DiagnosticReport/{rid}/_history/1"
    r = _same(fhir_server.base, general, "/Provenance", h, {"target": f"DiagnosticReport/{rid}/_history/9"})
    assert r.status_code == 200 and r.json()["total"] == 0


def test_21_sort_puts_undated_reports_last_on_both_databases(fhir_server: Server) -> None:
    h = fhir_server.headers()
    for sort in ("date", "-date"):
        body = httpx.get(f"{fhir_server.base}/DiagnosticReport", params={"_sort": sort, "_count": "500"}, headers=h).json()
        dates = [e["resource"].get("effectiveDateTime") for e in body["entry"]]
        assert None in dates
        first_none = dates.index(None)
        assert all(d is None for d in dates[first_none:]), (sort, dates)


# -- item 22, 23 ---------------------------------------------------------------------------------

def test_22_23_patient_tokens_learn_nothing_and_refusals_are_audited(fhir_server: Server,
                                                                     general: str) -> None:  # noqa: F811
    d0 = fhir_server.drafts[0]
    mine = fhir_server.headers(["patient/DiagnosticReport.rs"], user="pt.one", patient=patient_id(d0.study.patient))
    other = _same(fhir_server.base, general, f"/DiagnosticReport/{fhir_server.report_ids[1]}", mine)
    unknown = _same(fhir_server.base, general, "/DiagnosticReport/dr-unknown", mine)
    assert other.status_code == unknown.status_code == 404
    assert other.json()["issue"][0]["code"] == unknown.json()["issue"][0]["code"]
    # refused and failed accesses are recorded, with the real reason in the audit trail
    _same(fhir_server.base, general, "/DiagnosticReport", {})
    _same(fhir_server.base, general, "/DiagnosticReport", fhir_server.headers(["user/Patient.rs"], user="dr.noscope"))
    _same(fhir_server.base, general, "/DiagnosticReport", fhir_server.headers(user="dr.bad"), {"bogus": "1"})
    with session_scope(fhir_server.engine) as s:
        refused = s.exec(select(AuditRecord).where(AuditRecord.outcome == "failure",
                                                   col(AuditRecord.action).like("fhir.%"))).all()
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for rec in refused:
        for e in json.loads(rec.details)["events"]:
            by_actor.setdefault(rec.actor, []).append(e)
    assert [e["status"] for e in by_actor["pt.one"]].count(404) == 4
    assert any("compartment" in e["reason"] for e in by_actor["pt.one"])
    assert [e["status"] for e in by_actor["anonymous"]] == [401, 401]
    assert [e["status"] for e in by_actor["dr.noscope"]] == [403, 403]
    assert [e["status"] for e in by_actor["dr.bad"]] == [400, 400]
    # searches record parameter values
    _same(fhir_server.base, general, "/DiagnosticReport", fhir_server.headers(user="dr.search"), {"status": "partial"})
    with session_scope(fhir_server.engine) as s:
        recs = s.exec(select(AuditRecord).where(AuditRecord.actor == "dr.search")).all()
        assert verify(s).ok
    for rec in recs:
        assert json.loads(rec.details)["events"][0]["params"] == [["status", "partial"]]


# -- item 24, 25, 26 -----------------------------------------------------------------------------

def test_24_openapi_lists_real_statuses_and_bearer(fhir_server: Server) -> None:
    doc = httpx.get(fhir_server.base.removesuffix("/fhir") + "/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    for path, method in (("/fhir/DiagnosticReport", "post"), ("/fhir/DiagnosticReport/{resource_id}", "put")):
        # signed reports in (create/update): 422 is real there, a valid resource that breaks a rule
        codes = set(doc["paths"][path][method]["responses"])
        assert {"200", "201", "400", "401", "403", "422", "500"} <= codes, (path, codes)
        assert doc["paths"][path][method]["responses"]["422"]["description"].startswith("Unprocessable")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if (path, method) in (("/fhir/DiagnosticReport", "post"), ("/fhir/DiagnosticReport/{resource_id}", "put")):
                continue
            assert "422" not in codes, path
            if path not in ("/fhir/metadata", "/fhir/.well-known/smart-configuration"):
                assert {"200", "400", "401", "403", "404", "500"} <= codes, (path, codes)
                assert op.get("security"), path
    review = doc["paths"]["/fhir/DiagnosticReport/{resource_id}/$review"]["post"]["responses"]
    assert {"409", "412", "428"} <= set(review)


def test_25_smart_configuration_is_public(fhir_server: Server, general: str) -> None:  # noqa: F811
    for base in (fhir_server.base, general):
        r = httpx.get(base + "/.well-known/smart-configuration")
        assert r.status_code == 200, r.text
        conf = r.json()
        assert "permission-v2" in conf["capabilities"] and conf["code_challenge_methods_supported"] == ["S256"]
        assert "grant_types_supported" in conf and "token_endpoint" not in conf  # none configured: `taqrir token`
        assert "user/DiagnosticReport.u" in conf["scopes_supported"]


def test_26_links_follow_the_port_without_a_base_url(engine: Any, tmp_path: Any) -> None:
    from taqrir.settings import load_settings
    from tests.conftest import free_port
    from tests.integrations.fhir.conftest import start_server
    port = free_port()
    settings = load_settings(data_dir=tmp_path / "data", database_url=engine.url.render_as_string(hide_password=False),
                             api={"port": port})
    server, thread = start_server(settings, engine)
    try:
        from integrations.fhir.auth import issue_token
        tok = issue_token(settings.api, settings.data_dir, "u", ["user/*.rs"])
        base = f"http://127.0.0.1:{port}/fhir"
        cap = httpx.get(base + "/metadata").json()
        assert cap["implementation"]["url"] == base
        body = httpx.get(base + "/DiagnosticReport", headers={"Authorization": f"Bearer {tok}"}).json()
        assert body["link"][0]["url"].startswith(base + "/DiagnosticReport")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_14_an_abandoned_search_is_cancelled_in_the_database(fhir_server: Server, general: str) -> None:  # noqa: F811
    """A search blocked in PostgreSQL (here: behind a table lock) whose client goes away is
    cancelled there at once, by either door, instead of running on until the statement timeout."""
    if fhir_server.engine.dialect.name != "postgresql":
        pytest.skip("cancellation of a running statement is checked on PostgreSQL")
    import time

    def waiting() -> int:
        with fhir_server.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%fhir_resource%'")).scalar_one())

    h = fhir_server.headers()
    for base in (fhir_server.base, general):
        with fhir_server.engine.connect() as locker:
            tx = locker.begin()
            locker.execute(text("LOCK TABLE fhir_resource IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{base}/DiagnosticReport", params={"status": "partial"}, headers=h, timeout=1.0)
            deadline = time.monotonic() + 3
            while waiting() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert waiting() == 0, "the abandoned search still waits in PostgreSQL"
            tx.rollback()
        assert httpx.get(f"{base}/DiagnosticReport", params={"status": "partial"}, headers=h).status_code == 200
