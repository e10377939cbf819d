"""The study index: Patient, Study, Series and Instance rows.

The database is the source of truth: a study's state and version live on its row. Their rules and
every write of them belong to the study lifecycle (:mod:`.lifecycle`: the transitions, each a
compare-and-set with its audit record); this module files instances and answers queries.

Filing an instance is the hot path of every stored instance (hundreds per study), so it is driver
SQL prepared once per dialect (:class:`IndexSql`) and run on the DBAPI cursor of the caller's
transaction: one query reads the instance with that SOP Instance UID, the study and series rows
and the audit chain head (:func:`read_state`); the study update (the lifecycle's
:func:`~.lifecycle.arrival`), the instance row and the audit record are three writes
(:func:`plan_filing`, :class:`BatchWrites`; on PostgreSQL a whole batch's writes are one
statement). SQLAlchemy's statement construction, cache keys and parameter processing cost more
than all of that. Only the first instance of a series takes the ORM upserts of patient, study and
series.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import Column, Index, LargeBinary, String, Text, UniqueConstraint, func
from sqlalchemy.engine import Connection, Dialect
from sqlmodel import Field, Session, SQLModel, col, select

from audit.chain import ChainEvent, bind_processor, chain_sql
from ground.clock import utcnow
from storage import StoredFile

from .headers import InstanceHeaders
from .lifecycle import ArrivalSql, Write, arrival
from .lifecycle import (
    StudyState as StudyState,  # Study.state's vocabulary (re-exported); rules: lifecycle
)


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


class InstanceSpool(SQLModel, table=True):
    """The bytes of a small instance, committed with its row so that one flush makes both durable
    (:mod:`.spool`): the file is renamed into place after the commit, made durable after the
    acknowledgement, and then this row is deleted. Rows left by a crash are written back to their
    files when the listener starts."""

    __tablename__ = "instance_spool"

    #: one per received transfer (a key received twice in a row has two)
    id: str = Field(primary_key=True, max_length=32)
    #: the instance it belongs to (joined on instance's unique index when written back)
    sop_instance_uid: str = Field(max_length=64)
    storage_key: str = Field(max_length=512)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class StoreOutcome(str, enum.Enum):
    new = "new"
    duplicate = "duplicate"
    replaced = "replaced"
    #: not filed: the index holds a copy of this SOP Instance answered after it (a retry or a
    #: replay of an older copy); nothing is written
    superseded = "superseded"


@dataclass(frozen=True)
class IndexResult:
    """What filing one instance did (:func:`plan_filing`). ``obsolete_key`` is a file to delete after commit."""

    outcome: StoreOutcome
    study_pk: int
    study_version: int
    new_version: bool
    obsolete_key: str | None = None
    #: the key of the file the index holds for this instance when it is not the filed copy's
    #: own (a duplicate or a superseded copy: each copy has a name of its own, .ingest.instance_key)
    kept_key: str | None = None


def patient_key(h: InstanceHeaders) -> tuple[str, str]:
    """(Patient ID, issuer) that files this instance. Patient ID is Type 2 (may be empty, PS3.3
    C.7.1.1): instances without one must not all merge into one "patient", so an empty ID is
    kept per study under a synthetic issuer."""
    if h.patient_id:
        return h.patient_id, h.issuer_of_patient_id or ""
    return "", UNIDENTIFIED_PREFIX + hashlib.sha1(h.study_instance_uid.encode(), usedforsecurity=False).hexdigest()


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


@dataclass(frozen=True)
class ExistingInstance:
    id: int
    sha256: str
    storage_key: str
    study_pk: int
    study_version: int | None = None  # its study's version, when the lookup read it


@dataclass(frozen=True)
class KnownSeries:
    """The study and series rows an instance files into, when both exist."""

    study_pk: int
    series_pk: int
    version: int
    state: str


@dataclass(frozen=True)
class IndexState:
    """What the ingest transaction reads, in one query, once it holds the index lock."""

    existing: ExistingInstance | None
    known: KnownSeries | None
    chain_head: tuple[int, str] | None


class IndexSql:
    """The hot path's statements as driver SQL for one dialect, built once (see
    :class:`audit.chain.ChainSql` for why: SQLAlchemy's per-statement compile, cache-key and
    parameter work was ~40% of a stored instance's time). They run on the DBAPI cursor of the
    caller's connection, in its transaction; values go through the columns' bind processors."""

    #: statement texts kept per kind of built statement, before that cache starts again
    _CACHED = 128

    _INSTANCE_COLUMNS = (
        "series_pk", "study_pk", "sop_class_uid", "transfer_syntax_uid", "instance_number",
        "image_type", "number_of_frames", "rows", "columns", "image_position_patient",
        "image_orientation_patient", "specific_character_set", "storage_key", "size", "sha256",
        "calling_ae", "received_at",
    )

    def __init__(self, dialect: Dialect) -> None:
        self.chain = chain_sql(dialect)
        ph = self.chain.placeholder
        self.placeholder = ph
        # One round trip for everything the decision needs (PostgreSQL pays ~0.1 ms per round
        # trip here): the instance with this SOP Instance UID and its study's version (kind 1),
        # the study and series rows (kind 2), the chain head (kind 3).
        self.read = (
            "SELECT 1, i.id, i.study_pk, s.version, i.sha256, i.storage_key"
            " FROM instance i JOIN study s ON s.id = i.study_pk"
            f" WHERE i.sop_instance_uid = {ph}"
            " UNION ALL"
            " SELECT 2, s.id, se.id, s.version, s.state, NULL"
            " FROM study s JOIN series se ON se.study_pk = s.id"
            f" WHERE s.study_instance_uid = {ph} AND se.series_instance_uid = {ph}"
            " UNION ALL"
            f" SELECT 3, h.seq, NULL, NULL, h.hash, NULL FROM ({self.chain.head}) h"
        )
        self.known = (
            "SELECT s.id, se.id, s.version, s.state FROM study s JOIN series se ON se.study_pk = s.id"
            f" WHERE s.study_instance_uid = {ph} AND se.series_instance_uid = {ph}"
        )
        self.study_version = f"SELECT version FROM study WHERE id = {ph}"
        #: whether the instance row holds a copy answered after a given time
        self.answered_after = f"SELECT 1 FROM instance WHERE id = {ph} AND received_at > {ph}"
        self.insert_instance = (
            f"INSERT INTO instance (sop_instance_uid, {', '.join(self._INSTANCE_COLUMNS)})"
            f" VALUES ({', '.join([ph] * (len(self._INSTANCE_COLUMNS) + 1))})"
        )
        self.update_instance = (
            f"UPDATE instance SET {', '.join(f'{c} = {ph}' for c in self._INSTANCE_COLUMNS)}"
            f" WHERE id = {ph}"
        )
        # psycopg's %b sends the bytes in binary (as text they are hex-escaped, twice the size)
        blob = "%b" if ph == "%s" and dialect.driver == "psycopg" else ph
        self.insert_spool = (f"INSERT INTO instance_spool (id, sop_instance_uid, storage_key, data)"
                             f" VALUES ({ph}, {ph}, {ph}, {blob})")
        # every timestamp written here is a UTCDateTime column
        self.bind_time = bind_processor(Study.__table__.c.last_received_at, dialect)  # type: ignore[attr-defined]
        #: the study's UPDATE, the lifecycle's statement
        self.study = ArrivalSql(ph)
        self.combine_writes = dialect.name == "postgresql"
        self._combined: dict[tuple[str, ...], str] = {}
        self._multirow: dict[tuple[str, int], str] = {}
        self._read_many: dict[tuple[int, int], str] = {}

    def read_many(self, instances: int, series: int) -> str:
        """:attr:`read` for a batch: the instances with any of ``instances`` SOP Instance UIDs
        (kind 1), the study and series rows of any of ``series`` Series Instance UIDs (kind 2),
        the chain head (kind 3); each row carries the UIDs it answers for."""
        key = (instances, series)
        stmt = self._read_many.get(key)
        if stmt is None:
            ph = self.placeholder
            stmt = self._read_many[key] = (
                "SELECT 1, i.sop_instance_uid, NULL, i.id, i.study_pk, s.version, i.sha256, i.storage_key"
                " FROM instance i JOIN study s ON s.id = i.study_pk"
                f" WHERE i.sop_instance_uid IN ({', '.join([ph] * instances)})"
                " UNION ALL"
                " SELECT 2, s.study_instance_uid, se.series_instance_uid, s.id, se.id, s.version, s.state, NULL"
                " FROM study s JOIN series se ON se.study_pk = s.id"
                f" WHERE se.series_instance_uid IN ({', '.join([ph] * series)})"
                " UNION ALL"
                f" SELECT 3, NULL, NULL, h.seq, NULL, NULL, h.hash, NULL FROM ({self.chain.head}) h"
            )
        return stmt

    def combined(self, statements: tuple[str, ...]) -> str:
        """One PostgreSQL statement running ``statements`` (parameters in the same order)."""
        stmt = self._combined.get(statements)
        if stmt is None:
            if len(self._combined) >= self._CACHED:  # a batch's shapes vary with its size
                self._combined.clear()
            ctes = ", ".join(f"w{i} AS ({s})" for i, s in enumerate(statements[:-1]))
            stmt = self._combined[statements] = f"WITH {ctes} {statements[-1]}"
        return stmt

    def fold(self, writes: Sequence[Write]) -> list[Write]:
        """``writes`` as fewer statements with the same effect, for one PostgreSQL statement
        (:func:`run_writes`): a study's updates as one (:meth:`.lifecycle.ArrivalSql.coalesce`;
        a statement may update a row only once) and the rows of each INSERT as one multi-row
        INSERT, where its first row stood. Every INSERT here ends in one ``VALUES (...)``."""
        order: list[Write | str] = []  # str: where an INSERT's rows go
        rows: dict[str, list[tuple[Any, ...]]] = {}
        updated: set[tuple[str, Any]] = set()
        for stmt, params in self.study.coalesce(writes):
            if not stmt.startswith("INSERT "):
                # PostgreSQL would apply one of two updates of a row in one statement, silently
                if (stmt, params[-1]) in updated:
                    raise ValueError(f"one statement would update the row {params[-1]!r} twice ({stmt[:40]}...); "
                                     "flush the held writes before planning another write of that row")
                updated.add((stmt, params[-1]))
                order.append((stmt, params))
            elif stmt in rows:
                rows[stmt].append(params)
            else:
                rows[stmt] = [params]
                order.append(stmt)
        return [write if not isinstance(write, str)
                else (self._rows(write, len(rows[write])), tuple(p for params in rows[write] for p in params))
                for write in order]

    def _rows(self, insert: str, n: int) -> str:
        """``insert`` (one ``VALUES (...)`` at its end) inserting ``n`` rows."""
        if n == 1:
            return insert
        stmt = self._multirow.get((insert, n))
        if stmt is None:
            if len(self._multirow) >= self._CACHED:
                self._multirow.clear()
            row = insert[insert.rindex(" VALUES ") + len(" VALUES "):]
            if not (row.startswith("(") and row.endswith(")") and ")" not in row[:-1]):
                raise ValueError(f"not an INSERT ending in one VALUES (...): {insert[:60]}...")
            stmt = self._multirow[(insert, n)] = insert + f", {row}" * (n - 1)
        return stmt


@functools.lru_cache(maxsize=16)  # one per engine's dialect; a process has one or two
def index_sql(dialect: Dialect) -> IndexSql:
    """The (cached) :class:`IndexSql` for ``dialect``."""
    return IndexSql(dialect)


def read_state(cursor: Any, sql: IndexSql, headers: InstanceHeaders) -> IndexState:
    """Everything :func:`plan_filing` and the audit record need, in one query, read under the
    index lock (PostgreSQL: in a statement after the lock's, so its snapshot includes every
    commit made before the lock was granted)."""
    cursor.execute(sql.read, (headers.sop_instance_uid, headers.study_instance_uid,
                              headers.series_instance_uid))
    existing = known = head = None
    for kind, a, b, c, d, e in cursor.fetchall():
        if kind == 1:
            existing = ExistingInstance(a, d, e, b, c)
        elif kind == 2:
            known = KnownSeries(a, b, c, d)
        else:
            head = (a, d)
    return IndexState(existing, known, head)


class BatchState:
    """What :func:`read_state` reads, for every instance of a batch at once (one query instead
    of one per instance), kept current as the batch is filed (:meth:`filed`): each instance's
    state is what :func:`read_state` would read after the writes of the instances before it.
    An instance whose SOP Instance UID came earlier in the batch is not answered here (None):
    its caller reads it with :func:`read_state`, which sees the earlier one's row."""

    def __init__(self, existing: dict[str, ExistingInstance], known: dict[tuple[str, str], KnownSeries],
                 chain_head: tuple[int, str] | None) -> None:
        self._existing = existing
        self._known = known
        self._head = chain_head
        self._seen: set[str] = set()
        self._versions: dict[int, int] = {}  # study pk -> version, as decided in this batch

    def state(self, headers: InstanceHeaders) -> IndexState | None:
        sop = headers.sop_instance_uid
        if sop in self._seen:
            return None
        self._seen.add(sop)
        existing = self._existing.get(sop)
        if existing is not None and existing.study_pk in self._versions:
            existing = replace(existing, study_version=self._versions[existing.study_pk])
        return IndexState(existing, self._known.get((headers.study_instance_uid, headers.series_instance_uid)),
                          self._head)

    def filed(self, filing: Filing, chain_head: tuple[int, str] | None) -> None:
        """After an instance's writes: the chain's new head and its study's decided state."""
        self._head = chain_head
        if filing.study_state is None:
            return
        study_pk = filing.result.study_pk
        self._versions[study_pk] = filing.result.study_version
        for key, known in self._known.items():
            if known.study_pk == study_pk:
                self._known[key] = KnownSeries(study_pk, known.series_pk, filing.result.study_version,
                                               filing.study_state)


def read_states(cursor: Any, sql: IndexSql, batch: Sequence[InstanceHeaders]) -> BatchState:
    """:func:`read_state` for a whole batch, in one query (under the index lock, as it)."""
    sops = list(dict.fromkeys(h.sop_instance_uid for h in batch))
    series = list(dict.fromkeys(h.series_instance_uid for h in batch))
    cursor.execute(sql.read_many(len(sops), len(series)), (*sops, *series))
    existing: dict[str, ExistingInstance] = {}
    known: dict[tuple[str, str], KnownSeries] = {}
    head = None
    for kind, u1, u2, a, b, c, d, e in cursor.fetchall():
        if kind == 1:
            existing[u1] = ExistingInstance(a, d, e, b, c)
        elif kind == 2:
            known[(u1, u2)] = KnownSeries(a, b, c, d)
        else:
            head = (a, d)
    return BatchState(existing, known, head)


@dataclass(frozen=True)
class Filing:
    """What filing an instance does: its result, the row writes still to run (in order), and the
    audit event of the study's state change (the lifecycle's), if any."""

    result: IndexResult
    writes: list[Write]
    events: tuple[ChainEvent, ...] = ()
    #: the study's state as decided (None: a duplicate changes nothing)
    study_state: str | None = None


def _study_version(cursor: Any, sql: IndexSql, existing: ExistingInstance) -> int:
    if existing.study_version is not None:
        return existing.study_version
    cursor.execute(sql.study_version, (existing.study_pk,))
    return int(cursor.fetchone()[0])


def plan_filing(
    conn: Connection | None,
    cursor: Any,
    sql: IndexSql,
    *,
    headers: InstanceHeaders,
    stored: StoredFile,
    calling_ae: str,
    existing: ExistingInstance | None,
    known: KnownSeries | None,
    session: Session | None = None,
    answered_at: datetime | None = None,
) -> Filing:
    """File one received instance, given what :func:`read_state` read. Same SOP Instance UID
    with identical bytes: nothing changes (a duplicate); with different bytes: the row points at
    the new file and the study changes.

    ``answered_at`` is when the sender was told the instance is stored (the intake journal's
    record time; now when None), kept as the row's ``received_at``: the index ends at the copy of
    a SOP Instance answered last, whenever each copy is indexed. Given one, a row holding a copy
    answered after it is left alone (superseded): a retry, a slow batch or a replay files late,
    and another receiving process may have filed a later copy meanwhile.

    The first instance of a series goes through the ORM upserts of patient, study and series
    (in ``session``, or one opened on ``conn``: they join its transaction), run here; every later
    one (the hot path: hundreds per study) is two writes, left to the caller to run with
    :class:`BatchWrites`, together with its audit record's.
    """
    if existing is not None and existing.sha256 == stored.sha256:
        return Filing(IndexResult(StoreOutcome.duplicate, existing.study_pk, _study_version(cursor, sql, existing),
                                  False), [])
    if existing is not None and answered_at is not None:
        cursor.execute(sql.answered_after, (existing.id, sql.bind_time(answered_at)))
        if cursor.fetchone() is not None:
            return Filing(IndexResult(StoreOutcome.superseded, existing.study_pk,
                                      _study_version(cursor, sql, existing), False), [])

    now = utcnow()
    if known is None:
        if session is not None:
            known = _upsert_hierarchy(session, headers)
        elif conn is not None:
            with Session(bind=conn) as own:  # joins conn's transaction; closing it leaves that alone
                known = _upsert_hierarchy(own, headers)
        else:
            raise ValueError("the first instance of a series needs a SQLAlchemy connection")
    bound_now = sql.bind_time(now)
    study = arrival(sql.study, study_pk=known.study_pk, study_uid=headers.study_instance_uid, state=known.state,
                    version=known.version, sop_class_uid=headers.sop_class_uid, bound_now=bound_now,
                    actor=calling_ae)
    writes: list[Write] = [study.write]
    row = (
        known.series_pk,
        known.study_pk,
        headers.sop_class_uid,
        headers.transfer_syntax_uid,
        headers.instance_number,
        "\\".join(headers.image_type)[:256],
        headers.number_of_frames,
        headers.rows,
        headers.columns,
        json.dumps(headers.image_position_patient) if headers.image_position_patient else None,
        json.dumps(headers.image_orientation_patient) if headers.image_orientation_patient else None,
        headers.specific_character_set,
        stored.key,
        stored.size,
        stored.sha256,
        calling_ae,
        bound_now if answered_at is None else sql.bind_time(answered_at),
    )
    obsolete = None
    if existing is None:
        writes.append((sql.insert_instance, (headers.sop_instance_uid, *row)))
        outcome = StoreOutcome.new
    else:
        obsolete = existing.storage_key if existing.storage_key != stored.key else None
        writes.append((sql.update_instance, (*row, existing.id)))
        outcome = StoreOutcome.replaced
    return Filing(IndexResult(outcome, known.study_pk, study.decision.version, study.decision.new_version, obsolete),
                  writes, (study.event,) if study.event else (), study.decision.state.value)


def run_writes(cursor: Any, sql: IndexSql, writes: Sequence[Write]) -> None:
    """Run ``writes`` in order. On PostgreSQL they go as one statement (data-modifying WITH
    clauses; the writes touch different rows and depend on none of each other's results): every
    statement costs a round trip and ~70 us of psycopg, ~0.35 ms for three. SQLite statements
    cost microseconds, and SQLite has no such statement."""
    if len(writes) > 1 and sql.combine_writes:
        statements = tuple(stmt for stmt, _ in writes)
        combined = sql.combined(statements)
        cursor.execute(combined, tuple(p for _, params in writes for p in params))
    else:
        for stmt, params in writes:
            cursor.execute(stmt, params)


class BatchWrites:
    """A batch's row writes, run together. On PostgreSQL they are held and run at :meth:`flush`
    as one statement (:meth:`IndexSql.fold`, :func:`run_writes`): per instance, that saves the
    statement's round trip, its ~70 us of psycopg and the server's per-statement work. On SQLite,
    whose statements cost microseconds, each instance's writes run when added.

    The caller flushes before it reads a row the held writes may change (the same SOP Instance
    again in one batch: :class:`BatchState` answers None) and before the transaction goes on
    to anything a failed write must stop (placing the batch's files)."""

    #: parameters held before a flush (PostgreSQL takes at most 65,535 in one statement)
    MAX_PARAMS = 20_000

    def __init__(self, cursor: Any, sql: IndexSql) -> None:
        self._cursor = cursor
        self._sql = sql
        self._held: list[Write] = []
        self._params = 0

    def add(self, writes: Sequence[Write]) -> None:
        if not self._sql.combine_writes:
            run_writes(self._cursor, self._sql, writes)
            return
        self._held.extend(writes)
        self._params += sum(len(params) for _, params in writes)
        if self._params > self.MAX_PARAMS:
            self.flush()

    def flush(self) -> None:
        if self._held:
            held, self._held, self._params = self._held, [], 0
            run_writes(self._cursor, self._sql, self._sql.fold(held))


def _upsert_hierarchy(session: Session, headers: InstanceHeaders) -> KnownSeries:
    patient = _upsert_patient(session, headers)
    study = _upsert_study(session, headers, patient)
    series = _upsert_series(session, headers, study)
    session.flush()
    return KnownSeries(study.id or 0, series.id or 0, study.version, study.state)


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
