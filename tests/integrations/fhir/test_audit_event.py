"""``GET /fhir/AuditEvent``: the hash-chained trail as FHIR AuditEvents (BALP shapes, DICOM codes),
searched over a real server on SQLite and PostgreSQL, validated by fhir.resources and the
independent R4 JSON-schema validator."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from audit.chain import AuditRecord, verify
from ground.db import session_scope
from integrations.fhir.audit_event import (
    CHAIN_EXTENSION,
    AuditSource,
    audit_event,
    audit_event_json,
)
from integrations.fhir.audit_routes import parse_date
from integrations.fhir.errors import InvalidRequest
from tests.fhir_validator.validator import assert_valid_r4
from tests.integrations.fhir.conftest import Server

AUDITOR = ["user/AuditEvent.rs"]
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _get(server: Server, path: str, scopes: list[str] | None = None, user: str = "auditor", **params: Any) -> httpx.Response:
    return httpx.get(f"{server.base}/{path}", params=params, headers=server.headers(scopes or AUDITOR, user=user), timeout=30)


def _bundle(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    Bundle.model_validate_json(resp.text)
    return [e["resource"] for e in resp.json().get("entry", [])]


def _codes(ev: dict[str, Any], key: str) -> set[str]:
    value = ev.get(key)
    items = value if isinstance(value, list) else [value] if value else []
    return {c["code"] for c in items}


def _all_pages(server: Server, **params: Any) -> list[dict[str, Any]]:
    resp = _get(server, "AuditEvent", **params)
    out = _bundle(resp)
    while True:
        nxt = [link["url"] for link in resp.json().get("link", []) if link["relation"] == "next"]
        if not nxt:
            return out
        resp = httpx.get(nxt[0], headers=server.headers(AUDITOR, user="auditor"), timeout=30)
        out += _bundle(resp)


def test_search_pages_read_and_every_event_is_valid(fhir_server: Server) -> None:
    reader = fhir_server.client()
    rid = fhir_server.report_ids[0]
    assert reader.get(f"/DiagnosticReport/{rid}").status_code == 200
    assert reader.get("/DiagnosticReport", params={"status": "partial"}).status_code == 200
    with session_scope(fhir_server.engine) as s:
        newest = max(r.seq for r in s.query(AuditRecord).all())  # type: ignore[attr-defined]

    events = _all_pages(fhir_server, _count=7)
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids, reverse=True), "newest first, keyset pages neither skip nor repeat"
    assert set(range(1, newest + 1)) <= set(ids)
    for ev in events:
        AuditEvent.model_validate(ev)
    assert_valid_r4(*events)

    publish = [e for e in events if _ext(e)["action"] == "fhir.publish"]
    assert len(publish) == len(fhir_server.report_ids)
    p = publish[-1]
    assert p["type"]["code"] == "rest" and _codes(p, "subtype") == {"create", "110110"} and p["action"] == "C"
    assert p["entity"][0]["what"]["reference"].startswith("DiagnosticReport/")
    assert p["entity"][0]["role"]["code"] == "3"

    read = next(e for e in events if _ext(e)["action"] == "fhir.read")
    assert _codes(read, "subtype") == {"read", "110110"} and read["action"] == "R"
    agents = {a["type"]["coding"][0]["code"]: a for a in read["agent"]}
    assert agents["IRCP"]["who"]["identifier"]["value"] == "dr.reader" and agents["IRCP"]["requestor"] is True
    assert agents["110153"]["requestor"] is False  # BALP Read: the server is the Source Role ID
    assert read["entity"][0]["what"]["reference"] == f"DiagnosticReport/{rid}/_history/1"

    query = next(e for e in events if _ext(e)["action"] == "fhir.search")
    q = next(x for x in query["entity"] if x["role"]["code"] == "24")
    assert base64.b64decode(q["query"]).decode() == "DiagnosticReport?status=partial"
    assert {a["type"]["coding"][0]["code"] for a in query["agent"]} == {"IRCP", "110152"}

    one = _get(fhir_server, f"AuditEvent/{p['id']}")
    assert one.status_code == 200 and one.json() == p
    assert _get(fhir_server, "AuditEvent/999999999").status_code == 404
    assert _get(fhir_server, "AuditEvent/abc").status_code == 404


def _ext(ev: dict[str, Any]) -> dict[str, str]:
    ext = next(x for x in ev["extension"] if x["url"] == CHAIN_EXTENSION)
    return {x["url"]: x["valueString"] for x in ext["extension"]}


def test_search_parameters(fhir_server: Server) -> None:
    reader = fhir_server.client(user="dr.other")
    rid = fhir_server.report_ids[1]
    assert reader.get(f"/DiagnosticReport/{rid}").status_code == 200
    assert reader.get("/Patient").status_code == 200

    by_agent = _bundle(_get(fhir_server, "AuditEvent", agent="dr.other"))
    assert {_ext(e)["action"] for e in by_agent} == {"fhir.read", "fhir.search"}
    by_entity = _bundle(_get(fhir_server, "AuditEvent", entity=f"DiagnosticReport/{rid}"))
    assert {_ext(e)["action"] for e in by_entity} == {"fhir.publish", "fhir.read"}
    assert _bundle(_get(fhir_server, "AuditEvent", entity=rid)) == by_entity  # a bare id
    queries = _bundle(_get(fhir_server, "AuditEvent", subtype=f"{DCM}|110112"))
    assert queries and all("110112" in _codes(e, "subtype") for e in queries)
    reads = _bundle(_get(fhir_server, "AuditEvent", type="rest", subtype="read", agent="dr.other"))
    assert [_ext(e)["action"] for e in reads] == ["fhir.read"]
    assert _bundle(_get(fhir_server, "AuditEvent", type="110107")) == []  # no DICOM import here
    creates = _bundle(_get(fhir_server, "AuditEvent", action="C", _count=500))
    assert len(creates) == len(fhir_server.report_ids)

    now = datetime.now(UTC)
    today = now.strftime("%Y-%m-%d")
    everything = _bundle(_get(fhir_server, "AuditEvent", _count=500))
    assert len(_bundle(_get(fhir_server, "AuditEvent", date=today, _count=500))) >= len(everything)
    assert _bundle(_get(fhir_server, "AuditEvent", date=f"ne{today}")) == []
    assert _bundle(_get(fhir_server, "AuditEvent", date="lt2000")) == []
    tomorrow = (now + timedelta(days=1)).strftime("%Y-%m-%d")
    assert _bundle(_get(fhir_server, "AuditEvent", date=f"gt{tomorrow}")) == []
    earlier = (now - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ranged = _bundle(_get(fhir_server, "AuditEvent", date=[f"ge{earlier}", f"le{tomorrow}"], _count=500))  # type: ignore[arg-type]
    assert len(ranged) >= len(everything)
    totalled = _get(fhir_server, "AuditEvent", agent="dr.other", _total="accurate", _count=1).json()
    assert totalled["total"] == 2 and len(totalled["entry"]) == 1

    for bad in ({"date": "yesterday"}, {"date": "2026-12-05T08:00"}, {"foo": "1"}, {"_count": "x"},
                {"action": "X"}, {"_sort": "agent"}, {"_id": "\u00b2"}, {"_cursor": "9" * 30}, {"agent": "a\x00b"},
                {"date": "\u0662\u0660\u0662\u0666"}):
        resp = _get(fhir_server, "AuditEvent", **bad)
        assert resp.status_code == 400, bad
        assert resp.json()["resourceType"] == "OperationOutcome"


def test_scopes_and_the_audit_of_the_audit(fhir_server: Server) -> None:
    assert httpx.get(f"{fhir_server.base}/AuditEvent").status_code == 401
    assert _get(fhir_server, "AuditEvent", scopes=["user/*.rs"]).status_code == 403  # wildcards do not open it
    h = fhir_server.headers(["patient/AuditEvent.rs"], patient="p1")
    assert httpx.get(f"{fhir_server.base}/AuditEvent", headers=h).status_code == 403
    assert _get(fhir_server, "AuditEvent", scopes=["user/AuditEvent.r"]).status_code == 403  # search needs .s
    assert _get(fhir_server, "AuditEvent/1", scopes=["user/AuditEvent.r"], user="sys").status_code == 200
    assert _get(fhir_server, "AuditEvent", scopes=["system/AuditEvent.s"], user="sys", agent="nobody").status_code == 200

    used = _bundle(_get(fhir_server, "AuditEvent", subtype=f"{DCM}|110101", agent="sys"))
    assert {_ext(e)["action"] for e in used} == {"audit.read", "audit.search"}
    read = next(e for e in used if _ext(e)["action"] == "audit.read")
    assert read["entity"][0]["what"]["reference"] == "AuditEvent/1"
    with session_scope(fhir_server.engine) as s:
        assert verify(s).ok

    meta = httpx.get(f"{fhir_server.base}/metadata").json()
    CapabilityStatement.model_validate(meta)
    entry = next(r for r in meta["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert {p["name"] for p in entry["searchParam"]} >= {"date", "agent", "entity", "type", "subtype"}
    assert {i["code"] for i in entry["interaction"]} == {"read", "search-type"}


def _rec(seq: int, action: str, actor: str, etype: str, eid: str, outcome: str, details: dict[str, Any]) -> AuditRecord:
    return AuditRecord(seq=seq, at=datetime.now(UTC), action=action, actor=actor, entity_type=etype, entity_id=eid,
                       outcome=outcome, details=json.dumps(details), prev_hash="0" * 64, hash=f"{seq:064x}")


def test_builder_dicom_event_shapes() -> None:
    src = AuditSource("http://taqrir.example.org/fhir", ae_title="TAQRIR", site="Radiology")
    recs = [
        _rec(1, "association.accepted", "CT01", "Association", "10.0.0.7:40000", "success",
             {"address": "10.0.0.7", "called_ae": "TAQRIR"}),
        _rec(2, "association.refused", "", "Association", "10.0.0.9", "failure",
             {"address": "10.0.0.9", "reason": "host not allowed"}),
        _rec(3, "instance.new", "CT01", "Instance", "1.2.3.4.5", "success",
             {"study": "1.2.3", "series": "1.2.3.4", "sop_class": "1.2.840.10008.5.1.4.1.1.2", "study_version": 1}),
        _rec(4, "study.queued", "taqrir-worker", "Study", "1.2.3", "success", {"version": 1}),
        _rec(5, "draft.created", "taqrir-worker", "Draft", "d-1", "success", {"study": "1.2.3"}),
        _rec(6, "fhir.review.edit", "dr.b", "DiagnosticReport", "r-1", "success", {"from_version": 1, "to_version": 2}),
        _rec(7, "atna.tls_failure", "taqrir", "Collector", "arr:6514", "failure", {"reason": "bad certificate"}),
        _rec(8, "something.new", "x", "", "", "success", {}),
    ]
    events = [json.loads(audit_event(r, src).model_dump_json()) for r in recs]
    assert [e["id"] for e in events] == [audit_event_json(r, src)["id"] for r in recs]
    assert_valid_r4(*events)
    acc, ref, imp, study, draft, review, alert, other = events
    assert acc["type"]["code"] == "110114" and _codes(acc, "subtype") == {"110122"} and acc["outcome"] == "0"
    caller = next(a for a in acc["agent"] if a["requestor"])
    assert caller["type"]["coding"][0]["code"] == "110153" and caller["network"] == {"address": "10.0.0.7", "type": "2"}
    assert ref["outcome"] == "4" and ref["outcomeDesc"] == "host not allowed"
    assert imp["type"]["code"] == "110107" and imp["action"] == "C"
    ident = imp["entity"][0]["what"]["identifier"]
    assert ident["value"] == "urn:oid:1.2.3" and ident["type"]["coding"][0]["code"] == "110180"
    assert study["type"]["code"] == "110111" and study["action"] == "U"
    assert draft["type"]["code"] == "110110" and draft["agent"][0]["type"]["coding"][0]["code"] == "110150"
    assert review["type"]["code"] == "rest" and _codes(review, "subtype") == {"update", "110110"}
    assert review["agent"][0]["type"]["coding"][0]["code"] == "AUT"  # BALP Update: the user is the author
    assert review["entity"][0]["what"]["reference"] == "DiagnosticReport/r-1/_history/2"
    assert alert["type"]["code"] == "110113" and _codes(alert, "subtype") == {"110126"}
    assert other["type"]["code"] == "110100"
    assert all(_ext(e)["hash"] == f"{int(e['id']):064x}" for e in events)


@pytest.mark.parametrize(("value", "start", "end"), [
    ("2026", "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("2026-12", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("ge2026-02-28", "2026-02-28T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
    ("lt2026-12-05T08:00+03:00", "2026-12-05T05:00:00+00:00", "2026-12-05T05:01:00+00:00"),
    ("2026-12-05T08:00:01Z", "2026-12-05T08:00:01+00:00", "2026-12-05T08:00:02+00:00"),
])
def test_date_precision_is_a_range(value: str, start: str, end: str) -> None:
    d = parse_date(value)
    assert (d.start.isoformat(), d.end.isoformat()) == (start, end)


def test_bad_dates_are_refused() -> None:
    for bad in ("2026-13", "2026-02-30", "gt", "2026-12-05T25:00Z"):
        with pytest.raises(InvalidRequest):
            parse_date(bad)
