"""``POST /fhir/DiagnosticReport/{id}/$review``: a clinician accepts, edits or rejects a draft.

The review commits in its own ORM session before the response is built, together with what the
roof hooks in after an accepted or edited review (:class:`VerifiedSrStore`, the verified DICOM SR
of issue 13: ``workers.dicom_objects.store_verified_sr``), so the FHIR room imports no worker."""

from __future__ import annotations

import re
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Body, Header, Request
from fhir.resources.R4B.parameters import Parameters
from pydantic import ValidationError
from sqlmodel import Session
from starlette.responses import Response

from ground.clock import utcnow
from ground.db import session_scope
from reporting.draft import Draft, Language, Sections
from reporting.fhir import Review

from .auth import Principal
from .config import FhirSettings
from .deps import ApiDep, IdPath, PrincipalDep
from .errors import InvalidRequest, PreconditionRequired
from .interactions import check_compartment, version_headers
from .responses import fhir_response, openapi_responses, resource_body
from .store import get_current, review_report, stored_draft

_ETAG = re.compile(r'^(W/)?"(\d+)"$')


class VerifiedSrStore(Protocol):
    """Called in the review's transaction after an accept or edit of a stored draft (the roof
    provides ``workers.dicom_objects.store_verified_sr``)."""

    def __call__(self, session: Session, settings: FhirSettings, draft: Draft, review: Review, *,
                 report_version: int) -> object: ...


def _parse_if_match(value: str | None) -> int:
    if value is None:
        raise PreconditionRequired('If-Match: W/"<version>" is required to review a report')
    m = _ETAG.match(value.strip())
    if not m:
        raise InvalidRequest(f'If-Match {value!r} is not an ETag like W/"1"')
    return int(m.group(2))


MAX_SECTION_CHARS = 32_768
"""Longest text accepted for one edited section (issue 11, item 15). FHIR strings may hold up to
1 MB (R4 datatypes, string), but a radiology report's findings run to a few thousand characters;
32 KiB leaves room for the longest real report while an edit that is megabytes long (a paste
gone wrong, or an attack that would be stored in every version and copied into four presented
forms, the narrative and the audit trail) is refused with a 400 before anything is written."""

_REVIEW_FIELDS: dict[str, tuple[Language, str]] = {"findings-en": ("en", "findings"), "impression-en": ("en", "impression"),
                  "findings-ar": ("ar", "findings"), "impression-ar": ("ar", "impression")}


def review_from_parameters(body: dict[str, Any], principal: Principal,
                           draft_sections: dict[Language, Sections]) -> Review:
    """The :class:`Review` a Parameters body asks for (400 for anything else)."""
    try:
        params = Parameters.model_validate(body)
    except (ValidationError, ValueError) as err:
        raise InvalidRequest(f"body is not a valid Parameters resource: {str(err)[:500]}") from err
    action: str | None = None
    edits: dict[Language, dict[str, str]] = {}
    for p in params.parameter or []:
        if p.name == "action":
            action = p.valueCode
        elif p.name in _REVIEW_FIELDS:
            if not isinstance(p.valueString, str) or not p.valueString.strip():
                raise InvalidRequest(f"parameter {p.name} needs a non-empty valueString")
            if "\x00" in p.valueString:  # PostgreSQL text cannot hold NUL: a 400, not a 500 at INSERT
                raise InvalidRequest(f"parameter {p.name} contains a NUL character")
            if len(p.valueString) > MAX_SECTION_CHARS:
                raise InvalidRequest(f"parameter {p.name} is {len(p.valueString)} characters long; a report section "
                                     f"may have at most {MAX_SECTION_CHARS}")
            lang, section = _REVIEW_FIELDS[p.name]
            edits.setdefault(lang, {})[section] = p.valueString
        else:
            raise InvalidRequest(f"unknown parameter {p.name!r}: use action, {', '.join(_REVIEW_FIELDS)}")
    if action not in ("accept", "edit", "reject"):
        raise InvalidRequest("parameter action (valueCode) must be accept, edit or reject")
    if action == "edit" and not edits:
        raise InvalidRequest("action edit needs at least one of " + ", ".join(_REVIEW_FIELDS))
    if action != "edit" and edits:
        raise InvalidRequest(f"action {action} takes no edited text")
    sections: dict[Language, Sections] = {}
    for lang, fields in edits.items():
        base = draft_sections.get(lang)
        sections[lang] = Sections(findings=fields.get("findings", base.findings if base else ""),
                                  impression=fields.get("impression", base.impression if base else ""))
    return Review(action=action, reviewer_id=principal.subject, reviewer_display=principal.name,  # type: ignore[arg-type]
                  reviewed_at=utcnow(), edits=sections)


router = APIRouter(tags=["review"])


@router.post("/fhir/DiagnosticReport/{resource_id}/$review", response_class=Response,
             responses=openapi_responses(200, 400, 401, 403, 404, 406, 409, 412, 428, 500, 503))
def review(resource_id: IdPath, principal: PrincipalDep,
           body: Annotated[dict[str, Any], Body(media_type="application/fhir+json")],
           request: Request, api: ApiDep, if_match: Annotated[str | None, Header()] = None) -> Response:
    """Accept, edit or reject a draft (see the CapabilityStatement for the rules)."""
    principal.require("DiagnosticReport", "u")
    expected = _parse_if_match(if_match)
    store_verified_sr: VerifiedSrStore = request.app.state.store_verified_sr
    # The transaction commits before the response is built (issue 11, item 11): a FastAPI
    # ``yield`` dependency would commit in its teardown, after the 200 had been sent, so a read
    # right after could see the old version and a failed commit would still have said 200.
    with session_scope(api.engine) as session:
        row = get_current(session, "DiagnosticReport", resource_id)
        check_compartment(principal, row, "u")
        draft = stored_draft(session, row.draft_id) if row.draft_id else None
        sections = {} if draft is None else dict(draft.sections)
        rv = review_from_parameters(body, principal, sections)
        outcome = review_report(session, resource_id, rv, if_match=expected, study_timezone=api.study_timezone)
        if draft is not None and rv.action != "reject":  # the verified SR, in this transaction (issue 13)
            store_verified_sr(session, api.settings, draft, rv,
                              report_version=outcome.version)
        current = get_current(session, "DiagnosticReport", resource_id)
        headers = version_headers(outcome.version, current.last_updated)
    headers["Location"] = f"{api.base_url}/DiagnosticReport/{resource_id}/_history/{outcome.version}"
    return fhir_response(resource_body("DiagnosticReport", outcome.report_json, api.mode), headers=headers)
