"""Parsing of FHIR search parameters (R4 search.html): query pairs in, a typed query out.

Pure: nothing here touches the database. Every unsupported or malformed parameter raises
:class:`~integrations.fhir.errors.InvalidRequest` / :class:`NotSupported`, which the API answers
with a 400 OperationOutcome (this server behaves as if ``Prefer: handling=strict`` were always set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final, Literal

from .errors import InvalidRequest, NotAcceptable, NotSupported

Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]
PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
MAX_COUNT: Final = 500
MAX_PARAMS: Final = 32
"""Most query parameters one search may have (issue 11, items 13-14). Real searches use a
handful; thousands of repeated parameters made SQLite refuse the statement ("expression tree is
too large") and PostgreSQL plan for seconds to minutes."""
MAX_TOKEN_PARAMS: Final = 8
"""Most token parameters (identifier, category, code) ANDed in one search: each is an EXISTS
subquery, whose planning cost on PostgreSQL grows faster than linearly (200 took 11 s)."""
MAX_VALUES: Final = 100
"""Most comma-separated values (OR) of one parameter."""
MAX_SORT_KEYS: Final = 5
MAX_VALUE_CHARS: Final = 1024
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
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
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


def parse_date(value: str, *, name: str, local_zone: tzinfo = UTC) -> DateRange:
    """``[prefix]date`` with precision from a year to fractions of a second (R4 search.html#date).

    The range is as precise as the value: ``10:00:00.5`` denotes [10:00:00.5, 10:00:00.6). A
    value without an offset is read in ``local_zone``, the server's zone (R4 search.html#date:
    "where no timezone offset is provided, the server's timezone is assumed"; here
    ``api.study_timezone``, the zone naive study times are read in)."""
    prefix: Prefix = "eq"
    if value[:2] in PREFIXES:
        prefix, value = value[:2], value[2:]  # type: ignore[assignment]
    m = _DATE.match(value)
    if not m:
        raise InvalidRequest(f"{name}: {value!r} is not a FHIR date/dateTime (e.g. ge2024-01-31 or eq2024-01-31T10:00:00Z)")
    g = m.groupdict()
    try:
        tz = local_zone if not g["tz"] else UTC if g["tz"] == "Z" else datetime.strptime(g["tz"], "%z").tzinfo
        y = int(g["y"])
        if g["S"] and g["f"]:
            digits = g["f"][1:7]  # microseconds: finer digits are below what is stored
            lo = datetime(y, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"]),
                          int(digits.ljust(6, "0")), tzinfo=tz)
            hi = lo + timedelta(microseconds=10 ** (6 - len(digits)))
        elif g["S"]:
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


_HISTORY = re.compile(r"^(?P<ref>.+)/_history/(?P<v>[1-9][0-9]{0,9})$")


def parse_reference(value: str, *, name: str, target: str, versioned: bool = False) -> str:
    """``id``, ``Type/id`` or an absolute URL ending in ``Type/id``: the relative ``Type/id``.
    With ``versioned``, ``.../Type/id/_history/n`` (the form Provenance.target stores) is accepted
    too and returned as ``Type/id/_history/n``."""
    suffix = ""
    hist = _HISTORY.match(value) if versioned else None
    if hist:
        value, suffix = hist.group("ref"), f"/_history/{int(hist.group('v'))}"
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == target:
        rid = parts[-1]
    elif len(parts) == 1:
        rid = parts[0]
    else:
        raise InvalidRequest(f"{name}: {value!r} is not a reference to a {target}")
    if not _ID.fullmatch(rid):
        raise InvalidRequest(f"{name}: {rid!r} is not a valid FHIR id")
    return f"{target}/{rid}{suffix}"


def parse_int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError as err:
        raise InvalidRequest(f"{name}: {value!r} is not an integer") from err
    if not lo <= n <= hi:
        raise InvalidRequest(f"{name}: {n} is outside {lo}..{hi}")
    return n


def _check_bounds(pairs: list[tuple[str, str]]) -> None:
    """400 for input no real search has and that would hurt the database (issue 11, items 13-14)."""
    if len(pairs) > MAX_PARAMS:
        raise InvalidRequest(f"{len(pairs)} query parameters: a search may have at most {MAX_PARAMS}")
    tokens = sum(1 for k, _ in pairs if k.partition(":")[0] in TOKEN_PARAMS)
    if tokens > MAX_TOKEN_PARAMS:
        raise InvalidRequest(f"{tokens} identifier/category/code parameters: at most {MAX_TOKEN_PARAMS} "
                             "(give alternatives as one comma-separated value)")
    for k, v in pairs:
        if "\x00" in k or "\x00" in v:
            raise InvalidRequest(f"parameter {k[:64]!r} contains a NUL character")
        if len(v) > MAX_VALUE_CHARS * MAX_VALUES:
            raise InvalidRequest(f"parameter {k[:64]!r} is {len(v)} characters long")
        values = v.split(",")
        if len(values) > MAX_VALUES:
            raise InvalidRequest(f"parameter {k[:64]!r} has {len(values)} values: at most {MAX_VALUES}")
        if k == "_sort" and len(values) > MAX_SORT_KEYS:
            raise InvalidRequest(f"_sort has {len(values)} keys: at most {MAX_SORT_KEYS}")
        if any(len(x) > MAX_VALUE_CHARS for x in values):
            raise InvalidRequest(f"a value of parameter {k[:64]!r} is longer than {MAX_VALUE_CHARS} characters")


def parse_search(resource_type: str, pairs: list[tuple[str, str]], *, local_zone: tzinfo = UTC) -> SearchQuery:
    """A :class:`SearchQuery` from the query string pairs of a search on ``resource_type``;
    dates without an offset are read in ``local_zone``."""
    allowed = SEARCH_PARAMS.get(resource_type)
    if allowed is None:
        raise NotSupported(f"search on {resource_type} is not supported")
    _check_bounds(pairs)
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
            q.targets.append(tuple(parse_reference(v, name=name, target="DiagnosticReport", versioned=True)
                                   for v in values))
        elif name == "status":
            valid = STATUSES.get(resource_type, frozenset())
            for v in values:
                if v not in valid:
                    raise InvalidRequest(f"status: {v!r} is not a DiagnosticReport status ({', '.join(sorted(valid))})")
            q.statuses.append(values)
        elif name in DATE_PARAMS or name == "started":
            if len(values) > 1:
                raise NotSupported(f"{name}: comma-separated dates are not supported; repeat the parameter")
            q.dates.append(("effective" if name == "started" else DATE_PARAMS[name],
                            parse_date(value, name=name, local_zone=local_zone)))
        elif name in TOKEN_PARAMS:
            q.tokens.append((name, tuple(parse_token(v, name=name) for v in values)))
        elif name == "_count":
            q.count = parse_int(name, value, 0, MAX_COUNT)
            if q.count == 0:
                q.summary_count = True
        elif name == "_offset":
            q.offset = parse_int(name, value, 0, 10_000_000)
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
                raise NotAcceptable(f"_format={value!r}: this server produces application/fhir+json only")
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
