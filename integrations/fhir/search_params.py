"""Parsing of FHIR search parameters (R4 search.html): query pairs in, a typed query out.

Pure: nothing here touches the database. Every unsupported or malformed parameter raises
:class:`~integrations.fhir.errors.InvalidRequest` / :class:`NotSupported`, which the API answers
with a 400 OperationOutcome (this server behaves as if ``Prefer: handling=strict`` were always set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from .errors import InvalidRequest, NotSupported

Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]
PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
MAX_COUNT: Final = 500
DEFAULT_COUNT: Final = 20

DATE_PARAMS: Final = {"date": "effective", "issued": "issued", "_lastUpdated": "last_updated"}
TOKEN_PARAMS: Final = ("identifier", "category", "code")

SEARCH_PARAMS: Final[dict[str, frozenset[str]]] = {
    "DiagnosticReport": frozenset({"_id", "patient", "subject", "status", "date", "issued", "identifier",
                                   "category", "code", "_lastUpdated"}),
    "ImagingStudy": frozenset({"_id", "identifier", "patient", "subject", "started", "_lastUpdated"}),
    "Provenance": frozenset({"_id", "target", "_lastUpdated"}),
    "Patient": frozenset({"_id", "identifier", "_lastUpdated"}),
    "Device": frozenset({"_id", "identifier", "_lastUpdated"}),
}
"""Search parameters per type (besides the result parameters below)."""

SORTS: Final[dict[str, dict[str, str]]] = {
    "DiagnosticReport": {"date": "effective", "issued": "issued", "_lastUpdated": "last_updated", "_id": "id", "status": "status"},
    "ImagingStudy": {"started": "effective", "_lastUpdated": "last_updated", "_id": "id"},
    "Provenance": {"_lastUpdated": "last_updated", "_id": "id"},
    "Patient": {"_lastUpdated": "last_updated", "_id": "id"},
    "Device": {"_lastUpdated": "last_updated", "_id": "id"},
}
INCLUDES: Final[dict[str, dict[str, str]]] = {
    "DiagnosticReport": {"DiagnosticReport:subject": "Patient", "DiagnosticReport:patient": "Patient",
                         "DiagnosticReport:imaging-study": "ImagingStudy"},
    "ImagingStudy": {"ImagingStudy:subject": "Patient", "ImagingStudy:patient": "Patient"},
}
REVINCLUDES: Final[dict[str, frozenset[str]]] = {"DiagnosticReport": frozenset({"Provenance:target"})}
RESULT_PARAMS: Final = frozenset({"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_format"})
STATUSES: Final[dict[str, frozenset[str]]] = {
    "DiagnosticReport": frozenset({"registered", "partial", "preliminary", "final", "amended", "corrected",
                                   "appended", "cancelled", "entered-in-error", "unknown"}),
}
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True)
class DateRange:
    """A date parameter: prefix and the half-open instant range ``[lo, hi)`` its value denotes."""

    prefix: Prefix
    lo: datetime
    hi: datetime


@dataclass(frozen=True)
class Token:
    """``[system|]code``; ``system`` None means any system, "" means no system."""

    system: str | None
    code: str


@dataclass
class SearchQuery:
    """A parsed search. Each list entry is one parameter occurrence (AND); inner tuples are OR."""

    resource_type: str
    ids: list[tuple[str, ...]] = field(default_factory=list)
    patients: list[tuple[str, ...]] = field(default_factory=list)
    statuses: list[tuple[str, ...]] = field(default_factory=list)
    targets: list[tuple[str, ...]] = field(default_factory=list)
    dates: list[tuple[str, DateRange]] = field(default_factory=list)
    tokens: list[tuple[str, tuple[Token, ...]]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    revinclude: list[str] = field(default_factory=list)
    summary_count: bool = False


def parse_date(value: str, *, name: str) -> DateRange:
    """``[prefix]date`` with precision from a year to seconds (R4 search.html#date)."""
    prefix: Prefix = "eq"
    if value[:2] in PREFIXES:
        prefix, value = value[:2], value[2:]  # type: ignore[assignment]
    m = _DATE.match(value)
    if not m:
        raise InvalidRequest(f"{name}: {value!r} is not a FHIR date/dateTime (e.g. ge2024-01-31 or eq2024-01-31T10:00:00Z)")
    g = m.groupdict()
    if g["H"] and not g["tz"]:
        raise InvalidRequest(f"{name}: a time needs a timezone offset (Z or +hh:mm)")
    try:
        tz = UTC if not g["tz"] or g["tz"] == "Z" else datetime.strptime(g["tz"], "%z").tzinfo
        y = int(g["y"])
        if g["S"]:
            lo = datetime(y, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"]), tzinfo=tz)
            hi = lo + timedelta(seconds=1)
        elif g["H"]:
            lo = datetime(y, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), tzinfo=tz)
            hi = lo + timedelta(minutes=1)
        elif g["d"]:
            lo = datetime(y, int(g["m"]), int(g["d"]), tzinfo=tz)
            hi = lo + timedelta(days=1)
        elif g["m"]:
            lo = datetime(y, int(g["m"]), 1, tzinfo=tz)
            hi = datetime(y + (lo.month == 12), lo.month % 12 + 1, 1, tzinfo=tz)
        else:
            lo = datetime(y, 1, 1, tzinfo=tz)
            hi = datetime(y + 1, 1, 1, tzinfo=tz)
    except (ValueError, OverflowError) as err:
        raise InvalidRequest(f"{name}: {value!r} is not a valid date ({err})") from err
    return DateRange(prefix, lo.astimezone(UTC), hi.astimezone(UTC))


def parse_token(value: str, *, name: str) -> Token:
    """``code``, ``system|code`` or ``|code`` (R4 search.html#token)."""
    if "|" in value:
        system, code = value.split("|", 1)
        if not code:
            raise NotSupported(f"{name}: searching by system alone ({value!r}) is not supported; give system|code")
        return Token(system, code)
    if not value:
        raise InvalidRequest(f"{name}: empty value")
    return Token(None, value)


def parse_reference(value: str, *, name: str, target: str) -> str:
    """``id``, ``Type/id`` or an absolute URL ending in ``Type/id``: the relative ``Type/id``."""
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == target:
        rid = parts[-1]
    elif len(parts) == 1:
        rid = parts[0]
    else:
        raise InvalidRequest(f"{name}: {value!r} is not a reference to a {target}")
    if not _ID.match(rid):
        raise InvalidRequest(f"{name}: {rid!r} is not a valid FHIR id")
    return f"{target}/{rid}"


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError as err:
        raise InvalidRequest(f"{name}: {value!r} is not an integer") from err
    if not lo <= n <= hi:
        raise InvalidRequest(f"{name}: {n} is outside {lo}..{hi}")
    return n


def parse_search(resource_type: str, pairs: list[tuple[str, str]]) -> SearchQuery:
    """A :class:`SearchQuery` from the query string pairs of a search on ``resource_type``."""
    allowed = SEARCH_PARAMS.get(resource_type)
    if allowed is None:
        raise NotSupported(f"search on {resource_type} is not supported")
    q = SearchQuery(resource_type)
    seen_single: set[str] = set()
    for raw_name, value in pairs:
        name, _, modifier = raw_name.partition(":")
        if name in ("_count", "_offset", "_summary", "_total", "_format", "_sort"):
            if name in seen_single:
                raise InvalidRequest(f"{name} may appear only once")
            seen_single.add(name)
        if modifier and name not in ("identifier", "category", "code", "patient", "subject", "target"):
            raise NotSupported(f"modifier :{modifier} is not supported on {name}")
        if modifier and modifier not in ("exact",) and name in ("identifier", "category", "code"):
            raise NotSupported(f"modifier :{modifier} is not supported on {name}")
        if modifier and name in ("patient", "subject") and modifier != "Patient":
            raise NotSupported(f"{raw_name}: only :Patient is supported")
        if modifier and name == "target" and modifier != "DiagnosticReport":
            raise NotSupported(f"{raw_name}: only :DiagnosticReport is supported")
        if name not in allowed and name not in RESULT_PARAMS:
            raise InvalidRequest(f"unknown search parameter {raw_name!r} for {resource_type}; "
                                 f"supported: {', '.join(sorted(allowed | RESULT_PARAMS))}")
        values = tuple(value.split(","))
        if name in ("_count", "_offset", "_summary", "_total", "_format", "_sort", "_include", "_revinclude") and value == "":
            raise InvalidRequest(f"{name}: empty value")
        if name == "_id":
            for v in values:
                if not _ID.match(v):
                    raise InvalidRequest(f"_id: {v!r} is not a valid FHIR id")
            q.ids.append(values)
        elif name in ("patient", "subject"):
            q.patients.append(tuple(parse_reference(v, name=name, target="Patient") for v in values))
        elif name == "target":
            q.targets.append(tuple(parse_reference(v, name=name, target="DiagnosticReport") for v in values))
        elif name == "status":
            valid = STATUSES.get(resource_type, frozenset())
            for v in values:
                if v not in valid:
                    raise InvalidRequest(f"status: {v!r} is not a DiagnosticReport status ({', '.join(sorted(valid))})")
            q.statuses.append(values)
        elif name in DATE_PARAMS or name == "started":
            if len(values) > 1:
                raise NotSupported(f"{name}: comma-separated dates are not supported; repeat the parameter")
            q.dates.append(("effective" if name == "started" else DATE_PARAMS[name], parse_date(value, name=name)))
        elif name in TOKEN_PARAMS:
            q.tokens.append((name, tuple(parse_token(v, name=name) for v in values)))
        elif name == "_count":
            q.count = _int(name, value, 0, MAX_COUNT)
            if q.count == 0:
                q.summary_count = True
        elif name == "_offset":
            q.offset = _int(name, value, 0, 10_000_000)
        elif name == "_summary":
            if value == "count":
                q.summary_count = True
            elif value != "false":
                raise NotSupported(f"_summary={value!r} is not supported (count, false)")
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise InvalidRequest(f"_total: {value!r} is not none, estimate or accurate")
        elif name == "_format":
            if value not in ("json", "application/json", "application/fhir+json"):
                raise NotSupported(f"_format={value!r}: this server speaks JSON only")
        elif name == "_sort":
            for v in values:
                desc = v.startswith("-")
                key = v[1:] if desc else v
                col = SORTS[resource_type].get(key)
                if col is None:
                    raise InvalidRequest(f"_sort: cannot sort {resource_type} by {key!r}; "
                                         f"supported: {', '.join(SORTS[resource_type])}")
                q.sort.append((col, desc))
        elif name == "_include":
            for v in values:
                if v not in INCLUDES.get(resource_type, {}):
                    raise InvalidRequest(f"_include={v!r} is not supported on {resource_type}")
                q.include.append(v)
        elif name == "_revinclude":
            for v in values:
                if v not in REVINCLUDES.get(resource_type, frozenset()):
                    raise InvalidRequest(f"_revinclude={v!r} is not supported on {resource_type}")
                q.revinclude.append(v)
    return q
