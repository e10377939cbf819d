"""Signed reports back from a RIS or EHR: ``POST /fhir/DiagnosticReport`` (create) and ``PUT
/fhir/DiagnosticReport/{id}`` (update) with status ``final``, ``amended`` or ``corrected``.

The resource is validated with fhir.resources (R4B), its study found, and it is stored as that
study's signed report (:func:`audit.signed.store_signed_report`: beside the drafts, audited, deltas
recomputed) in one transaction: a refused request stores nothing, and its refusal is audited
(``fhir.signed.refused``). The signed resource is *not* written into the FHIR store: that store
labels every version as AI-asserted research output, which a clinician's signed report is not, and
a PUT to the id of a Taqrir draft's report (``dr-...``) is stored beside that draft while the
draft's own DiagnosticReport stays exactly as it was.

What is read (R4 DiagnosticReport):

* study: ``identifier`` with system ``urn:dicom:uid`` (Study Instance UID, ``urn:oid:`` prefix
  optional) or type ``ACSN`` (v2-0203; accession number); ``imagingStudy`` references to an
  ImagingStudy of this server, or carrying such identifiers; a PUT to a draft's report id: that
  draft's study;
* text per language: ``presentedForm`` (``text/plain`` or ``text/html`` data; its ``language``,
  else the script), ``conclusion`` (the impression), else the narrative ``text.div``;
* signer: first ``resultsInterpreter`` (display, identifier value or reference); signed at
  ``issued``.

Scopes (SMART v2): ``c`` on DiagnosticReport for POST, ``u`` for PUT, from a ``user/`` or
``system/`` scope (e.g. ``system/DiagnosticReport.cu``): a RIS writes for every patient.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select
from starlette.responses import Response

from audit.chain import record
from audit.deltas import script_language
from audit.signed import (
    AmbiguousStudy,
    NoMatchingStudy,
    SignedReportError,
    SignedReportIn,
    SignedText,
    content_version,
    store_signed_report,
)
from audit.signed_report import SIGNED_STATUSES, SignedReport
from ground.clock import utcnow
from ground.db import session_scope
from reporting.fhir.ids import DICOM_UID_SYSTEM, V2_0203
from reporting.fhir.timing import instant

from .auth import Principal
from .deps import IdPath, fhir_api
from .errors import FhirError, Forbidden, InvalidRequest
from .interactions import FhirApi
from .responses import fhir_response, openapi_responses
from .store import FhirResource

log = logging.getLogger(__name__)

_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/h\d)\s*/?>", re.IGNORECASE)


class Unprocessable(FhirError):
    """A valid resource that breaks this server's rules for a signed report (422)."""

    status_code = 422
    issue_code = "business-rule"


class StudyNotFound(Unprocessable):
    issue_code = "not-found"


class StudyAmbiguous(Unprocessable):
    issue_code = "multiple-matches"


async def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    # unlike deps.caller, not kept on the request: the route records its own refusals (_refused)
    return fhir_api(request).verifier.verify(authorization)


PrincipalDep = Annotated[Principal, Depends(_principal)]
BodyDep = Annotated[dict[str, Any], Body(media_type="application/fhir+json")]

router = APIRouter(tags=["signed reports"])


# -- pure: resource -> SignedReportIn -----------------------------------------------------------


def _strip_html(value: str) -> str:
    text = _BREAK.sub("\n", value)
    return html.unescape(_TAG.sub("", text)).strip()


def _attachment_text(att: Any, raw: object) -> tuple[str | None, str]:
    """(language, text) of a presentedForm attachment with inline text data. ``raw`` is the data
    as sent: the models decode base64 leniently (invalid characters are dropped), so it is
    decoded strictly here."""
    ctype = (att.contentType or "").split(";")[0].strip().lower()
    if ctype not in ("text/plain", "text/html") or not isinstance(raw, str):
        return None, ""
    try:
        text = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"presentedForm data is not base64 UTF-8 text: {err}") from err
    if ctype == "text/html":
        text = _strip_html(text)
    lang = (att.language or "").split("-")[0].lower() or None
    return lang, text.strip()


def _lang(declared: str | None, text: str) -> str:
    lang = declared if declared in ("en", "ar") else script_language(text)
    if lang not in ("en", "ar"):
        raise Unprocessable("text in a language other than English or Arabic cannot be compared with the "
                            f"drafts (language {declared or 'unknown'})")
    return lang


def _study_keys(report: DiagnosticReport, session: Session | None) -> tuple[str | None, str | None]:
    uid: str | None = None
    acc: str | None = None
    idents = list(report.identifier or [])
    for ref in report.imagingStudy or []:
        if ref.identifier is not None:
            idents.append(ref.identifier)
        if ref.reference and ref.reference.startswith("ImagingStudy/") and session is not None:
            row = session.get(FhirResource, ("ImagingStudy", ref.reference.split("/")[1]))
            if row is None or not row.study_uid:
                raise StudyNotFound(f"{ref.reference} is not an ImagingStudy of this server")
            uid = uid or row.study_uid
    for ident in idents:
        codes = {c.code for c in (ident.type.coding or [])} if ident.type else set()
        if ident.system == DICOM_UID_SYSTEM and ident.value:
            uid = uid or ident.value.removeprefix("urn:oid:")
        elif "ACSN" in codes and ident.value and (not ident.type or any(
                c.system in (V2_0203, None) for c in ident.type.coding or [])):
            acc = acc or ident.value
    return uid, acc


def signed_from_resource(body: dict[str, Any], *, resource_id: str, session: Session | None,
                         draft_study_uid: str | None = None, actor: str = "") -> SignedReportIn:
    """The signed report a DiagnosticReport carries (see the module docstring); FhirErrors for
    what is wrong with it."""
    if body.get("resourceType") != "DiagnosticReport":
        raise InvalidRequest(f"resourceType must be DiagnosticReport, not {body.get('resourceType')!r}")
    try:
        report = DiagnosticReport.model_validate(body)
    except (ValidationError, ValueError) as err:
        raise InvalidRequest(f"not a valid R4 DiagnosticReport: {str(err)[:800]}") from err
    if report.status not in SIGNED_STATUSES:
        raise Unprocessable(f"status {report.status!r} is not a signed report: send final, amended or corrected "
                            "(drafts come from Taqrir, not to it)")
    uid, acc = _study_keys(report, session)
    uid = uid or draft_study_uid
    if not uid and not acc:
        raise Unprocessable("the report names no study: add an identifier with system urn:dicom:uid (Study "
                            "Instance UID) or of type ACSN (accession number), or an imagingStudy reference")
    pieces: dict[str, dict[str, list[str]]] = {}

    def add(lang: str, part: str, text: str) -> None:
        if text.strip():
            pieces.setdefault(lang, {"text": [], "impression": []})[part].append(text.strip())

    raw_forms = body.get("presentedForm") or []
    for i, att in enumerate(report.presentedForm or []):
        raw = raw_forms[i].get("data") if i < len(raw_forms) and isinstance(raw_forms[i], dict) else None
        declared, text = _attachment_text(att, raw)
        if text:
            add(_lang(declared, text), "text", text)
    if report.conclusion:
        add(_lang(None, report.conclusion), "impression", report.conclusion)
    if not pieces and report.text is not None and report.text.div:
        narrative = _strip_html(report.text.div)
        if narrative:
            add(_lang((report.language or "").split("-")[0] or None, narrative), "text", narrative)
    if not pieces:
        raise Unprocessable("the report has no text: send presentedForm (text/plain or text/html data), "
                            "conclusion or a narrative")
    texts = tuple(
        SignedText(language=lang, impression="\n".join(p["impression"]),  # type: ignore[arg-type]
                   text="\n".join(p["text"]))
        for lang, p in sorted(pieces.items())
    )
    signer_name = signer_id = None
    if report.resultsInterpreter:
        ri = report.resultsInterpreter[0]
        signer_name = ri.display
        signer_id = (ri.identifier.value if ri.identifier is not None else None) or ri.reference
    canonical = json.dumps({k: v for k, v in body.items() if k not in ("meta", "id")}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    issued = report.issued
    return SignedReportIn(
        source="fhir", source_id=resource_id, source_version=content_version(canonical), status=report.status,  # type: ignore[arg-type]
        study_instance_uid=uid, accession_number=acc, texts=texts, signer_name=signer_name, signer_id=signer_id,
        signed_at=issued if isinstance(issued, datetime) else None, raw_ref=f"DiagnosticReport/{resource_id}",
        source_json=canonical, actor=actor)


# -- routes -------------------------------------------------------------------------------------


def _session(request: Request) -> Iterator[Session]:
    with session_scope(fhir_api(request).engine) as session:
        yield session


def _require(principal: Principal, perm: str) -> None:
    principal.require("DiagnosticReport", perm)
    if not principal.unrestricted("DiagnosticReport", perm):
        raise Forbidden(f"signed reports need a user/ or system/ scope with '{perm}' on DiagnosticReport "
                        f"(e.g. system/DiagnosticReport.cu), not a patient/ scope")


def _refused(api: FhirApi, principal: Principal, resource_id: str, err: Exception) -> None:
    try:
        with session_scope(api.engine) as s:
            record(s, action="fhir.signed.refused", actor=principal.subject, entity_type="DiagnosticReport",
                   entity_id=resource_id, outcome="failure",
                   details={"error": type(err).__name__, "reason": str(err)[:500]})
    except SQLAlchemyError:
        log.exception("could not audit a refused signed report")


def _store(api: FhirApi, principal: Principal, body: dict[str, Any], resource_id: str, *, update: bool) -> Response:
    try:
        with session_scope(api.engine) as s:
            draft_uid = None
            known = s.exec(select(SignedReport.id).where(SignedReport.source == "fhir",
                                                         SignedReport.source_id == resource_id)).first()
            if update:
                row = s.exec(select(FhirResource.study_uid).where(
                    FhirResource.resource_type == "DiagnosticReport", FhirResource.id == resource_id)).first()
                draft_uid = row if isinstance(row, str) else None
            signed = signed_from_resource(body, resource_id=resource_id, session=s, draft_study_uid=draft_uid,
                                          actor=principal.subject)
            try:
                result = store_signed_report(s, signed)
            except NoMatchingStudy as err:
                raise StudyNotFound(str(err)) from err
            except AmbiguousStudy as err:
                raise StudyAmbiguous(str(err)) from err
            except SignedReportError as err:
                raise Unprocessable(str(err)) from err
            except ValidationError as err:
                raise Unprocessable(f"the report is not usable: {str(err)[:500]}") from err
    except FhirError as err:
        _refused(api, principal, resource_id, err)
        raise
    except ValidationError as err:
        _refused(api, principal, resource_id, err)
        raise Unprocessable(f"the report is not usable: {str(err)[:500]}") from err
    out = {**body, "id": resource_id,
           "meta": {**(body.get("meta") or {}), "versionId": signed.source_version, "lastUpdated": instant(utcnow())}}
    headers = {"Location": f"{api.base_url}/DiagnosticReport/{resource_id}/_history/{signed.source_version}",
               "ETag": f'W/"{signed.source_version}"',
               "X-Taqrir-Signed-Report": ",".join(str(i) for i in result.signed_ids)}
    status = 200 if result.duplicate or known is not None else 201
    return fhir_response(json.dumps(out, ensure_ascii=False), status, headers)


@router.post("/fhir/DiagnosticReport", response_class=Response, status_code=201,
             responses=openapi_responses(200, 201, 400, 401, 403, 422, 500, 503))
def create_signed(request: Request, principal: PrincipalDep, body: BodyDep) -> Response:
    """A RIS/EHR sends a signed report (final, amended, corrected): stored beside the study's drafts.

    The id is derived from the content (a retried POST of the same resource is stored once)."""
    _require(principal, "c")
    api = fhir_api(request)
    canonical = json.dumps({k: v for k, v in body.items() if k not in ("meta", "id")}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":")) if isinstance(body, dict) else ""
    return _store(api, principal, body, "signed-" + content_version(canonical), update=False)


@router.put("/fhir/DiagnosticReport/{resource_id}", response_class=Response,
            responses=openapi_responses(200, 201, 400, 401, 403, 422, 500, 503))
def update_signed(resource_id: IdPath, request: Request, principal: PrincipalDep, body: BodyDep) -> Response:
    """A RIS/EHR creates or updates its signed report under its own id; a PUT to a Taqrir draft's
    report id is stored beside that draft (the draft's DiagnosticReport is left unchanged)."""
    _require(principal, "u")
    if body.get("id") not in (None, resource_id):
        raise InvalidRequest(f"the body's id {body.get('id')!r} differs from the URL's {resource_id!r}")
    return _store(fhir_api(request), principal, body, resource_id, update=True)
