"""Finding chain records by time, actor, entity and kind, a page at a time.

The AuditEvent view (:mod:`integrations.fhir.audit_routes`) parses FHIR search parameters into a
:class:`RecordQuery`; :func:`find_records` answers it with one indexed SELECT (``at``, ``actor``,
``action``, ``entity_type``, ``entity_id`` each have an index) ordered by ``seq`` and limited to
one page plus one row, so a large trail is never loaded: the next page starts after the last
``seq`` returned (keyset paging, stable while records are appended).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from sqlalchemy import ColumnElement, Table, and_, false, func, not_, or_, select, true
from sqlalchemy.engine import Connection

from .chain import AuditRecord
from .codes import ActionFilter, known_patterns

DatePrefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]

_T: Table = AuditRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DateRange:
    """One ``date`` value: a prefix and the half-open range [start, end) its precision implies."""

    prefix: DatePrefix
    start: datetime
    end: datetime


@dataclass
class RecordQuery:
    """A search over the chain. Each list is ANDed; each inner tuple is ORed (FHIR's ``,``)."""

    dates: list[tuple[DateRange, ...]] = field(default_factory=list)
    actors: list[tuple[str, ...]] = field(default_factory=list)
    entities: list[tuple[tuple[str | None, str], ...]] = field(default_factory=list)  # (entity_type or None, entity_id)
    entity_types: list[tuple[str, ...]] = field(default_factory=list)
    kinds: list[tuple[ActionFilter, ...]] = field(default_factory=list)
    seqs: list[tuple[int, ...]] = field(default_factory=list)
    count: int = 50
    after: int | None = None  # keyset cursor: seq of the last record of the previous page
    ascending: bool = False
    with_total: bool = False


@dataclass(frozen=True)
class RecordPage:
    records: list[AuditRecord]
    next_cursor: int | None
    total: int | None


def _date_clause(d: DateRange) -> ColumnElement[bool]:
    at = _T.c.at
    match d.prefix:
        case "eq":
            return and_(at >= d.start, at < d.end)
        case "ne":
            return or_(at < d.start, at >= d.end)
        case "gt" | "sa":
            return at >= d.end
        case "lt" | "eb":
            return at < d.start
        case "ge":
            return at >= d.start
        case "le":
            return at < d.end
    raise ValueError(f"unknown date prefix {d.prefix!r}")


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _starts(prefix: str) -> ColumnElement[bool]:
    return _T.c.action.like(_escape_like(prefix), escape="\\")


def _kind_clause(f: ActionFilter) -> ColumnElement[bool]:
    action = _T.c.action
    parts: list[ColumnElement[bool]] = []
    if f.exact:
        parts.append(action.in_(f.exact))
    parts += [_starts(p) for p in f.prefixes]
    if f.other:
        exact, prefixes = known_patterns()
        parts.append(not_(or_(action.in_(exact), *[_starts(p) for p in prefixes])))
    if not parts:
        return false()
    clause = or_(*parts)
    excluded: list[ColumnElement[bool]] = []
    if f.excluded_exact:
        excluded.append(action.in_(f.excluded_exact))
    excluded += [_starts(p) for p in f.excluded_prefixes]
    return and_(clause, not_(or_(*excluded))) if excluded else clause


def _entity_clause(rtype: str | None, rid: str) -> ColumnElement[bool]:
    if rtype is None:
        return _T.c.entity_id == rid
    # entity_type through an expression no index serves: the planner then takes the selective
    # entity_id index (SQLite otherwise picked ix_audit_event_entity_type, a handful of values,
    # and scanned, hundreds of times slower: bench/README.md, bench/audit_events.py)
    return and_(_T.c.entity_id == rid, func.coalesce(_T.c.entity_type, "") == rtype)


def _where(q: RecordQuery) -> ColumnElement[bool]:
    clauses: list[ColumnElement[bool]] = []
    clauses += [or_(*[_date_clause(d) for d in group]) for group in q.dates]
    clauses += [_T.c.actor.in_(group) for group in q.actors]
    clauses += [or_(*[_entity_clause(t, i) for t, i in group]) for group in q.entities]
    clauses += [_T.c.entity_type.in_(group) for group in q.entity_types]
    clauses += [or_(*[_kind_clause(f) for f in group]) for group in q.kinds]
    clauses += [_T.c.seq.in_(group) for group in q.seqs]
    return and_(true(), *clauses)


def find_records(conn: Connection, q: RecordQuery) -> RecordPage:
    """One page of records matching ``q`` (newest first unless ``ascending``)."""
    where = _where(q)
    page = where
    if q.after is not None:
        page = and_(where, _T.c.seq > q.after if q.ascending else _T.c.seq < q.after)
    order = _T.c.seq.asc() if q.ascending else _T.c.seq.desc()
    rows = conn.execute(select(_T).where(page).order_by(order).limit(q.count + 1)).all() if q.count else []
    records = [AuditRecord.model_validate(dict(r._mapping)) for r in rows[: q.count]]
    next_cursor = records[-1].seq if len(rows) > q.count and records else None
    total = None
    if q.with_total or q.count == 0:
        total = int(conn.execute(select(func.count()).select_from(_T).where(where)).scalar_one())
    return RecordPage(records, next_cursor, total)


def get_record(conn: Connection, seq: int) -> AuditRecord | None:
    """The record at ``seq``, or None."""
    row = conn.execute(select(_T).where(_T.c.seq == seq)).first()
    return AuditRecord.model_validate(dict(row._mapping)) if row else None
