"""Versioned FHIR resources in the database: current rows, history rows and search indexes.

``fhir_resource`` holds the current version of each resource with its search columns;
``fhir_resource_history`` every version ever written (read by vread and ``_history``);
``fhir_search_token`` the token parameters (identifier, category, code) of current versions;
``fhir_draft`` which draft became which report. The draft itself (what a review rebuilds the report
from, what supersession compares) is read from the pipeline's ``draft`` table
(:class:`reporting.draft_record.DraftRecord`); it is stored once.

Writes go through :func:`put_resource`, which bumps the version only when the content changed and
re-applies the research labels (:mod:`reporting.labels`) to every version, so no path can drop them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import Column, DateTime, Index, Text, bindparam, delete, text
from sqlalchemy.engine import Connection
from sqlmodel import Field, Session, SQLModel, col, select

from audit.chain import record
from audit.deltas import compute_study_deltas
from ground.clock import as_utc, utcnow
from reporting.draft import Draft
from reporting.draft_record import DraftRecord
from reporting.fhir import Review, build_resources, build_review_provenance, build_reviewed_report
from reporting.fhir.ids import device_id, report_id
from reporting.fhir.supersession import (
    build_superseded_report,
    build_supersession_provenance,
    superseded_by,
)
from reporting.fhir.timing import instant
from reporting.labels import with_labels

from .errors import Conflict, InvalidRequest, NotFound, PreconditionFailed, Superseded

log = logging.getLogger(__name__)

RESOURCE_TYPES = ("DiagnosticReport", "Patient", "ImagingStudy", "Device", "Provenance")

Reader = Session | Connection
"""What the read functions take: an ORM session, or a plain connection (the API's hot path)."""


class FhirResource(SQLModel, table=True):
    """Current version of a resource, with its search columns."""

    __tablename__ = "fhir_resource"
    __table_args__ = (
        Index("ix_fhir_resource_type_patient", "resource_type", "patient_ref"),
        Index("ix_fhir_resource_type_study", "resource_type", "study_uid"),
        Index("ix_fhir_resource_type_target", "resource_type", "target_ref"),
        Index("ix_fhir_resource_type_updated", "resource_type", "last_updated"),
        Index("ix_fhir_resource_type_effective", "resource_type", "effective"),
        Index("ix_fhir_resource_type_issued", "resource_type", "issued"),
    )

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version_id: int
    last_updated: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    content_hash: str = Field(max_length=64, description="SHA-256 of the JSON without meta.versionId/lastUpdated.")
    json_text: str = Field(sa_column=Column("json", Text, nullable=False))
    draft_id: str | None = Field(default=None, max_length=128, index=True)
    patient_ref: str | None = Field(default=None, max_length=128)
    study_uid: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)
    effective: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    issued: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    target_ref: str | None = Field(default=None, max_length=160)


class FhirResourceVersion(SQLModel, table=True):
    """Every version of every resource, never updated."""

    __tablename__ = "fhir_resource_history"

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version_id: int = Field(primary_key=True)
    last_updated: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    json_text: str = Field(sa_column=Column("json", Text, nullable=False))


class FhirSearchToken(SQLModel, table=True):
    """One token search value (system|code) of a current resource."""

    __tablename__ = "fhir_search_token"
    __table_args__ = (Index("ix_fhir_token_lookup", "resource_type", "name", "code"),)

    resource_type: str = Field(primary_key=True, max_length=64)
    resource_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=32)
    system: str = Field(primary_key=True, max_length=256)
    code: str = Field(primary_key=True, max_length=256)


class FhirDraft(SQLModel, table=True):
    """A published draft (immutable): the report it became. Its content is the ``draft`` row of the
    same ``draft_id``."""

    __tablename__ = "fhir_draft"

    draft_id: str = Field(primary_key=True, max_length=128)
    report_id: str = Field(max_length=64, index=True)
    study_uid: str = Field(max_length=128)
    published_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


@dataclass
class Indexed:
    """What search needs from one resource."""

    patient_ref: str | None = None
    study_uid: str | None = None
    status: str | None = None
    effective: datetime | None = None
    issued: datetime | None = None
    target_ref: str | None = None
    tokens: list[tuple[str, str, str]] = field(default_factory=list)


def parse_instant(value: str) -> datetime:
    """A FHIR dateTime/instant with offset as aware UTC (date-only values: midnight UTC)."""
    dt = datetime.fromisoformat(value) if "T" in value else datetime.fromisoformat(value + "T00:00:00+00:00")
    return as_utc(dt)


def _identifier_tokens(items: list[dict[str, Any]] | None) -> list[tuple[str, str, str]]:
    return [("identifier", i.get("system", ""), i["value"]) for i in items or [] if i.get("value")]


def _coding_tokens(name: str, concepts: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(name, c.get("system", ""), c["code"]) for cc in concepts for c in cc.get("coding", []) if c.get("code")]


def index_of(data: dict[str, Any]) -> Indexed:
    """Search columns and tokens of a resource's JSON (R4 search parameters of each type)."""
    rtype = data["resourceType"]
    ix = Indexed(tokens=_identifier_tokens(data.get("identifier")))
    if rtype == "DiagnosticReport":
        ix.patient_ref = (data.get("subject") or {}).get("reference")
        ix.status = data.get("status")
        ix.effective = parse_instant(data["effectiveDateTime"]) if data.get("effectiveDateTime") else None
        ix.issued = parse_instant(data["issued"]) if data.get("issued") else None
        for ident in data.get("identifier", []):
            if ident.get("system") == "urn:dicom:uid":
                ix.study_uid = ident["value"].removeprefix("urn:oid:")
        ix.tokens += _coding_tokens("category", data.get("category", []))
        ix.tokens += _coding_tokens("code", [data["code"]])
    elif rtype == "ImagingStudy":
        ix.patient_ref = (data.get("subject") or {}).get("reference")
        ix.status = data.get("status")
        ix.effective = parse_instant(data["started"]) if data.get("started") else None
        for ident in data.get("identifier", []):
            if ident.get("system") == "urn:dicom:uid":
                ix.study_uid = ident["value"].removeprefix("urn:oid:")
    elif rtype == "Patient":
        ix.patient_ref = f"Patient/{data['id']}"
    elif rtype == "Provenance":
        targets = [t.get("reference", "") for t in data.get("target", [])]
        ix.target_ref = targets[0].split("/_history/")[0] if targets else None
    ix.tokens = list(dict.fromkeys(ix.tokens))
    return ix


def _content_hash(data: dict[str, Any]) -> str:
    meta = {k: v for k, v in (data.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    body = {**data, "meta": meta}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def dumps(data: dict[str, Any]) -> str:
    """The stored JSON form: compact, UTF-8 text."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def put_resource(session: Session, data: dict[str, Any], *, now: datetime | None = None,
                 draft_id: str | None = None, force: bool = False) -> tuple[int, bool]:
    """Store ``data`` as the current version of its resource. Returns ``(version, changed)``:
    unchanged content keeps the current version unless ``force``."""
    rtype, rid = data["resourceType"], data["id"]
    data = {**data, "meta": with_labels(data.get("meta"))}
    chash = _content_hash(data)
    current = session.get(FhirResource, (rtype, rid))
    if current is not None and current.content_hash == chash and not force:
        return current.version_id, False
    version = (current.version_id + 1) if current else 1
    stamp = as_utc(now or utcnow())
    meta = dict(data["meta"])
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(stamp)
    data["meta"] = {"versionId": meta.pop("versionId"), "lastUpdated": meta.pop("lastUpdated"), **meta}
    body = dumps(data)
    ix = index_of(data)
    if current is None:
        current = FhirResource(resource_type=rtype, id=rid, version_id=version, last_updated=stamp,
                               content_hash=chash, json_text=body)
    current.version_id, current.last_updated, current.content_hash, current.json_text = version, stamp, chash, body
    current.draft_id = draft_id or current.draft_id
    current.patient_ref, current.study_uid, current.status = ix.patient_ref, ix.study_uid, ix.status
    current.effective, current.issued, current.target_ref = ix.effective, ix.issued, ix.target_ref
    session.add(current)
    session.add(FhirResourceVersion(resource_type=rtype, id=rid, version_id=version, last_updated=stamp, json_text=body))
    session.exec(delete(FhirSearchToken).where(FhirSearchToken.resource_type == rtype, FhirSearchToken.resource_id == rid))
    for name, system, code in ix.tokens:
        session.add(FhirSearchToken(resource_type=rtype, resource_id=rid, name=name, system=system, code=code))
    session.flush()
    return version, True


def _json(resource: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(resource.model_dump_json())
    return out


_PG_PUBLISH_LOCK = 0x7A71_F41E  # arbitrary constant naming "FHIR publishing"


def _lock_publishing(session: Session) -> None:
    """Serialise publishers (drafts of one patient or study share Patient/ImagingStudy rows).
    PostgreSQL: a transaction advisory lock; SQLite: BEGIN IMMEDIATE already serialises writers."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=_PG_PUBLISH_LOCK))


def publish_draft(session: Session, draft: Draft, *, study_timezone: tzinfo = UTC, actor: str = "pipeline") -> str:
    """Store every resource of ``draft`` and return the DiagnosticReport id.

    Idempotent per ``draft.draft_id``: publishing a draft again creates nothing. Patient,
    ImagingStudy and Device get a new version only when their content changed. Audited as
    ``fhir.publish`` in the caller's transaction.
    """
    _lock_publishing(session)
    existing = session.get(FhirDraft, draft.draft_id)
    if existing is not None:
        return existing.report_id
    if stored_draft(session, draft.draft_id) is None:
        raise ValueError(f"draft {draft.draft_id} is not in the draft table: store it (the pipeline's persist "
                         "stage) before publishing; reviews and supersession read it from there")
    res = build_resources(draft, study_timezone=study_timezone)
    now = utcnow()
    versions: dict[str, int] = {}
    for resource in (res.patient, res.imaging_study, res.device):
        data = _json(resource)
        versions[data["resourceType"]], _ = put_resource(session, data, now=now)
    rid = report_id(draft)
    versions["DiagnosticReport"], _ = put_resource(session, _json(res.report), now=now, draft_id=draft.draft_id)
    versions["Provenance"], _ = put_resource(session, _json(res.provenance), now=now, draft_id=draft.draft_id)
    session.add(FhirDraft(draft_id=draft.draft_id, report_id=rid, study_uid=draft.study.study_instance_uid,
                          published_at=now))
    record(session, action="fhir.publish", actor=actor, entity_type="DiagnosticReport", entity_id=rid,
           details={"draft_id": draft.draft_id, "study_uid": draft.study.study_instance_uid,
                    "study_version": draft.study.version, "versions": versions})
    session.flush()
    _supersede_versions(session, draft, rid, now=now, actor=actor)
    log.info("published draft %s as DiagnosticReport/%s", draft.draft_id, rid)
    return rid


def _supersede_versions(session: Session, draft: Draft, rid: str, *, now: datetime, actor: str) -> None:
    """Supersede the unreviewed drafts of older versions of ``draft``'s study by ``rid``; or, when
    a newer version was published first (a late publish), supersede ``rid`` by the newest one.
    In the publishing transaction (:mod:`reporting.fhir.supersession` says what is written, why)."""
    others = session.exec(
        select(FhirDraft.report_id, DraftRecord.version, DraftRecord.draft_id)
        .join(DraftRecord, col(DraftRecord.draft_id) == col(FhirDraft.draft_id))
        .where(FhirDraft.study_uid == draft.study.study_instance_uid, FhirDraft.draft_id != draft.draft_id)
    ).all()
    newest: tuple[int, str, str] | None = None
    for other_rid, version, other_draft_id in others:
        if version < draft.study.version:
            supersede_report(session, other_rid, by=rid, by_study_version=draft.study.version,
                             by_device=device_id(draft.model), now=now, actor=actor)
        elif version > draft.study.version and (newest is None or version > newest[0]):
            newest = (version, other_rid, other_draft_id)
    if newest is not None:
        newer = stored_draft(session, newest[2])
        assert newer is not None  # joined above
        supersede_report(session, rid, by=newest[1], by_study_version=newest[0],
                         by_device=device_id(newer.model), now=now, actor=actor)


def stored_draft(session: Session, draft_id: str) -> Draft | None:
    """The draft ``draft_id`` as the pipeline stored it, or None."""
    text_ = session.exec(select(DraftRecord.draft_json).where(DraftRecord.draft_id == draft_id)).first()
    return None if text_ is None else Draft.model_validate_json(text_)


def supersede_report(session: Session, old_rid: str, *, by: str, by_study_version: int, by_device: str,
                     now: datetime, actor: str) -> bool:
    """Make report ``old_rid`` ``cancelled`` and linked to report ``by`` (if it is still an
    unreviewed draft), with its Provenance and a ``fhir.supersede`` audit record. Returns whether
    it changed. The row is locked first, so a concurrent review waits for this and then sees it."""
    row = session.get(FhirResource, ("DiagnosticReport", old_rid), with_for_update=True, populate_existing=True)
    if row is None or row.status != "partial":
        return False
    newer = session.get(FhirResource, ("DiagnosticReport", by))
    old_version = row.version_id
    report = build_superseded_report(json.loads(row.json_text), newer_report_id=by, newer_study_version=by_study_version)
    version, _ = put_resource(session, _json(report), now=now, draft_id=row.draft_id)
    prov = build_supersession_provenance(old_report_id=old_rid, old_version=old_version, superseded_version=version,
                                         new_report_id=by, new_report_version=newer.version_id if newer else 1,
                                         device_id=by_device, newer_study_version=by_study_version, at=now)
    put_resource(session, _json(prov), now=now)
    record(session, action="fhir.supersede", actor=actor, entity_type="DiagnosticReport", entity_id=old_rid,
           details={"by": by, "study_version": by_study_version, "from_version": old_version,
                    "to_version": version, "provenance": prov.id})
    log.info("DiagnosticReport/%s superseded by DiagnosticReport/%s", old_rid, by)
    return True


def get_current(session: Session, resource_type: str, resource_id: str) -> FhirResource:
    """The current row, or :class:`NotFound`."""
    row = session.get(FhirResource, (resource_type, resource_id))
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    return row


@dataclass(frozen=True)
class CurrentRow:
    """The columns a read needs, fetched without the ORM identity map (the hot path)."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    json_text: str
    patient_ref: str | None


_CURRENT = (
    select(FhirResource.version_id, FhirResource.last_updated, FhirResource.json_text, FhirResource.patient_ref)
    .where(FhirResource.resource_type == bindparam("rtype"), FhirResource.id == bindparam("rid"))
)
"""Built once: every read runs it, and building a statement costs more than executing a cached one."""


def fetch_current(conn: Reader, resource_type: str, resource_id: str) -> CurrentRow:
    """The current version's JSON and headers, or :class:`NotFound`."""
    row = conn.execute(_CURRENT, {"rtype": resource_type, "rid": resource_id}).first()
    if row is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known")
    return CurrentRow(resource_type, resource_id, row[0], row[1], row[2], row[3])


@dataclass(frozen=True)
class VersionRow:
    """One stored version."""

    version_id: int
    last_updated: datetime
    json_text: str


_VERSION_COLS = (FhirResourceVersion.version_id, FhirResourceVersion.last_updated, FhirResourceVersion.json_text)


def get_version(conn: Reader, resource_type: str, resource_id: str, version: int) -> VersionRow:
    """One historical version, or :class:`NotFound`."""
    row = conn.execute(select(*_VERSION_COLS).where(
        FhirResourceVersion.resource_type == resource_type, FhirResourceVersion.id == resource_id,
        FhirResourceVersion.version_id == version)).first()
    if row is None:
        fetch_current(conn, resource_type, resource_id)
        raise NotFound(f"{resource_type}/{resource_id} has no version {version}")
    return VersionRow(row[0], row[1], row[2])


def history(conn: Reader, resource_type: str, resource_id: str, *, count: int, offset: int) -> tuple[int, list[VersionRow]]:
    """Versions of one resource, newest first (R4 http.html#history): ``(total, page)``."""
    current = fetch_current(conn, resource_type, resource_id)
    rows = conn.execute(
        select(*_VERSION_COLS)
        .where(FhirResourceVersion.resource_type == resource_type, FhirResourceVersion.id == resource_id)
        .order_by(col(FhirResourceVersion.version_id).desc())
        .offset(offset).limit(count)
    ).all()
    return current.version_id, [VersionRow(r[0], r[1], r[2]) for r in rows]


@dataclass(frozen=True)
class ReviewOutcome:
    """What a review stored."""

    report_json: str
    version: int
    provenance_id: str


def review_report(session: Session, rid: str, review: Review, *, if_match: int | None,
                  study_timezone: tzinfo = UTC) -> ReviewOutcome:
    """Record a clinician's review of report ``rid`` as its next version (see
    :mod:`reporting.fhir.review` for the status rules). Only a ``partial`` report can be reviewed
    (otherwise :class:`Conflict`); ``if_match`` must name the current version
    (otherwise :class:`PreconditionFailed`)."""
    # Lock the current row first (SELECT ... FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE
    # already serialises writers) and read it afresh: of concurrent reviews with the same If-Match,
    # the first holds the lock and writes the next version; the others wait, then read that version
    # and answer 412 instead of colliding on the history key (issue 11, item 12).
    current = session.get(FhirResource, ("DiagnosticReport", rid), with_for_update=True, populate_existing=True)
    if current is None:
        raise NotFound(f"DiagnosticReport/{rid} is not known")
    if if_match is not None and if_match != current.version_id:
        raise PreconditionFailed(
            f"DiagnosticReport/{rid} is at version {current.version_id}, not {if_match}; read it again")
    newer = superseded_by(json.loads(current.json_text))
    if newer is not None:
        raise Superseded(f"DiagnosticReport/{rid} was superseded by {newer}, the draft of a newer version of the "
                         f"study: review {newer} instead")
    if current.status != "partial" or current.draft_id is None:
        raise Conflict(f"DiagnosticReport/{rid} is {current.status}: only a partial (unreviewed) draft can be reviewed")
    draft = stored_draft(session, current.draft_id)
    if draft is None:
        raise Conflict(f"DiagnosticReport/{rid} has no stored draft to review")
    stale = review.stale_languages(draft)
    if stale and not review.sections(draft):
        raise InvalidRequest("the edit changes different sections in each language, so neither language's text "
                             "matches the other: edit the same sections in both languages, or in one only")
    previous, previous_status = current.version_id, current.status  # put_resource updates ``current`` in place
    report = build_reviewed_report(draft, review, study_timezone=study_timezone)
    version, _ = put_resource(session, _json(report), now=review.reviewed_at, draft_id=draft.draft_id, force=True)
    prov = build_review_provenance(draft, review, previous_version=previous, new_version=version)
    put_resource(session, _json(prov), now=review.reviewed_at)
    record(session, action=f"fhir.review.{review.action}", actor=review.reviewer_id, entity_type="DiagnosticReport",
           entity_id=rid, details={"from_version": previous, "to_version": version,
                                   "status": previous_status, "new_status": report.status,
                                   "changed": review.changed_sections(draft) if review.action == "edit" else [],
                                   "dropped_translations": list(stale),
                                   "provenance": prov.id})
    # The review is part of every draft-versus-signed delta of the study (issue 14): when the
    # signed report came back first, its deltas take this review in the same transaction.
    study_pk = session.exec(select(DraftRecord.study_pk).where(col(DraftRecord.draft_id) == draft.draft_id)).first()
    if study_pk is not None:
        compute_study_deltas(session, study_pk)
    return ReviewOutcome(report_json=get_current(session, "DiagnosticReport", rid).json_text, version=version,
                         provenance_id=str(prov.id))


def utc(value: datetime) -> datetime:
    """Stored timestamps back as aware UTC (SQLite returns them naive)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
