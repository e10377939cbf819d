"""Signed reports back from the RIS/EHR/reporting system, stored beside the machine drafts.

A radiologist's signed report is what a draft is measured against. It arrives by one of three
doors (a FHIR DiagnosticReport write, an HL7 v2 ORU^R01 over MLLP, a verified DICOM SR); each
adapter turns what it received into a :class:`SignedReportIn` and calls
:func:`store_signed_report`, the one place that

* finds the study (Study Instance UID and/or Accession Number; both must agree when both are
  given; an accession that names several studies needs the UID),
* stores one ``signed_report`` row per language, never touching a draft or its resources,
* is idempotent per ``(source, source_id, source_version, language)``: the same HL7 message
  control id, FHIR resource version or SOP Instance UID received twice is stored once,
* marks earlier signed reports of the same study and language ``current = False`` (an amended or
  corrected report supersedes, the old one stays for the record),
* appends ``signed.received`` to the audit trail in the same transaction, and
* recomputes the draft-versus-signed deltas of the study (:mod:`audit.deltas`).

Failures are :class:`SignedReportError` subclasses whose message says what to fix; adapters map
them to an HL7 AE/AR, a FHIR OperationOutcome or a DIMSE status in one place each.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import update
from sqlmodel import Session, col, select

from audit.chain import lock_chain, record
from audit.deltas import compute_study_deltas
from audit.signed_report import SIGNED_STATUSES, SignedReport
from ground.clock import as_utc, utcnow
from ground.errors import TaqrirError
from integrations.dicom.index import Study

log = logging.getLogger(__name__)

Source = Literal["fhir", "hl7", "dicom"]
SignedStatus = Literal["final", "amended", "corrected", "preliminary"]
Language = Literal["en", "ar"]



class SignedReportError(TaqrirError):
    """A signed report could not be stored."""


class InvalidSignedReport(SignedReportError):
    """The report itself is unusable (no text, unknown status, no study key)."""


class NoMatchingStudy(SignedReportError):
    """No indexed study has this Study Instance UID / Accession Number."""


class AmbiguousStudy(SignedReportError):
    """The keys given name more than one study, or disagree with each other."""


# -- what comes in -----------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SignedText(_In):
    """The signed text in one language."""

    language: Language
    findings: str = ""
    impression: str = ""
    text: str = Field(default="", description="Whole text; built from findings + impression when empty.")

    @model_validator(mode="after")
    def _has_text(self) -> SignedText:
        if not (self.text.strip() or self.findings.strip() or self.impression.strip()):
            raise ValueError(f"the {self.language} text is empty")
        return self

    def whole(self) -> str:
        """The text deltas compare: ``text`` if given, else findings and impression."""
        if self.text.strip():
            return self.text.strip()
        return "\n".join(p.strip() for p in (self.findings, self.impression) if p.strip())


class SignedReportIn(_In):
    """A signed report as an adapter received it (the one shape every door produces)."""

    source: Source
    source_id: str = Field(min_length=1, max_length=128)
    source_version: str = Field(default="", max_length=64)
    study_instance_uid: str | None = Field(default=None, max_length=64)
    accession_number: str | None = Field(default=None, max_length=64)
    status: SignedStatus
    texts: tuple[SignedText, ...] = Field(min_length=1)
    signer_name: str | None = Field(default=None, max_length=324)
    signer_id: str | None = Field(default=None, max_length=128)
    signed_at: datetime | None = None
    raw_ref: str | None = Field(default=None, max_length=256)
    source_json: str | None = Field(default=None, description="The received resource, for FHIR.")
    actor: str = Field(default="", max_length=256, description="Who sent it (calling AE, token subject, MLLP peer).")

    @field_validator("study_instance_uid", "accession_number")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @model_validator(mode="after")
    def _keys(self) -> SignedReportIn:
        if not self.study_instance_uid and not self.accession_number:
            raise ValueError("a signed report needs a Study Instance UID or an Accession Number to find its study")
        langs = [t.language for t in self.texts]
        if len(set(langs)) != len(langs):
            raise ValueError(f"one text per language, got {langs}")
        return self


@dataclass(frozen=True)
class StoreResult:
    """What :func:`store_signed_report` did."""

    study_instance_uid: str
    study_pk: int
    signed_ids: tuple[int, ...]
    duplicate: bool
    deltas: int


def content_version(payload: str | bytes) -> str:
    """A short content hash, for ``source_version`` of resources that change under one id."""
    data = payload.encode() if isinstance(payload, str) else payload
    return hashlib.sha256(data).hexdigest()[:32]


# -- the service -------------------------------------------------------------------------------


def find_study(session: Session, *, study_instance_uid: str | None, accession_number: str | None) -> Study:
    """The one study these keys name (see the module docstring), or a :class:`SignedReportError`."""
    if study_instance_uid:
        study = session.exec(select(Study).where(Study.study_instance_uid == study_instance_uid)).first()
        if study is None:
            raise NoMatchingStudy(
                f"no study with Study Instance UID {study_instance_uid} has been received; send the images "
                "first, or check the UID")
        if accession_number and study.accession_number and study.accession_number != accession_number:
            raise AmbiguousStudy(
                f"study {study_instance_uid} has accession number {study.accession_number!r}, not "
                f"{accession_number!r}: the keys disagree; correct one of them")
        return study
    assert accession_number
    studies = session.exec(
        select(Study).where(Study.accession_number == accession_number).order_by(col(Study.id)).limit(2)
    ).all()
    if not studies:
        raise NoMatchingStudy(
            f"no study with accession number {accession_number!r} has been received; send the images first, "
            "or check the accession number")
    if len(studies) > 1:
        raise AmbiguousStudy(
            f"accession number {accession_number!r} names more than one study: send the Study Instance UID too")
    return studies[0]


def store_signed_report(session: Session, signed: SignedReportIn) -> StoreResult:
    """Store ``signed`` beside the drafts of its study, audited, and recompute the deltas.

    Runs in the caller's transaction (the adapters commit or roll back as a whole: nothing is
    half-stored). Raises :class:`NoMatchingStudy`, :class:`AmbiguousStudy` or
    :class:`InvalidSignedReport`; a refusal is *not* audited here (the caller's transaction rolls
    back): adapters record refusals in their own transaction.
    """
    lock_chain(session)  # serialises writers of the chain; also makes the duplicate check race-free
    study = find_study(session, study_instance_uid=signed.study_instance_uid,
                       accession_number=signed.accession_number)
    study_pk = study.id or 0
    existing = session.exec(
        select(SignedReport).where(SignedReport.source == signed.source, SignedReport.source_id == signed.source_id,
                                   SignedReport.source_version == signed.source_version)
        .order_by(col(SignedReport.id))
    ).all()
    if existing:
        log.info("signed report %s/%s received again: stored once", signed.source, signed.source_id)
        record(session, action="signed.duplicate", actor=signed.actor or signed.source, entity_type="SignedReport",
               entity_id=f"{signed.source}:{signed.source_id}",
               details={"study": study.study_instance_uid, "ids": [r.id for r in existing]})
        return StoreResult(study.study_instance_uid, study_pk, tuple(r.id or 0 for r in existing), True, 0)
    now = utcnow()
    rows: list[SignedReport] = []
    for t in signed.texts:
        current = True
        same = (col(SignedReport.study_pk) == study_pk, col(SignedReport.language) == t.language,
                col(SignedReport.current).is_(True))
        if signed.status not in SIGNED_STATUSES and session.exec(
                select(SignedReport.id).where(*same, col(SignedReport.status).in_(sorted(SIGNED_STATUSES)))).first():
            current = False  # a preliminary report never supersedes a signed one
        else:
            session.exec(update(SignedReport).where(*same).values(current=False))
        row = SignedReport(
            study_pk=study_pk, study_instance_uid=study.study_instance_uid,
            accession_number=signed.accession_number or study.accession_number, source=signed.source,
            source_id=signed.source_id, source_version=signed.source_version, status=signed.status,
            language=t.language, findings=t.findings.strip(), impression=t.impression.strip(), text=t.whole(),
            signer_name=signed.signer_name, signer_id=signed.signer_id,
            signed_at=as_utc(signed.signed_at) if signed.signed_at else None, received_at=now, current=current,
            raw_ref=signed.raw_ref, source_json=signed.source_json,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    ids = tuple(r.id or 0 for r in rows)
    record(session, action="signed.received", actor=signed.actor or signed.source, entity_type="SignedReport",
           entity_id=f"{signed.source}:{signed.source_id}",
           details={"study": study.study_instance_uid, "study_version": study.version, "status": signed.status,
                    "languages": [t.language for t in signed.texts], "ids": list(ids),
                    "source_version": signed.source_version, "raw_ref": signed.raw_ref,
                    "chars": {t.language: len(t.whole()) for t in signed.texts}})
    deltas = compute_study_deltas(session, study_pk)
    log.info("stored signed report %s/%s for study pk %d (%d languages, %d deltas)", signed.source,
             signed.source_id, study_pk, len(rows), deltas)
    return StoreResult(study.study_instance_uid, study_pk, ids, False, deltas)


def current_signed(session: Session, study_pk: int, language: str | None = None) -> list[SignedReport]:
    """The current signed reports of a study (one per language), for the export and deltas."""
    stmt = select(SignedReport).where(col(SignedReport.study_pk) == study_pk, col(SignedReport.current).is_(True))
    if language:
        stmt = stmt.where(col(SignedReport.language) == language)
    return list(session.exec(stmt.order_by(col(SignedReport.language))).all())


def refusal_details(err: Exception, signed: SignedReportIn | None) -> dict[str, object]:
    """Audit details of a refused signed report (identifiers only)."""
    out: dict[str, object] = {"error": type(err).__name__, "reason": str(err)[:500]}
    if signed is not None:
        out.update({"source": signed.source, "source_id": signed.source_id,
                    "study": signed.study_instance_uid, "accession": signed.accession_number})
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]
