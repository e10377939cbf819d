"""The CapabilityStatement (R4 capabilitystatement.html): what this server really does."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from .audit_routes import CAPABILITY as AUDIT_EVENT_CAPABILITY
from .search_params import INCLUDES, REVINCLUDES, SEARCH_PARAMS, SORTS
from .store import RESOURCE_TYPES

REVIEW_OPERATION = "urn:taqrir:fhir:OperationDefinition/DiagnosticReport-review"

_PARAM_TYPES = {
    "_id": "token", "_lastUpdated": "date", "patient": "reference", "subject": "reference", "status": "token",
    "date": "date", "issued": "date", "identifier": "token", "category": "token", "code": "token",
    "target": "reference", "started": "date",
}

REVIEW_DOC = (
    "POST [base]/DiagnosticReport/{id}/$review with a Parameters body: action (valueCode accept|edit|reject), "
    "for edit any of findings-en, impression-en, findings-ar, impression-ar (valueString). Header If-Match: "
    'W/"<current version>" is required (428 without, 412 when stale). Only a partial (machine) report can '
    "be reviewed (409 otherwise; a draft superseded by a newer study version's draft: 409 business-rule naming it). "
    "Edited sections: at most 32,768 characters each. The machine version stays in the history; the review is stored as the next "
    "version: accept/edit -> final with the reviewer (token 'sub'/'name') as resultsInterpreter, reject -> "
    "cancelled; a Provenance (agent verifier, entity revision = the previous version) and an audit record are "
    "written. A language whose text the edit left behind (a section edited in one language only) is dropped "
    "from the reviewed version. AIAST and the research labels stay on every version. Needs scope DiagnosticReport.u."
)


def capability_statement(base_url: str, software_version: str, date: str) -> CapabilityStatement:
    """The statement for a server at ``base_url``."""
    resources: list[dict[str, Any]] = []
    for rtype in RESOURCE_TYPES:
        entry: dict[str, Any] = {
            "type": rtype,
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "interaction": [{"code": c} for c in ("read", "vread", "history-instance", "search-type")],
            "searchParam": [{"name": n, "type": _PARAM_TYPES[n]} for n in sorted(SEARCH_PARAMS[rtype])],
        }
        if INCLUDES.get(rtype):
            entry["searchInclude"] = sorted(INCLUDES[rtype])
        if REVINCLUDES.get(rtype):
            entry["searchRevInclude"] = sorted(REVINCLUDES[rtype])
        entry["documentation"] = "_sort: " + ", ".join(SORTS[rtype]) + "; _count (max 500), _summary=count."
        if rtype == "DiagnosticReport":
            entry["operation"] = [{"name": "review", "definition": REVIEW_OPERATION, "documentation": REVIEW_DOC}]
        resources.append(entry)
    resources.append(AUDIT_EVENT_CAPABILITY)
    data: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "Taqrir",
        "kind": "instance",
        "software": {"name": "Taqrir", "version": software_version},
        "implementation": {"description": "Taqrir research drafts (not for clinical use)", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every machine-made report is a research draft (status partial, meta.security AIAST "
                             "and HRESCH, tag research-only). Unknown search parameters are rejected (400).",
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "description": "Bearer JWT with SMART v2 scopes: .r to read, .s to search, .u to review. "
                               "/metadata and /.well-known/smart-configuration are public; everything else needs a token. Every read, "
                               "search and refusal is audited.",
            },
            "resource": resources,
        }],
    }
    return CapabilityStatement.model_validate(data)
