"""Chain records as IHE ATNA messages (pure: a record in, bytes out; no sockets here).

* The body is the DICOM audit message (PS3.15 A.5.1, the XML schema descended from RFC 3881):
  ``EventIdentification`` (EventID, EventTypeCode, EventActionCode, EventDateTime,
  EventOutcomeIndicator), one ``ActiveParticipant`` per participant with its RoleIDCode,
  ``AuditSourceIdentification``, and ``ParticipantObjectIdentification`` for the study, resource or
  query involved. Codes come from :mod:`audit.codes`, the table the FHIR AuditEvent view reads too.
* It travels as an RFC 5424 syslog message (IHE ITI-20): ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME
  PROCID MSGID [SD] MSG`` with facility 10 (security/authorization), severity 5 (notice) or 4
  (warning) for failures, MSGID ``IHE+RFC-3881``, and the XML as MSG *without* a UTF-8 BOM (RFC
  5424 allows MSG-ANY; collectors have been seen to reject a leading BOM).
* The structured data element ``[taqrir@32473 seq=".." hash=".."]`` is the idempotency key: the
  record's chain position and hash. A collector (or the auditor's query) that keeps one message per
  ``seq`` drops the rare re-send (see :mod:`audit.ship` for when one happens). 32473 is the private
  enterprise number RFC 5612 reserves for documentation: a site with its own PEN may change it.
* RFC 5425 frames each message on the TLS stream as ``MSG-LEN SP SYSLOG-MSG`` (octet counting).
"""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from .chain import ChainRecord
from .codes import (
    APPLICATION_ROLE,
    DESTINATION_ROLE,
    SOURCE_ROLE,
    STUDY_INSTANCE_UID,
    Code,
    classify,
    outcome_code,
)

FACILITY_AUTHPRIV: Final = 10
SEVERITY_NOTICE: Final = 5
SEVERITY_WARNING: Final = 4
MSGID: Final = "IHE+RFC-3881"
SD_ID: Final = "taqrir@32473"
NAP_MACHINE_NAME: Final = "1"
NAP_IP: Final = "2"


@dataclass(frozen=True)
class AtnaSource:
    """Who sends: the audit source (AE title), site, FHIR base URL, syslog HOSTNAME and APP-NAME."""

    source_id: str
    enterprise_site: str
    base_url: str
    hostname: str
    app_name: str


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    # PS3.15 A.5.1 CodedValueType: csd-code, codeSystemName, originalText required; displayName optional
    system = "DCM" if code.system.endswith("/DCM") else code.system
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": system, "originalText": code.display})


def _participant(root: ET.Element, user_id: str, *, requestor: bool, role: Code | None = None,
                 alt: str | None = None, nap: tuple[str, str] | None = None) -> None:
    attrs = {"UserID": user_id or "unknown", "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = alt
    if nap and nap[0]:
        attrs["NetworkAccessPointID"] = nap[0]
        attrs["NetworkAccessPointTypeCode"] = nap[1]
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _code(el, "RoleIDCode", role)


def _object(root: ET.Element, object_id: str, id_type: Code, *, type_code: str = "2", role: str = "3",
            query: str | None = None, details: dict[str, Any] | None = None) -> None:
    el = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code, "ParticipantObjectTypeCodeRole": role})
    _code(el, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(query.encode()).decode("ascii")
    for key, value in (details or {}).items():
        if value in (None, ""):
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
        ET.SubElement(el, "ParticipantObjectDetail", {"type": key, "value": base64.b64encode(text.encode()).decode("ascii")})


URI: Final = Code("RFC-3881", "12", "URI")


def audit_message_xml(rec: ChainRecord, source: AtnaSource) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of one record, UTF-8, on one line."""
    cls = classify(rec.action)
    try:
        details = json.loads(rec.details) if rec.details else {}
    except ValueError:
        details = {}
    if not isinstance(details, dict):
        details = {"value": details}
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": cls.action,
        "EventDateTime": _timestamp(rec.at),
        "EventOutcomeIndicator": outcome_code(rec.outcome),
    })
    _code(ev, "EventID", cls.event_id)
    for t in cls.event_types:
        _code(ev, "EventTypeCode", t)
    if rec.outcome != "success":
        ET.SubElement(ev, "EventOutcomeDescription").text = str(details.get("reason") or rec.outcome)[:1000]

    server = urlsplit(source.base_url).hostname or source.hostname
    if cls.interaction:
        # BALP's agents in DICOM form: the user (requestor) and the server in its BALP role.
        _participant(root, rec.actor, requestor=True, role=APPLICATION_ROLE if rec.action == "fhir.publish" else None)
        role = SOURCE_ROLE if cls.interaction in ("read", "vread", "history-instance") else DESTINATION_ROLE
        _participant(root, source.base_url, requestor=False, role=role, nap=(server, NAP_MACHINE_NAME))
    elif rec.action.startswith(("association.", "instance.")):
        address = str(details.get("address") or (rec.entity_id.rsplit(":", 1)[0] if rec.entity_type == "Association" else ""))
        _participant(root, rec.actor, requestor=True, role=SOURCE_ROLE, alt=rec.actor or None, nap=(address, NAP_IP))
        called = str(details.get("called_ae") or source.source_id)
        _participant(root, called, requestor=False, role=DESTINATION_ROLE, alt=called, nap=(source.hostname, NAP_MACHINE_NAME))
    else:
        _participant(root, rec.actor, requestor=True, role=APPLICATION_ROLE)

    src_attrs = {"AuditSourceID": source.source_id}
    if source.enterprise_site:
        src_attrs["AuditEnterpriseSiteID"] = source.enterprise_site
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    _code(src, "AuditSourceTypeCode", Code("DCM", "4", "Application Server"))

    study = str(details.get("study") or details.get("study_uid") or (rec.entity_id if rec.entity_type == "Study" else ""))
    if cls.interaction and cls.interaction.startswith("search"):
        found = details.get("events")
        events: list[Any] = found if isinstance(found, list) else [details]
        for item in events:
            if not isinstance(item, dict):
                continue
            names = item.get("params")
            params: list[Any] = names if isinstance(names, list) else []
            rtype = str(item.get("entity_type") or rec.entity_type)
            _object(root, rtype, URI, role="24", query=f"{rtype}?" + "&".join(str(p) for p in params),
                    details={"total": item.get("total")})
    elif rec.action.startswith("instance.") and study:
        _object(root, study, STUDY_INSTANCE_UID, details={"SOPInstanceUID": rec.entity_id, "SOPClassUID": details.get("sop_class")})
    elif study and rec.entity_type == "Study":
        _object(root, study, STUDY_INSTANCE_UID)
    elif rec.entity_type and rec.entity_id and not rec.action.startswith("association."):
        _object(root, f"{rec.entity_type}/{rec.entity_id}", URI, role="4" if rec.entity_type != "DiagnosticReport" else "3")
        if study:
            _object(root, study, STUDY_INSTANCE_UID)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))


def _timestamp(at: datetime) -> str:
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return aware.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sd_value(value: str) -> str:
    # RFC 5424 6.3.3: '"', '\' and ']' are escaped with a backslash inside PARAM-VALUE
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(rec: ChainRecord, source: AtnaSource) -> bytes:
    """The RFC 5424 message (IHE ITI-20) carrying the record's DICOM audit message."""
    severity = SEVERITY_NOTICE if rec.outcome == "success" else SEVERITY_WARNING
    header = (f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {_timestamp(rec.at)} {_printable(source.hostname, 255)} "
              f"{_printable(source.app_name, 48)} - {MSGID} "
              f'[{SD_ID} seq="{rec.seq}" hash="{_sd_value(rec.hash)}"] ')
    return header.encode("ascii") + audit_message_xml(rec, source)


def frame(message: bytes) -> bytes:
    """RFC 5425 4.3: octet-counting framing, ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def parse_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split an RFC 5425 stream into messages; returns (complete messages, the unparsed rest).
    Raises ValueError on a malformed length."""
    out: list[bytes] = []
    pos = 0
    while True:
        space = buffer.find(b" ", pos)
        if space < 0:
            return out, buffer[pos:]
        length_text = buffer[pos:space]
        if not length_text.isdigit() or length_text.startswith(b"0"):
            raise ValueError(f"bad RFC 5425 MSG-LEN {length_text[:20]!r}")
        end = space + 1 + int(length_text)
        if end > len(buffer):
            return out, buffer[pos:]
        out.append(buffer[space + 1:end])
        pos = end
