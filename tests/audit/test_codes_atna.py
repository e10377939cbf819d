"""The event table and the ATNA message builders, pure: every code search covers exactly the actions
that carry the code, and the syslog/XML bytes are what RFC 5424/5425 and PS3.15 A.5.1 describe."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from audit.atna import AtnaSource, audit_message_xml, frame, parse_frames, syslog_message
from audit.chain import AuditRecord
from audit.codes import EVENT_CLASSES, ActionFilter, actions_for_code, classify, known_patterns

ACTIONS = [
    "fhir.read", "fhir.vread", "fhir.history", "fhir.search", "fhir.publish", "fhir.review.accept",
    "fhir.review.edit", "fhir.review.reject", "audit.read", "audit.search", "audit.export", "atna.tls_failure",
    "association.accepted", "association.refused", "instance.new", "instance.duplicate", "instance.rejected",
    "study.stable", "study.queued", "study.rendered", "draft.created", "draft.rejected", "draft.publish_failed",
    "research.export", "signed.received", "something_else", "fhir.readx", "",
]


def _covers(f: ActionFilter, action: str) -> bool:
    """What the SQL of audit.query does with the filter, in Python."""
    exact, prefixes = known_patterns()
    hit = (action in f.exact or any(action.startswith(p) for p in f.prefixes)
           or (f.other and not (action in exact or any(action.startswith(p) for p in prefixes))))
    excluded = action in f.excluded_exact or any(action.startswith(p) for p in f.excluded_prefixes)
    return hit and not excluded


@pytest.mark.parametrize("subtype", [False, True])
def test_code_search_covers_exactly_the_actions_carrying_the_code(subtype: bool) -> None:
    codes = {(c.system, c.code) for cls in (*EVENT_CLASSES, classify("unknown"))
             for c in (cls.fhir_subtypes if subtype else (cls.fhir_type,))}
    assert codes
    for system, code in codes:
        for sys_arg in (system, None):
            f = actions_for_code(sys_arg, code, subtype=subtype)
            for action in ACTIONS:
                cls = classify(action)
                carried = cls.fhir_subtypes if subtype else (cls.fhir_type,)
                expected = any(c.code == code and (sys_arg is None or c.system == sys_arg) for c in carried)
                assert _covers(f, action) == expected, (system, code, action)


def test_classify_uses_the_dicom_audit_event_ids() -> None:
    assert classify("instance.new").event_id.code == "110107"
    assert classify("fhir.search").event_id.code == "110112"
    assert classify("audit.search").event_id.code == "110101"
    assert classify("association.refused").event_id.code == "110114"
    assert classify("atna.tls_failure").event_id.code == "110113"
    assert classify("research.export").event_id.code == "110106"
    assert classify("anything").event_id.code == "110100"
    assert classify("fhir.readx").event_id.code == "110100"  # exact rows do not match by prefix


SRC = AtnaSource("TAQRIR", "Radiology \"A\"", "https://taqrir.example.org/fhir", "host-1", "taqrir")


def _rec(action: str, details: dict[str, object], outcome: str = "success", etype: str = "Study",
         eid: str = "1.2.3") -> AuditRecord:
    return AuditRecord(seq=42, at=datetime(2026, 12, 5, 8, 0, 1, 250000, tzinfo=UTC), action=action, actor="CT]01",
                       entity_type=etype, entity_id=eid, outcome=outcome, details=json.dumps(details),
                       prev_hash="a" * 64, hash="b" * 64)


def test_dicom_audit_message_structure() -> None:
    xml = audit_message_xml(_rec("instance.new", {"study": "1.2.3", "sop_class": "1.2.840.10008.5.1.4.1.1.2",
                                                  "address": "10.1.2.3"}, etype="Instance", eid="1.2.3.4"), SRC)
    root = ET.fromstring(xml)
    assert [c.tag for c in root] == ["EventIdentification", "ActiveParticipant", "ActiveParticipant",
                                     "AuditSourceIdentification", "ParticipantObjectIdentification"]
    ev = root.find("EventIdentification")
    assert ev is not None and ev.attrib == {"EventActionCode": "C", "EventDateTime": "2026-12-05T08:00:01.250000Z",
                                            "EventOutcomeIndicator": "0"}
    assert ev.find("EventID").attrib == {"csd-code": "110107", "codeSystemName": "DCM", "originalText": "Import"}  # type: ignore[union-attr]
    src, dst = root.findall("ActiveParticipant")
    assert src.get("UserIsRequestor") == "true" and src.get("NetworkAccessPointID") == "10.1.2.3"
    assert src.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert dst.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None and obj.get("ParticipantObjectID") == "1.2.3"
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
    details = {d.get("type"): base64.b64decode(d.get("value") or "").decode() for d in obj.findall("ParticipantObjectDetail")}
    assert details == {"SOPInstanceUID": "1.2.3.4", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    query = ET.fromstring(audit_message_xml(_rec("fhir.search", {"params": ["patient", "status"], "total": 3},
                                                 etype="DiagnosticReport", eid=""), SRC))
    q = query.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert q is not None and base64.b64decode(q.text or "") == b"DiagnosticReport?patient&status"
    failed = ET.fromstring(audit_message_xml(_rec("association.refused", {"reason": "host not allowed"}, "failure",
                                                  etype="Association", eid="10.0.0.9"), SRC))
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    assert failed.findtext("EventIdentification/EventOutcomeDescription") == "host not allowed"


def test_rfc5424_header_and_rfc5425_framing() -> None:
    msg = syslog_message(_rec("study.queued", {"version": 1}), SRC)
    assert msg.startswith(b'<85>1 2026-12-05T08:00:01.250000Z host-1 taqrir - IHE+RFC-3881 '
                          b'[taqrir@32473 seq="42" hash="' + b"b" * 64 + b'"] <AuditMessage>')
    assert not msg[msg.index(b"] ") + 2:].startswith(b"\xef\xbb\xbf")  # no BOM before the XML
    assert syslog_message(_rec("study.failed", {}, "failure"), SRC).startswith(b"<84>1 ")
    framed = frame(msg) + frame("é".encode() * 3)
    messages, rest = parse_frames(framed + b"12 partial")
    assert messages == [msg, "é".encode() * 3] and rest == b"12 partial"
    with pytest.raises(ValueError):
        parse_frames(b"x1 abc")
