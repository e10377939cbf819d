"""``GET /fhir/AuditEvent`` and ``GET /fhir/AuditEvent/{id}``: the audit trail, read-only.

Search parameters (R4 auditevent.html#search, search.html):

* ``date`` ``[eq|ne|gt|lt|ge|le|sa|eb]`` + a date or dateTime of any precision (``2026``,
  ``2026-12``, ``2026-12-05``, ``2026-12-05T08:00``, ``2026-12-05T08:00:00.5+03:00``);
  repeat to AND (a range), comma to OR;
* ``agent`` who acted: the user (token ``sub``), the calling AE title, or the worker;
* ``entity`` what was acted on: ``Type/id`` or a bare id (a Study Instance UID, a draft id);
* ``entity-type`` the chain's entity type (``DiagnosticReport``, ``Study``, ``Instance``...);
* ``type``, ``subtype`` ``[system|]code`` as the AuditEvents carry them (:mod:`audit.codes`):
  DICOM codes (``110107`` Import, ``110114`` User Authentication ...) and, for RESTful
  interactions, ``type`` ``rest`` with ``subtype`` ``read``/``search-type``/``create``/``update``
  and the DICOM event ID (``110110`` Patient Record, ``110112`` Query, ``110101`` Audit Log Used);
* ``action`` C R U D E; ``_id`` record numbers;
* ``_count`` (page size, max ``api.page_max``), ``_sort`` ``-date`` (default, newest first) or
  ``date``, ``_total=accurate`` (a count; otherwise Bundle.total is left out, since counting a
  large trail costs more than the page), and ``_cursor`` (in the ``next`` links).

Access needs a scope that *names* AuditEvent: ``user/AuditEvent.rs`` or ``system/AuditEvent.rs``
(``.r`` to read one, ``.s`` to search); wildcard scopes (``user/*.rs``) and patient scopes do not
open the audit trail. Every read and search of it is itself recorded (``audit.read``,
``audit.search``, DICOM 110101 Audit Log Used) through the API's access recorder before the
response is sent.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, cast
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from audit.codes import EVENT_CLASSES, ActionFilter, actions_for_code
from audit.query import DatePrefix, DateRange, RecordQuery, find_records, get_record
from ground.clock import utcnow
from reporting.fhir.timing import instant

from .audit_event import AuditSource, audit_event, audit_event_json
from .auth import Principal
from .deps import ApiDep
from .errors import Forbidden, InvalidRequest, NotFound
from .interactions import FhirApi
from .responses import fhir_response, openapi_responses

RTYPE: Final = "AuditEvent"
PARAMS: Final = frozenset({"date", "agent", "entity", "entity-type", "type", "subtype", "action", "_id",
                           "_count", "_sort", "_total", "_cursor", "_format"})
_DIGITS: Final = re.compile(r"[0-9]{1,18}")
_PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$",
    re.ASCII,
)

CAPABILITY: Final[dict[str, Any]] = {
    "type": RTYPE,
    "documentation": "The hash-chained audit trail, read-only, one AuditEvent per chain record (id = its sequence "
                     "number), coded with DICOM audit event IDs and IHE BALP shapes. Needs scope "
                     "user/AuditEvent.rs or system/AuditEvent.rs (wildcards do not apply); every access is audited. "
                     "_sort: -date (default) or date; _count (max 500); _total=accurate for a count.",
    "interaction": [{"code": "read"}, {"code": "search-type"}],
    "versioning": "no-version",
    "readHistory": False,
    "updateCreate": False,
    "searchParam": [
        {"name": "date", "type": "date"},
        {"name": "agent", "type": "reference", "documentation": "who: token subject, calling AE title or worker"},
        {"name": "entity", "type": "reference", "documentation": "Type/id or a bare id (UID, draft id)"},
        {"name": "entity-type", "type": "token"},
        {"name": "type", "type": "token"},
        {"name": "subtype", "type": "token"},
        {"name": "action", "type": "token"},
        {"name": "_id", "type": "token"},
    ],
}


def require_audit_scope(principal: Principal, perm: str) -> None:
    """:class:`Forbidden` unless a user/ or system/ scope names AuditEvent with ``perm``."""
    if not any(g.resource_type == RTYPE and perm in g.perms and g.context in ("user", "system") for g in principal.grants):
        raise Forbidden(f"reading the audit trail needs scope user/AuditEvent.{perm} or system/AuditEvent.{perm} "
                        "(wildcard and patient scopes do not grant it)")


def parse_date(value: str) -> DateRange:
    """``[prefix]date`` as a half-open range at the value's precision (R4 search.html#date)."""
    prefix: str = "eq"
    if value[:2] in _PREFIXES:
        prefix, value = value[:2], value[2:]
    m = _DATE.match(value)
    if not m:
        raise InvalidRequest(f"date {value!r} is not a FHIR date/dateTime (e.g. 2026-12-05 or 2026-12-05T08:00:00Z)")
    g = m.groupdict()
    try:
        if g["H"] is not None:
            tz = g["tz"]
            if tz is None:
                raise InvalidRequest(f"date {value!r} has a time but no offset: add Z or +hh:mm")
            seconds = g["S"] or "00"
            frac = g["f"] or ""
            start = datetime.fromisoformat(f"{g['y']}-{g['m']}-{g['d']}T{g['H']}:{g['M']}:{seconds}{frac[:7]}"
                                           f"{'+00:00' if tz == 'Z' else tz}").astimezone(UTC)
            step = timedelta(microseconds=1) if frac else timedelta(seconds=1) if g["S"] else timedelta(minutes=1)
            end = start + step
        elif g["d"] is not None:
            start = datetime(int(g["y"]), int(g["m"]), int(g["d"]), tzinfo=UTC)
            end = start + timedelta(days=1)
        elif g["m"] is not None:
            start = datetime(int(g["y"]), int(g["m"]), 1, tzinfo=UTC)
            end = datetime(start.year + (start.month == 12), start.month % 12 + 1, 1, tzinfo=UTC)
        else:
            start = datetime(int(g["y"]), 1, 1, tzinfo=UTC)
            end = datetime(start.year + 1, 1, 1, tzinfo=UTC)
    except ValueError as err:
        raise InvalidRequest(f"date {value!r} is not a valid date: {err}") from err
    return DateRange(cast(DatePrefix, prefix), start, end)


def _token(value: str) -> tuple[str | None, str]:
    if "|" in value:
        system, _, code = value.partition("|")
        return (system or None), code
    return None, value


def _entity(value: str) -> tuple[str | None, str]:
    parts = value.split("/")
    if len(parts) >= 2 and re.fullmatch(r"[A-Z][A-Za-z]+", parts[-2]):
        return parts[-2], parts[-1]
    return None, value


def _action_filter(code: str) -> ActionFilter:
    exact = tuple(c.pattern for c in EVENT_CLASSES if c.action == code and not c.pattern.endswith("."))
    prefixes = tuple(c.pattern for c in EVENT_CLASSES if c.action == code and c.pattern.endswith("."))
    return ActionFilter(exact, prefixes, other=code == "E")


def parse_audit_search(pairs: list[tuple[str, str]], page_max: int) -> RecordQuery:
    """Search parameters as a :class:`RecordQuery`; unknown or malformed ones are refused (400)."""
    q = RecordQuery()
    for key, raw in pairs:
        if key not in PARAMS:
            raise InvalidRequest(f"unknown search parameter {key!r} for AuditEvent; supported: {', '.join(sorted(PARAMS))}")
        if "\x00" in raw or len(raw) > 2000:
            raise InvalidRequest(f"search parameter {key} holds a NUL character or is longer than 2000 characters")
        values = [v for v in raw.split(",") if v != ""]
        if key in ("date", "agent", "entity", "entity-type", "type", "subtype", "action", "_id") and not values:
            raise InvalidRequest(f"search parameter {key} needs a value")
        match key:
            case "date":
                q.dates.append(tuple(parse_date(v) for v in values))
            case "agent":
                q.actors.append(tuple(_entity(v)[1] if v.startswith(("Practitioner/", "Device/")) else v for v in values))
            case "entity":
                q.entities.append(tuple(_entity(v) for v in values))
            case "entity-type":
                q.entity_types.append(tuple(values))
            case "type" | "subtype":
                q.kinds.append(tuple(actions_for_code(*_token(v), subtype=key == "subtype") for v in values))
            case "action":
                bad = [v for v in values if v not in ("C", "R", "U", "D", "E")]
                if bad:
                    raise InvalidRequest(f"action must be C, R, U, D or E, not {bad[0]!r}")
                q.kinds.append(tuple(_action_filter(v) for v in values))
            case "_id":
                if not all(_DIGITS.fullmatch(v) for v in values):
                    raise InvalidRequest("_id of an AuditEvent is its record number (digits)")
                q.seqs.append(tuple(int(v) for v in values))
            case "_count":
                if not _DIGITS.fullmatch(raw) or len(raw) > 9:
                    raise InvalidRequest(f"_count must be a non-negative integer, not {raw!r}")
                q.count = min(int(raw), page_max)
            case "_sort":
                if raw not in ("date", "-date", "_id", "-_id"):
                    raise InvalidRequest("_sort for AuditEvent is date or -date")
                q.ascending = not raw.startswith("-")
            case "_total":
                if raw not in ("none", "estimate", "accurate"):
                    raise InvalidRequest("_total is none, estimate or accurate")
                q.with_total = raw == "accurate"
            case "_cursor":
                if not _DIGITS.fullmatch(raw):
                    raise InvalidRequest("_cursor is the record number from a next link")
                q.after = int(raw)
    return q


def _bundle(entries: list[tuple[str, str]], links: list[tuple[str, str]], total: int | None) -> str:
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "meta": {"lastUpdated": instant(utcnow())}}
    if total is not None:
        head["total"] = total
    head["link"] = [{"relation": r, "url": u} for r, u in links]
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    if not entries:
        return text
    parts = [f'{{"fullUrl":{json.dumps(url)},"resource":{body},"search":{{"mode":"match"}}}}' for url, body in entries]
    return text[:-1] + ',"entry":[' + ",".join(parts) + "]}"


router = APIRouter(tags=["audit"])
"""The AuditEvent routes (include before the generic ``/fhir/{type}`` routes: AuditEvent is not a stored type)."""


def _body(api: FhirApi, rec: Any) -> str:
    source = AuditSource(base_url=api.base_url, ae_title=api.settings.listener.ae_title, site="Taqrir")
    if api.mode == "model":
        return str(audit_event(rec, source).model_dump_json())
    return json.dumps(audit_event_json(rec, source), ensure_ascii=False, separators=(",", ":"))


@router.get("/fhir/AuditEvent", response_class=Response,
            responses=openapi_responses(200, 400, 401, 403, 404, 500, 503))
async def search_audit(request: Request, api: ApiDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Search the audit trail (see the module docstring for the parameters)."""
    principal = api.verifier.verify(authorization)
    require_audit_scope(principal, "s")
    pairs = list(request.query_params.multi_items())
    q = parse_audit_search(pairs, api.settings.api.page_max)
    page = await api.query(lambda conn: find_records(conn, q))
    entries = [(f"{api.base_url}/AuditEvent/{r.seq}", _body(api, r)) for r in page.records]
    kept = [(k, v) for k, v in pairs if k != "_cursor"]
    self_url = f"{api.base_url}/AuditEvent" + ("?" + urlencode(pairs) if pairs else "")
    links = [("self", self_url)]
    if page.next_cursor is not None:
        links.append(("next", f"{api.base_url}/AuditEvent?" + urlencode([*kept, ("_cursor", str(page.next_cursor))])))
    await api.record_access(action="audit.search", actor=principal.subject, entity_type=RTYPE,
                            details={"params": sorted({k for k, _ in pairs}), "total": page.total,
                                     "returned": [f"AuditEvent/{r.seq}" for r in page.records]})
    return fhir_response(_bundle(entries, links, page.total))


@router.get("/fhir/AuditEvent/{record_id}", response_class=Response,
            responses=openapi_responses(200, 400, 401, 403, 404, 500, 503))
async def read_audit(record_id: str, api: ApiDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """One AuditEvent by id (the chain record's sequence number)."""
    principal = api.verifier.verify(authorization)
    require_audit_scope(principal, "r")
    if not _DIGITS.fullmatch(record_id):
        raise NotFound(f"AuditEvent/{record_id} is not known (ids are record numbers)")
    rec = await api.query(lambda conn: get_record(conn, int(record_id)))
    if rec is None:
        raise NotFound(f"AuditEvent/{record_id} is not known")
    await api.record_access(action="audit.read", actor=principal.subject, entity_type=RTYPE, entity_id=record_id,
                            details={})
    return fhir_response(_body(api, rec), headers={"Last-Modified": _http_date(rec.at)})


def _http_date(at: datetime) -> str:
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return aware.strftime("%a, %d %b %Y %H:%M:%S GMT")
