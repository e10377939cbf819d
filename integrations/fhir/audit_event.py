"""Chain records as FHIR R4 AuditEvent resources (pure: a record in, a resource out).

Each record of the hash-chained trail (:class:`audit.chain.AuditRecord`) is one AuditEvent whose
id is the record's ``seq``. What kind of event it is comes from :mod:`audit.codes` (the one table
shared with the ATNA syslog messages):

* FHIR RESTful interactions (``fhir.read``/``vread``/``history``, ``fhir.search``,
  ``fhir.publish``, ``fhir.review.*`` and this view's own ``audit.read``/``audit.search``) take
  the shapes of IHE Basic Audit Log Patterns (BALP) Read, Query, Create and Update: ``type``
  ``audit-event-type#rest``, ``subtype`` the ``restful-interaction`` code *and* the DICOM event ID
  (110110 Patient Record, 110112 Query, 110101 Audit Log Used), the user agent (``IRCP`` information
  recipient for reads and queries, ``AUT`` author for creates and updates, requestor), the server
  agent with BALP's role (Read: 110153 Source Role ID; Query/Create/Update: 110152 Destination Role
  ID, as BALP follows DICOM's direction of the request), an ``entity[data]`` (type 2 System Object,
  role 4 Domain Resource or 3 Report) per resource touched, and for queries an
  ``entity[query]`` (type 2, role 24 Query, ``query`` base64).
* DICOM network events take the PS3.15 A.5.3 shapes: associations are 110114 User Authentication
  (110122 Login) with the calling AE as 110153 Source Role ID and Taqrir as 110152 Destination;
  stored instances 110107 Import with the study (110180 Study Instance UID) as participant object;
  lifecycle changes 110111 Procedure Record; drafts 110110 Patient Record.

Where this differs from BALP: the chain does not keep the client's network address, OAuth client
id, so the ``client`` agent is absent; ``entity[query].query`` holds ``<type>?<query string>``
rebuilt from the recorded parameters and values (records older than that keep only the names);
``meta.profile`` therefore claims no BALP
profile. Records written by group commit that hold several accesses (see
:mod:`audit.access_writer`) become one AuditEvent with an entity per access.

The record's place in the chain (``prev_hash``, ``hash``, the raw ``action``) travels in the
extension :data:`CHAIN_EXTENSION`, so an auditor can re-verify a page without the database.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from fhir.resources.R4B.auditevent import AuditEvent

from audit.chain import ChainRecord
from audit.codes import (
    APPLICATION_ROLE,
    DESTINATION_ROLE,
    SOURCE_ROLE,
    STUDY_INSTANCE_UID,
    Code,
    classify,
    outcome_code,
)
from reporting.fhir.timing import instant

CHAIN_EXTENSION: Final = "urn:taqrir:fhir:StructureDefinition/audit-chain"
ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE_NAME: Final = "1"  # machine name (R4 network-type)
NETWORK_TYPE_IP: Final = "2"
NETWORK_TYPE_URI: Final = "5"
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
FHIR_TYPES: Final = frozenset({"DiagnosticReport", "Patient", "ImagingStudy", "Device", "Provenance", "AuditEvent"})


@dataclass(frozen=True)
class AuditSource:
    """Who records: Taqrir's FHIR base URL, DICOM AE title and site (AuditEvent.source)."""

    base_url: str
    ae_title: str = "TAQRIR"
    site: str = "Taqrir"


def _coding(code: Code) -> dict[str, str]:
    return {"system": code.system, "code": code.code, "display": code.display}


APPLICATION_ROLE_CODING: Final = _coding(APPLICATION_ROLE)


def _who(value: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"identifier": {"value": value or "unknown"}}
    if display:
        ref["display"] = display
    return ref


def _role_agent(role: Code, who: str, *, requestor: bool, network: tuple[str, str] | None = None,
                alt_id: str | None = None) -> dict[str, Any]:
    agent: dict[str, Any] = {"type": {"coding": [_coding(role)]}, "who": _who(who), "requestor": requestor}
    if alt_id:
        agent["altId"] = alt_id
    if network and network[0]:
        agent["network"] = {"address": network[0], "type": network[1]}
    return agent


def _resource_what(rtype: str, rid: str, version: Any = None) -> dict[str, Any]:
    if rtype in FHIR_TYPES and rid:
        ref = f"{rtype}/{rid}" + (f"/_history/{version}" if isinstance(version, int) else "")
        return {"reference": ref}
    return {"identifier": {"value": rid or "unknown"}, "display": rtype or "unknown"}


def _data_entity(what: dict[str, Any], rtype: str, detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    role = ("3", "Report") if rtype == "DiagnosticReport" else ("4", "Domain Resource")
    entity: dict[str, Any] = {
        "what": what,
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": role[0], "display": role[1]},
    }
    if detail:
        entity["detail"] = [{"type": "taqrir", "valueString": json.dumps(dict(detail), sort_keys=True,
                                                                         ensure_ascii=False, default=str)}]
    return entity


def _study_entity(study_uid: str, detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """PS3.15 A.5.3 participant object "Study": type 2 System Object, role 3 Report, ID type 110180."""
    entity: dict[str, Any] = {
        "what": {"identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}",
                                "type": {"coding": [_coding(STUDY_INSTANCE_UID)]}}},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
    }
    if detail:
        entity["detail"] = [{"type": k, "valueString": str(v)} for k, v in sorted(detail.items()) if v not in (None, "")]
        if not entity["detail"]:
            del entity["detail"]
    return entity


def _query_text(params: object) -> str:
    """The query string of a search record: ``[[name, value], ...]`` pairs (the form the API
    records since searches keep their values) url-encoded, or bare names (older records)."""
    if not isinstance(params, list):
        return ""
    pairs = [(str(p[0]), str(p[1])) for p in params if isinstance(p, list | tuple) and len(p) == 2]
    if len(pairs) == len(params):
        return urlencode(pairs)
    return "&".join(str(p) for p in params)


def _query_entity(rtype: str, query_string: str) -> dict[str, Any]:
    text = f"{rtype}?{query_string}"
    return {
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
        "description": text,
        "query": base64.b64encode(text.encode()).decode("ascii"),
    }


def _events(rec: ChainRecord, details: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The accesses a record holds: ``details.events`` (group commit), else the record itself."""
    events = details.get("events")
    if isinstance(events, list) and events and all(isinstance(e, dict) for e in events):
        return events
    return [{"entity_type": rec.entity_type, "entity_id": rec.entity_id, **details}]


def _rest_entities(rec: ChainRecord, details: Mapping[str, Any], interaction: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ev in _events(rec, details):
        rtype = str(ev.get("entity_type") or rec.entity_type)
        if interaction.startswith("search"):
            params = ev.get("params")
            query = _query_entity(rtype, _query_text(params))
            if ev.get("total") is not None:
                query["detail"] = [{"type": "total", "valueString": str(ev["total"])}]
            out.append(query)
            returned = ev.get("returned")
            for ref in returned if isinstance(returned, list) else []:
                parts = str(ref).split("/")
                if len(parts) >= 2:
                    version = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else None
                    out.append(_data_entity(_resource_what(parts[0], parts[1], version), parts[0]))
            continue
        rid = str(ev.get("entity_id") or "")
        version = ev.get("version", ev.get("to_version"))
        extra = {k: v for k, v in ev.items() if k not in ("entity_type", "entity_id", "at", "version", "events")}
        out.append(_data_entity(_resource_what(rtype, rid, version), rtype, extra or None))
    return out


def _agents(rec: ChainRecord, details: Mapping[str, Any], source: AuditSource) -> list[dict[str, Any]]:
    cls = classify(rec.action)
    server = urlsplit(source.base_url).hostname or source.base_url
    if cls.interaction:
        machine = rec.action == "fhir.publish"
        if cls.interaction in ("create", "update"):
            user_type = ("AUT", "author")
            server_role = DESTINATION_ROLE
        else:
            user_type = ("IRCP", "information recipient")
            server_role = DESTINATION_ROLE if cls.interaction.startswith("search") else SOURCE_ROLE
        user: dict[str, Any] = {
            "type": {"coding": [APPLICATION_ROLE_CODING if machine else
                                {"system": PARTICIPATION, "code": user_type[0], "display": user_type[1]}]},
            "who": _who(rec.actor),
            "name": rec.actor or "unknown",
            "requestor": True,
        }
        return [user, _role_agent(server_role, source.base_url, requestor=False,
                                  network=(server, NETWORK_TYPE_NAME))]
    if rec.action.startswith(("association.", "instance.")):
        address = str(details.get("address") or "")
        if not address and rec.entity_type == "Association":
            address = rec.entity_id.rsplit(":", 1)[0]
        called = str(details.get("called_ae") or source.ae_title)
        return [
            _role_agent(SOURCE_ROLE, rec.actor, requestor=True, alt_id=rec.actor or None,
                        network=(address, NETWORK_TYPE_IP) if address else None),
            _role_agent(DESTINATION_ROLE, called, requestor=False, alt_id=called, network=(server, NETWORK_TYPE_NAME)),
        ]
    return [_role_agent(APPLICATION_ROLE, rec.actor, requestor=True)]



def _entities(rec: ChainRecord, details: Mapping[str, Any]) -> list[dict[str, Any]]:
    cls = classify(rec.action)
    if cls.interaction:
        return _rest_entities(rec, details, cls.interaction)
    if rec.action.startswith("instance."):
        study = str(details.get("study") or "")
        ents = [_study_entity(study, {"sop_instance_uid": rec.entity_id, "sop_class_uid": details.get("sop_class"),
                                      "series_instance_uid": details.get("series"),
                                      "study_version": details.get("study_version")})] if study else []
        if not ents and rec.entity_id:
            ents.append(_data_entity(_resource_what("Instance", rec.entity_id), "Instance"))
        return ents
    if rec.entity_type == "Study" and rec.entity_id:
        return [_study_entity(rec.entity_id, {k: v for k, v in details.items() if isinstance(v, (str, int, float))})]
    if rec.action.startswith("association."):
        return []
    if rec.entity_id or rec.entity_type:
        return [_data_entity(_resource_what(rec.entity_type, rec.entity_id), rec.entity_type, details or None)]
    return []


def audit_event_json(rec: ChainRecord, source: AuditSource) -> dict[str, Any]:
    """The AuditEvent (R4 JSON) of one chain record."""
    cls = classify(rec.action)
    try:
        details = json.loads(rec.details) if rec.details else {}
    except ValueError:
        details = {}
    if not isinstance(details, dict):
        details = {"value": details}
    recorded = instant(rec.at)
    data: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(rec.seq),
        "meta": {"lastUpdated": recorded},
        "extension": [{
            "url": CHAIN_EXTENSION,
            "extension": [
                {"url": "action", "valueString": rec.action},
                {"url": "prev-hash", "valueString": rec.prev_hash},
                {"url": "hash", "valueString": rec.hash},
            ],
        }],
        "type": _coding(cls.fhir_type),
        "action": cls.action,
        "recorded": recorded,
        "outcome": outcome_code(rec.outcome),
        "agent": _agents(rec, details, source),
        "source": {
            "site": source.site,
            "observer": {"identifier": {"value": source.ae_title}, "display": source.site},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    subtypes = cls.fhir_subtypes
    if subtypes:
        data["subtype"] = [_coding(c) for c in subtypes]
    if rec.outcome != "success":
        reason = details.get("reason") or details.get("error") or rec.outcome
        data["outcomeDesc"] = str(reason)[:1000]
    entities = _entities(rec, details)
    if entities:
        data["entity"] = entities
    return data


def audit_event(rec: ChainRecord, source: AuditSource) -> AuditEvent:
    """:func:`audit_event_json` parsed into (and so checked by) the fhir.resources R4B model."""
    return AuditEvent.model_validate(audit_event_json(rec, source))
