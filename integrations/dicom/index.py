"""The study index: Patient, Study, Series and Instance rows, and the study lifecycle state.

The database is the source of truth: a study's state and version live on its row, and every
state change happens in a transaction together with its audit record.

Lifecycle (PS3.4 has no notion of a "complete" study, so stability is inferred from silence):
``receiving`` -> ``stable`` (no instance for ``stable_after`` s) -> ``queued`` -> ``rendering`` ->
``inferring`` -> ``drafted`` | ``failed``. An instance that arrives after the study left
``receiving``/``stable`` starts a new *version*: the study goes back to ``receiving`` and is drafted
again once stable; drafts of older versions are then ``superseded``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, time

from sqlalchemy import Column, Index, String, Text, UniqueConstraint, func, insert, update
from sqlmodel import Field, Session, SQLModel, col, select

from audit.chain import lock_chain
from taqrir.db import utcnow

from .headers import InstanceHeaders
from .storage import StoredFile


class StudyState(str, enum.Enum):
    receiving = "receiving"
    stable = "stable"
    queued = "queued"
    rendering = "rendering"
    inferring = "inferring"
    drafted = "drafted"
    failed = "failed"


#: States in which a newly arrived instance starts a new study version.
_DRAFTING_OR_DONE = {StudyState.queued, StudyState.rendering, StudyState.inferring,
                     StudyState.drafted, StudyState.failed}


class Patient(SQLModel, table=True):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: int | None = Field(default=None, primary_key=True)
    patient_id: str = Field(max_length=64)
    issuer: str = Field(default="", max_length=64, description="Issuer of Patient ID; '' when absent.")
    name: str | None = Field(default=None, max_length=324)
    sex: str | None = Field(default=None, max_length=1)
    birth_date: date | None = None


class Study(SQLModel, table=True):
    __tablename__ = "study"

    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(max_length=64, unique=True)
    patient_pk: int = Field(foreign_key="patient.id", index=True)
    study_date: date | None = None
    study_time: time | None = None
    accession_number: str | None = Field(default=None, max_length=64, index=True)
    description: str | None = Field(default=None, max_length=256)
    referring_physician: str | None = Field(default=None, max_length=324)
    patient_age: str | None = Field(default=None, max_length=8)
    state: str = Field(default=StudyState.receiving.value, sa_column=Column(String(16), index=True, nullable=False))
    version: int = Field(default=1, description="Raised when instances arrive after drafting began.")
    first_received_at: datetime = Field(default_factory=utcnow)
    last_received_at: datetime = Field(default_factory=utcnow, index=True)
    state_changed_at: datetime = Field(default_factory=utcnow)
    failure_reason: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = Field(default=0, description="Transient-failure retries spent on this version.")


class Series(SQLModel, table=True):
    __tablename__ = "series"

    id: int | None = Field(default=None, primary_key=True)
    series_instance_uid: str = Field(max_length=64, unique=True)
    study_pk: int = Field(foreign_key="study.id", index=True)
    modality: str | None = Field(default=None, max_length=16)
    body_part: str | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=256)
    number: int | None = None


class Instance(SQLModel, table=True):
    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_study_series", "study_pk", "series_pk"),)

    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(max_length=64, unique=True)
    series_pk: int = Field(foreign_key="series.id")
    study_pk: int = Field(foreign_key="study.id")
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(max_length=64)
    instance_number: int | None = None
    image_type: str = Field(default="", max_length=256, description="Values joined by backslash.")
    number_of_frames: int = 1
    rows: int | None = None
    columns: int | None = None
    image_position_patient: str | None = Field(default=None, max_length=128, description="JSON list of 3 floats.")
    image_orientation_patient: str | None = Field(default=None, max_length=256, description="JSON list of 6 floats.")
    specific_character_set: str | None = Field(default=None, max_length=128)
    storage_key: str = Field(max_length=512)
    size: int
    sha256: str = Field(max_length=64)
    calling_ae: str = Field(max_length=16)
    received_at: datetime = Field(default_factory=utcnow)


class StoreOutcome(str, enum.Enum):
    new = "new"
    duplicate = "duplicate"
    replaced = "replaced"


@dataclass(frozen=True)
class IndexResult:
    """What :func:`index_instance` did. ``obsolete_key`` is a file to delete after commit."""

    outcome: StoreOutcome
    study_pk: int
    study_version: int
    new_version: bool
    obsolete_key: str | None = None


def patient_key(h: InstanceHeaders) -> tuple[str, str]:
    """(Patient ID, issuer) that files this instance. Patient ID is Type 2 (may be empty, PS3.3
    C.7.1.1): instances without one must not all merge into one "patient", so an empty ID is
    kept per study under a synthetic issuer."""
    if h.patient_id:
        return h.patient_id, h.issuer_of_patient_id or ""
    return "", UNIDENTIFIED_PREFIX + hashlib.sha1(h.study_instance_uid.encode()).hexdigest()


UNIDENTIFIED_PREFIX = "unidentified:"


def _upsert_patient(session: Session, h: InstanceHeaders) -> Patient:
    pid, issuer = patient_key(h)
    patient = session.exec(
        select(Patient).where(Patient.patient_id == pid, Patient.issuer == issuer)
    ).first()
    if patient is None:
        patient = Patient(patient_id=pid, issuer=issuer)
    patient.name = h.patient_name or patient.name
    patient.sex = h.patient_sex or patient.sex
    patient.birth_date = h.patient_birth_date or patient.birth_date
    session.add(patient)
    session.flush()
    return patient


def _upsert_study(session: Session, h: InstanceHeaders, patient: Patient) -> Study:
    study = session.exec(
        select(Study).where(Study.study_instance_uid == h.study_instance_uid).with_for_update()
    ).first()
    if study is None:
        study = Study(study_instance_uid=h.study_instance_uid, patient_pk=patient.id or 0)
    study.study_date = h.study_date or study.study_date
    study.study_time = h.study_time or study.study_time
    study.accession_number = h.accession_number or study.accession_number
    study.description = h.study_description or study.description
    study.referring_physician = h.referring_physician or study.referring_physician
    study.patient_age = h.patient_age or study.patient_age
    session.add(study)
    session.flush()
    return study


def _upsert_series(session: Session, h: InstanceHeaders, study: Study) -> Series:
    series = session.exec(
        select(Series).where(Series.series_instance_uid == h.series_instance_uid)
    ).first()
    if series is None:
        series = Series(series_instance_uid=h.series_instance_uid, study_pk=study.id or 0)
    series.modality = h.modality or series.modality
    series.body_part = h.body_part or series.body_part
    series.description = h.series_description or series.description
    series.number = h.series_number if h.series_number is not None else series.number
    session.add(series)
    session.flush()
    return series


def next_study_state(state: str, version: int) -> tuple[str, int, bool]:
    """A new or changed instance arrived: stability re-arms (back to ``receiving``); if drafting
    already began, a new version starts. Returns (state, version, new_version)."""
    if StudyState(state) in _DRAFTING_OR_DONE:
        return StudyState.receiving.value, version + 1, True
    return StudyState.receiving.value, version, False


@dataclass(frozen=True)
class ExistingInstance:
    id: int
    sha256: str
    storage_key: str
    study_pk: int


def find_instance(session: Session, sop_instance_uid: str) -> ExistingInstance | None:
    """The indexed instance with this SOP Instance UID, if any (one cheap Core query)."""
    row = session.connection().execute(
        select(Instance.id, Instance.sha256, Instance.storage_key, Instance.study_pk)
        .where(col(Instance.sop_instance_uid) == sop_instance_uid)
    ).first()
    return ExistingInstance(row.id, row.sha256, row.storage_key, row.study_pk) if row else None


def index_instance(
    session: Session,
    *,
    headers: InstanceHeaders,
    stored: StoredFile,
    calling_ae: str,
    existing: ExistingInstance | None,
) -> IndexResult:
    """File one received instance. Same SOP Instance UID with identical bytes: nothing changes
    (a duplicate); with different bytes: the row points at the new file and the study changes.

    The first instance of a series goes through the ORM upserts of patient, study and series;
    every later one (the hot path: hundreds per study) costs three Core statements.
    """
    conn = session.connection()
    if existing is not None and existing.sha256 == stored.sha256:
        version = conn.execute(select(Study.version).where(col(Study.id) == existing.study_pk)).scalar_one()
        return IndexResult(StoreOutcome.duplicate, existing.study_pk, version, False)

    now = utcnow()
    known = conn.execute(
        select(Study.id, Study.version, Study.state, col(Series.id).label("series_pk"))
        .join(Series, col(Series.study_pk) == Study.id)
        .where(col(Study.study_instance_uid) == headers.study_instance_uid,
               col(Series.series_instance_uid) == headers.series_instance_uid)
    ).first()
    if known is None:
        patient = _upsert_patient(session, headers)
        study = _upsert_study(session, headers, patient)
        series = _upsert_series(session, headers, study)
        study_pk, series_pk, version, state = study.id or 0, series.id or 0, study.version, study.state
        session.flush()
    else:
        study_pk, series_pk, version, state = known.id, known.series_pk, known.version, known.state
    new_state, new_version_no, new_version = next_study_state(state, version)
    values = {"last_received_at": now, "state": new_state, "version": new_version_no}
    if new_state != state:
        values["state_changed_at"] = now
    if new_version:
        values.update(attempts=0, failure_reason=None)
    conn.execute(update(Study).where(col(Study.id) == study_pk).values(**values))
    row = dict(
        series_pk=series_pk,
        study_pk=study_pk,
        sop_class_uid=headers.sop_class_uid,
        transfer_syntax_uid=headers.transfer_syntax_uid,
        instance_number=headers.instance_number,
        image_type="\\".join(headers.image_type)[:256],
        number_of_frames=headers.number_of_frames,
        rows=headers.rows,
        columns=headers.columns,
        image_position_patient=json.dumps(headers.image_position_patient) if headers.image_position_patient else None,
        image_orientation_patient=json.dumps(headers.image_orientation_patient) if headers.image_orientation_patient else None,
        specific_character_set=headers.specific_character_set,
        storage_key=stored.key,
        size=stored.size,
        sha256=stored.sha256,
        calling_ae=calling_ae,
        received_at=now,
    )
    obsolete = None
    if existing is None:
        conn.execute(insert(Instance).values(sop_instance_uid=headers.sop_instance_uid, **row))
        outcome = StoreOutcome.new
    else:
        obsolete = existing.storage_key if existing.storage_key != stored.key else None
        conn.execute(update(Instance).where(col(Instance.id) == existing.id).values(**row))
        outcome = StoreOutcome.replaced
    return IndexResult(outcome, study_pk, new_version_no, new_version, obsolete)


def set_state(
    session: Session,
    *,
    study_pk: int,
    version: int,
    new_state: StudyState,
    expect: tuple[StudyState, ...] | None = None,
    reason: str | None = None,
) -> bool:
    """Compare-and-set a study's state for one version. False when the study moved on (a newer
    version arrived, or another worker already advanced it): the caller then does nothing."""
    lock_chain(session)  # same lock order as ingest (lock, then study row): no deadlock
    stmt = update(Study).where(col(Study.id) == study_pk, col(Study.version) == version)
    if expect:
        stmt = stmt.where(col(Study.state).in_([s.value for s in expect]))
    values: dict[str, object] = {"state": new_state.value, "state_changed_at": utcnow()}
    if new_state == StudyState.failed:
        values["failure_reason"] = reason
    elif reason is None:
        values["failure_reason"] = None
    result = session.exec(stmt.values(**values))
    return bool(result.rowcount)


def study_by_uid(session: Session, study_uid: str) -> Study | None:
    return session.exec(select(Study).where(Study.study_instance_uid == study_uid)).first()


def list_studies(session: Session, *, limit: int = 100) -> list[tuple[Study, Patient, int, list[str]]]:
    """Studies, newest first, with patient, instance count and modalities (for ``taqrir studies``)."""
    studies = session.exec(
        select(Study, Patient).join(Patient, col(Patient.id) == Study.patient_pk)
        .order_by(col(Study.last_received_at).desc()).limit(limit)
    ).all()
    out = []
    for study, patient in studies:
        count = session.exec(select(func.count()).select_from(Instance).where(col(Instance.study_pk) == study.id)).one()
        mods = sorted({m for m in session.exec(select(Series.modality).where(col(Series.study_pk) == study.id)).all() if m})
        out.append((study, patient, count, mods))
    return out


def study_contents(session: Session, study_pk: int) -> list[tuple[Series, list[Instance]]]:
    """Series of a study with their instances (for rendering and resource building)."""
    series = session.exec(select(Series).where(col(Series.study_pk) == study_pk).order_by(col(Series.number), col(Series.id))).all()
    out = []
    for s in series:
        inst = session.exec(select(Instance).where(col(Instance.series_pk) == s.id).order_by(col(Instance.instance_number), col(Instance.id))).all()
        out.append((s, list(inst)))
    return out
