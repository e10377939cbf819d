"""Runs a parsed :class:`~integrations.fhir.search_params.SearchQuery` against the store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from .search_params import INCLUDES, DateRange, SearchQuery
from .store import FhirResource, FhirSearchToken, Reader


@dataclass(frozen=True)
class Row:
    """A matched resource: type, id, version and stored JSON."""

    resource_type: str
    id: str
    version_id: int
    json_text: str


@dataclass(frozen=True)
class SearchResult:
    """Matches of one page, included resources, and the total match count."""

    total: int
    matches: list[Row]
    included: list[Row]


def _date_clause(column: Any, r: DateRange) -> ColumnElement[bool]:
    # Column values are points in time; the value denotes [lo, hi) (R4 search.html#prefix).
    if r.prefix == "eq":
        return and_(column >= r.lo, column < r.hi)
    if r.prefix == "ne":
        return or_(column < r.lo, column >= r.hi)
    if r.prefix in ("gt", "sa"):
        return column >= r.hi  # type: ignore[no-any-return]
    if r.prefix == "ge":
        return column >= r.lo  # type: ignore[no-any-return]
    if r.prefix in ("lt", "eb"):
        return column < r.lo  # type: ignore[no-any-return]
    return column < r.hi  # type: ignore[no-any-return]  # le


def _token_clause(resource_type: str, name: str, tokens: tuple[Any, ...]) -> ColumnElement[bool]:
    alts = []
    for t in tokens:
        cond = [FhirSearchToken.resource_type == resource_type, FhirSearchToken.resource_id == FhirResource.id,
                FhirSearchToken.name == name, FhirSearchToken.code == t.code]
        if t.system is not None:
            cond.append(FhirSearchToken.system == t.system)
        alts.append(exists().where(and_(*cond)))
    return or_(*alts)


def _one_of(column: Any, values: tuple[str, ...]) -> ColumnElement[bool]:
    # ``=`` for one value: an IN list is rendered again on every execution (expanding parameter),
    # an equality is a plain bind of the cached statement.
    return column == values[0] if len(values) == 1 else column.in_(values)  # type: ignore[no-any-return]


def _target_clause(targets: tuple[str, ...]) -> ColumnElement[bool]:
    # ``target_ref`` indexes the resource; a versioned value (``DiagnosticReport/x/_history/2``,
    # the form Provenance.target stores) must also name that version in the stored target.
    plain = tuple(t for t in targets if "/_history/" not in t)
    alts: list[ColumnElement[bool]] = [_one_of(col(FhirResource.target_ref), plain)] if plain else []
    for t in targets:
        if "/_history/" in t:
            alts.append(and_(col(FhirResource.target_ref) == t.split("/_history/")[0],
                             col(FhirResource.json_text).contains(f'{{"reference":"{t}"}}', autoescape=True)))
    return alts[0] if len(alts) == 1 else or_(*alts)


def where_clauses(q: SearchQuery) -> list[ColumnElement[bool]]:
    """The SQL conditions of a query (AND of parameters, OR within a parameter)."""
    out: list[ColumnElement[bool]] = [col(FhirResource.resource_type) == q.resource_type]
    for ids in q.ids:
        out.append(_one_of(col(FhirResource.id), ids))
    for refs in q.patients:
        out.append(_one_of(col(FhirResource.patient_ref), refs))
    for statuses in q.statuses:
        out.append(_one_of(col(FhirResource.status), statuses))
    for targets in q.targets:
        out.append(_target_clause(targets))
    for column_name, r in q.dates:
        column = getattr(FhirResource, column_name)
        clause = _date_clause(column, r)
        # A resource without the value matches no date comparison, ``ne`` included: R4
        # search.html#date compares "the range of the search value" with the resource's value,
        # and there is none to compare (HAPI matches none either).
        out.append(and_(column.is_not(None), clause))
    for name, tokens in q.tokens:
        out.append(_token_clause(q.resource_type, name, tokens))
    return out


def _rows(session: Reader, stmt: Any) -> list[Row]:
    return [Row(r[0], r[1], r[2], r[3]) for r in session.execute(stmt).all()]


_COLS = (col(FhirResource.resource_type), col(FhirResource.id), col(FhirResource.version_id), col(FhirResource.json_text))


def page_statement(q: SearchQuery) -> Select[*tuple[Any, ...]]:
    """One page of matches with the total on every row (``count(*) OVER ()``): the query of
    :func:`run_search`, and the one :mod:`integrations.fhir.pgreads` renders once for its hot search."""
    order = []
    for name, desc in q.sort:
        column = getattr(FhirResource, name)
        # Resources without the value sort last in both directions, on SQLite and PostgreSQL alike
        # (their defaults differ: SQLite puts NULL first ascending, PostgreSQL last; HAPI puts
        # missing values last).
        order.append((column.desc() if desc else column.asc()).nulls_last())
    order.append(col(FhirResource.id).asc())
    return (select(*_COLS, func.count().over().label("total")).where(*where_clauses(q)).order_by(*order)
            .offset(q.offset).limit(q.count))


def count_statement(q: SearchQuery) -> Select[Any]:
    """The number of matches (``_summary=count``, and the total of an empty page past the first)."""
    return select(func.count()).select_from(FhirResource).where(*where_clauses(q))


def run_search(session: Reader, q: SearchQuery) -> SearchResult:
    """One page of matches (sorted, offset/count) plus _include/_revinclude resources and the total.

    The total rides on the page query (``count(*) OVER ()``), so a search is one round trip when
    the page is not empty; a separate count runs only for ``_summary=count`` and empty pages."""

    def count() -> int:
        return int(session.execute(count_statement(q)).scalar_one())

    if q.summary_count:
        return SearchResult(count(), [], [])
    raw = session.execute(page_statement(q)).all()
    matches = [Row(r[0], r[1], r[2], r[3]) for r in raw]
    total = int(raw[0][4]) if raw else (0 if q.offset == 0 else count())
    if q.count == 0:
        total = count()
    included: list[Row] = []
    if matches:
        data_refs: dict[str, set[str]] = {}
        if q.include:
            for m in matches:
                data = json.loads(m.json_text)
                for inc in q.include:
                    target = INCLUDES[q.resource_type][inc]
                    element = inc.split(":")[1]
                    refs: list[dict[str, Any]] = []
                    if element in ("subject", "patient"):
                        refs = [data.get("subject") or {}]
                    elif element == "imaging-study":
                        refs = data.get("imagingStudy") or []
                    for ref in refs:
                        value = ref.get("reference", "")
                        if value.startswith(f"{target}/"):
                            data_refs.setdefault(target, set()).add(value.split("/")[1])
        for target, ids in sorted(data_refs.items()):
            included += _rows(session, select(*_COLS).where(
                col(FhirResource.resource_type) == target, col(FhirResource.id).in_(sorted(ids))).order_by(col(FhirResource.id)))
        if "Provenance:target" in q.revinclude:
            refs_to = [f"{m.resource_type}/{m.id}" for m in matches]
            included += _rows(session, select(*_COLS).where(
                col(FhirResource.resource_type) == "Provenance", col(FhirResource.target_ref).in_(refs_to)
            ).order_by(col(FhirResource.id)))
    return SearchResult(total, matches, included)

