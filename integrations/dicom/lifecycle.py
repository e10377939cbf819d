"""The study lifecycle: the one owner of every change of a study's state and version.

PS3.4 has no notion of a "complete" study, so stability is inferred from silence::

    receiving --quiet--> stable --enqueue--> queued --render--> rendering --infer--> inferring
        ^                                                                               |
        |                                                                    drafted <--+
        +-- arrived (an image instance; from any state) --  failed <-- fail (any active state)

An image instance that arrives after drafting began (``queued`` .. ``failed``) starts a new
*version*: the study goes back to ``receiving`` with ``version + 1`` and is drafted again once
stable; the drafts of older versions are superseded when the new version's draft is published
(``workers.service.publish_stage``), and a superseded draft cannot be reviewed. A report object
(a structured report or encapsulated PDF, e.g. the radiologist's signed SR coming back) is not
drafting input: it changes neither state nor version. ``taqrir redraft`` sends a ``drafted`` or
``failed`` version back to ``queued``.

The module has three layers:

* the pure rules: :data:`TRANSITIONS` (event -> allowed sources, target) and :func:`decide`
  ((state, version, event) -> the new state and version, or None when the event does not apply),
  tested exhaustively;
* the SQL, here and nowhere else: every write of ``study.state``, ``version``,
  ``state_changed_at``, ``failure_reason`` and ``attempts`` (``tests/integrations/dicom/test_lifecycle_owner.py``
  fails on any other);
* the transactions: :func:`transition` is a compare-and-set (``UPDATE study ... WHERE id AND
  version AND state IN (sources)``) under the writer lock, with its audit record
  (``study.<new state>``, see :mod:`audit.codes`: DICOM 110111 Procedure Record, action U) in the
  same transaction. Ingest's hot path takes the arrival decision and its ``UPDATE`` fragment from
  :func:`arrival` and runs it in its own batch of writes (no extra round trip).

Lock order (:mod:`ground.db`): the writer lock, then the study row.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import bindparam, text
from sqlmodel import Session
from sqlmodel.sql.sqltypes import UTCDateTime

from audit.chain import ChainEvent, record
from ground.clock import utcnow
from ground.db import writer_lock
from ground.errors import PermanentError


class StudyState(str, enum.Enum):
    receiving = "receiving"
    stable = "stable"
    queued = "queued"
    rendering = "rendering"
    inferring = "inferring"
    drafted = "drafted"
    failed = "failed"


class StudyEvent(str, enum.Enum):
    """What happens to a study."""

    arrived = "arrived"  # an image instance was filed (new, or a replacement with other bytes)
    quiet = "quiet"  # nothing arrived for stable_after seconds
    enqueue = "enqueue"  # handed to the drafting pipeline
    render = "render"  # a render stage starts
    infer = "infer"  # an inference stage starts
    draft_found = "draft_found"  # a stage found this version's draft stored by an earlier delivery
    drafted = "drafted"  # this delivery's draft is stored
    fail = "fail"  # the version cannot be drafted
    redraft = "redraft"  # ``taqrir redraft``


#: States in which a newly arrived image instance starts a new study version.
DRAFTING_OR_DONE: Final = frozenset({StudyState.queued, StudyState.rendering, StudyState.inferring,
                                     StudyState.drafted, StudyState.failed})

#: States in which a pipeline stage may work on the version.
ACTIVE: Final = (StudyState.stable, StudyState.queued, StudyState.rendering, StudyState.inferring)


@dataclass(frozen=True, slots=True)
class Transition:
    """An event's rule: from which states it applies, and the state it leads to."""

    sources: frozenset[StudyState]
    target: StudyState


def _t(sources: tuple[StudyState, ...], target: StudyState) -> Transition:
    return Transition(frozenset(sources), target)


S = StudyState
#: The allowed transitions. ``arrived`` applies in every state (its version rule is in
#: :func:`decide`). Self-transitions (queued -> queued, rendering -> rendering, ...) are a
#: redelivered message doing its step again: allowed, and audited again.
TRANSITIONS: Final[Mapping[StudyEvent, Transition]] = {
    StudyEvent.arrived: _t(tuple(S), S.receiving),
    StudyEvent.quiet: _t((S.receiving,), S.stable),
    StudyEvent.enqueue: _t((S.stable, S.queued, S.failed), S.queued),
    StudyEvent.render: _t((S.stable, S.queued, S.rendering), S.rendering),
    StudyEvent.infer: _t(ACTIVE, S.inferring),
    StudyEvent.draft_found: _t(ACTIVE, S.drafted),
    StudyEvent.drafted: _t((S.inferring,), S.drafted),
    StudyEvent.fail: _t((S.stable, S.queued, S.rendering, S.inferring), S.failed),
    StudyEvent.redraft: _t((S.failed, S.drafted), S.queued),
}
del S


@dataclass(frozen=True, slots=True)
class Decision:
    """Where an event takes a study: its new state and version (``new_version``: raised)."""

    state: StudyState
    version: int
    new_version: bool = False


def decide(state: StudyState | str, version: int, event: StudyEvent) -> Decision | None:
    """The study's state and version after ``event`` (pure); None when ``event`` does not apply
    in ``state``. An arrival while drafting began or ended starts version ``version + 1``."""
    state = StudyState(state)
    rule = TRANSITIONS[event]
    if state not in rule.sources:
        return None
    if event is StudyEvent.arrived and state in DRAFTING_OR_DONE:
        return Decision(rule.target, version + 1, True)
    return Decision(rule.target, version)


def is_report_object(sop_class_uid: str) -> bool:
    """Structured reports (PS3.4 B.5: 1.2.840.10008.5.1.4.1.1.88.x, KOS included) and
    encapsulated PDF: documents *about* the study (a signed report from the reporting system, a
    dose report), not images to draft from."""
    return sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88.") or sop_class_uid == "1.2.840.10008.5.1.4.1.1.104.1"


def on_instance(state: StudyState | str, version: int, sop_class_uid: str = "") -> Decision:
    """A new or changed instance arrived (pure): stability re-arms (back to ``receiving``); if
    drafting already began, a new version starts. A report object (:func:`is_report_object`)
    changes neither: it is not drafting input, and a signed report must not make Taqrir draft the
    study again."""
    if sop_class_uid and is_report_object(sop_class_uid):
        return Decision(StudyState(state), version)
    decision = decide(state, version, StudyEvent.arrived)
    assert decision is not None  # arrived applies in every state
    return decision


def audit_action(state: StudyState) -> str:
    """The audit action of entering ``state`` (``study.`` actions: :mod:`audit.codes`)."""
    return f"study.{state.value}"


# -- the ingest hot path: the decision and its UPDATE fragment, run in the caller's batch -----

Write = tuple[str, tuple[Any, ...]]  # a statement and its parameters


@dataclass(frozen=True, slots=True)
class Arrival:
    """What filing an instance does to its study: the decision, the ``UPDATE study`` to run in
    the caller's batch, and the audit event of a state change (None: the state stays)."""

    decision: Decision
    write: Write
    event: ChainEvent | None


class ArrivalSql:
    """The ``UPDATE study`` statements of the hot path as driver SQL (one per column set; a
    process uses three or four), for one parameter placeholder."""

    def __init__(self, placeholder: str) -> None:
        self.placeholder = placeholder
        self._statements: dict[tuple[str, ...], str] = {}
        self._columns: dict[str, tuple[str, ...]] = {}  # statement -> its columns

    def update(self, columns: tuple[str, ...]) -> str:
        stmt = self._statements.get(columns)
        if stmt is None:
            ph = self.placeholder
            stmt = f"UPDATE study SET {', '.join(f'{c} = {ph}' for c in columns)} WHERE id = {ph}"
            self._columns[stmt] = columns  # (first: a statement handed out is always recognised)
            self._statements[columns] = stmt
        return stmt

    def coalesce(self, writes: Sequence[Write]) -> list[Write]:
        """``writes`` with this object's study updates folded into one per study: each column
        takes the value of the last update that set it, which is what running them in order
        leaves (each sets constants), and the fold stands where the study's first update stood.
        Other writes pass unchanged, in order. For a caller that runs a batch's writes as one
        PostgreSQL statement, in which a row may be updated only once."""
        order: list[Write | None] = []  # None: where a study's fold goes, in the order of ``studies``
        studies: dict[Any, dict[str, Any]] = {}  # study pk -> column -> value
        for stmt, params in writes:
            columns = self._columns.get(stmt)
            if columns is None:
                order.append((stmt, params))
                continue
            values = studies.get(params[-1])
            if values is None:
                values = studies[params[-1]] = {}
                order.append(None)
            values.update(zip(columns, params[:-1], strict=True))
        folds = iter([(self.update(tuple(values)), (*values.values(), pk)) for pk, values in studies.items()])
        return [write if write is not None else next(folds) for write in order]


def arrival(
    sql: ArrivalSql,
    *,
    study_pk: int,
    study_uid: str,
    state: str,
    version: int,
    sop_class_uid: str,
    bound_now: Any,
    actor: str,
) -> Arrival:
    """An instance of ``sop_class_uid`` is filed into the study (``state``, ``version`` read under
    the writer lock in the caller's transaction): the decision, its ``UPDATE study`` (the receive
    time always; state and version as decided) and, when the state changes, its audit event.

    A compare-and-set by the lock: the state was read under the writer lock in this transaction,
    and every writer of a study's state takes that lock first (:func:`transition`), so the row
    still holds what was read and ``WHERE id`` suffices (PostgreSQL combines this write with the
    instance's and the audit record's into one statement, which cannot report a row count).
    """
    decision = on_instance(state, version, sop_class_uid)
    columns: tuple[str, ...] = ("last_received_at", "state", "version")
    values: list[Any] = [bound_now, decision.state.value, decision.version]
    event = None
    if decision.state.value != state:
        columns += ("state_changed_at",)
        values.append(bound_now)
        event = ChainEvent(action=audit_action(decision.state), actor=actor, entity_type="Study",
                           entity_id=study_uid,
                           details={"version": decision.version, "from": state, "new_version": decision.new_version})
    if decision.new_version:
        columns += ("attempts", "failure_reason")
        values += [0, None]
    return Arrival(decision, (sql.update(columns), (*values, study_pk)), event)


# -- transactions in a session ---------------------------------------------------------------

_TIME = UTCDateTime()


def _sources(event: StudyEvent) -> list[str]:
    return sorted(s.value for s in TRANSITIONS[event].sources)


def transition(
    session: Session,
    *,
    study_pk: int,
    study_uid: str,
    version: int,
    event: StudyEvent,
    actor: str,
    reason: str | None = None,
    received_before: datetime | None = None,
    details: Mapping[str, Any] | None = None,
) -> bool:
    """Apply ``event`` to version ``version`` of the study: a compare-and-set of its state
    (``WHERE id AND version AND state IN`` the event's sources), audited as
    ``study.<new state>`` in the same transaction. False, writing nothing, when the study moved
    on (a newer version arrived, or another worker already advanced it): the caller then does
    nothing. ``reason`` is kept on ``failed`` (and cleared on every other move);
    ``received_before`` also requires that nothing arrived since (the stability sweep's cutoff).
    ``redraft`` also resets the version's attempt count.

    Takes the writer lock first (lock, then study row: :mod:`ground.db`)."""
    rule = TRANSITIONS[event]
    if event is StudyEvent.arrived:
        raise ValueError("arrivals are filed by ingest (lifecycle.arrival), not by transition()")
    writer_lock(session)
    sets = "state = :target, state_changed_at = :now, failure_reason = :reason"
    if event is StudyEvent.redraft:
        sets += ", attempts = 0"
    where = "id = :id AND version = :version AND state IN :sources"
    params: dict[str, Any] = {
        "target": rule.target.value, "now": utcnow(), "id": study_pk, "version": version,
        "sources": _sources(event), "reason": reason if rule.target is StudyState.failed else None,
    }
    binds = [bindparam("sources", expanding=True), bindparam("now", type_=_TIME)]
    if received_before is not None:
        where += " AND last_received_at <= :cutoff"
        params["cutoff"] = received_before
        binds.append(bindparam("cutoff", type_=_TIME))
    stmt = text(f"UPDATE study SET {sets} WHERE {where}").bindparams(*binds)
    if not session.connection().execute(stmt, params).rowcount:
        return False
    record(session, action=audit_action(rule.target), actor=actor, entity_type="Study", entity_id=study_uid,
           details={"version": version, **(details or {})})
    return True


def over_attempt_cap(attempts: int, cap: int) -> bool:
    """Whether one more stage start would exceed ``cap`` (pure)."""
    return attempts + 1 > cap


def count_attempt(session: Session, *, study_pk: int, version: int, attempts: int, cap: int) -> None:
    """Count a stage start of this version (every start counts): a version that keeps being
    started without finishing (a worker that dies on it each time, a poison message) fails
    instead of looping forever. Raises :class:`PermanentError` when ``attempts`` (as read) is at
    ``cap``. Takes the writer lock before the study row (:mod:`ground.db`)."""
    if over_attempt_cap(attempts, cap):
        raise PermanentError(
            f"gave up after {attempts} stage starts without a draft (a worker died or the "
            "message kept coming back); see the workers' logs, then `taqrir redraft`"
        )
    writer_lock(session)
    session.connection().execute(
        text("UPDATE study SET attempts = attempts + 1 WHERE id = :id AND version = :version"),
        {"id": study_pk, "version": version},
    )


def reset_attempts(session: Session, *, study_pk: int) -> None:
    """A draft of the version is stored: its attempt count starts again (writer lock first)."""
    writer_lock(session)
    session.connection().execute(text("UPDATE study SET attempts = 0 WHERE id = :id"), {"id": study_pk})


_TOUCH = text(
    "UPDATE study SET state_changed_at = :now WHERE id = :id AND version = :version AND state = :state"
).bindparams(bindparam("now", type_=_TIME))

_CLAIM = text(
    "UPDATE study SET state_changed_at = :now WHERE id = :id AND state = :state AND state_changed_at = :seen"
).bindparams(bindparam("now", type_=_TIME), bindparam("seen", type_=_TIME))


def heartbeat(session: Session, *, study_pk: int, version: int, state: StudyState) -> bool:
    """Keep a running stage's state timestamp fresh, so that the recovery sweep does not take it
    for lost work. Not a state change (not audited), and a transaction of this one statement: it
    holds no other lock while waiting for the row, so it needs no writer lock to keep the lock
    order."""
    return bool(session.connection().execute(
        _TOUCH, {"now": utcnow(), "id": study_pk, "version": version, "state": state.value}).rowcount)


def claim_stale(session: Session, *, study_pk: int, state: str, seen: datetime) -> bool:
    """Claim a study whose stage has not moved since ``seen`` (its message was probably lost) for
    a re-enqueue: a compare-and-set of its state timestamp, so that of concurrent sweepers one
    wins. Not a state change (the stage that then runs audits its move). The caller holds the
    writer lock (:func:`ground.db.writer_lock`), taken before reading the candidates."""
    return bool(session.connection().execute(
        _CLAIM, {"now": utcnow(), "id": study_pk, "state": state, "seen": seen}).rowcount)
