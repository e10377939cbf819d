"""``GET /fhir/{type}/{id}`` (read), ``.../_history/{vid}`` (vread) and ``.../_history`` (instance
history), R4 http.html#read, #vread, #history.

Read is :func:`~integrations.fhir.interactions.read_resource`, shared with the fast path; vread
and history run SQLAlchemy Core through :meth:`FhirApi.query <integrations.fhir.interactions.FhirApi.query>`.
Each access is recorded before its answer is sent."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Request
from sqlalchemy.engine import Connection
from starlette.responses import Response

from reporting.fhir.timing import instant

from .deps import ApiDep, IdPath, PrincipalDep, ResourceType
from .errors import InvalidRequest
from .interactions import check_compartment, negotiate, read_resource, version_headers
from .responses import bundle_body, fhir_response, openapi_responses, resource_body
from .search_params import MAX_COUNT, parse_int
from .store import VersionRow, fetch_current, get_version, history, utc

router = APIRouter()


@router.get("/fhir/{resource_type}/{resource_id}", tags=["read"], response_class=Response,
            responses=openapi_responses(200, 304, 400, 401, 403, 404, 406, 500, 503))
async def read(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep, request: Request,
               api: ApiDep) -> Response:
    """Read the current version."""
    negotiate(request.headers.get("accept"), request.query_params.get("_format"))
    return await read_resource(api, principal, resource_type.value, resource_id,
                               if_none_match=request.headers.get("if-none-match"))


@router.get("/fhir/{resource_type}/{resource_id}/_history", tags=["history"], response_class=Response,
            responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503))
async def instance_history(resource_type: ResourceType, resource_id: IdPath, principal: PrincipalDep,
                           request: Request, api: ApiDep) -> Response:
    """Every version, newest first (Bundle history)."""
    rtype = resource_type.value
    negotiate(request.headers.get("accept"), request.query_params.get("_format"))
    principal.require(rtype, "r")
    pairs = list(request.query_params.multi_items())
    count, offset = 50, 0
    for k, v in pairs:
        if k == "_count":
            count = min(parse_int(k, v, 0, MAX_COUNT), 500)
        elif k == "_offset":
            offset = parse_int(k, v, 0, 10_000_000)
        elif k != "_format":
            raise InvalidRequest(f"_history takes _count and _offset (non-negative integers), not {k}={v!r}")

    def page(conn: Connection) -> tuple[int, list[VersionRow]]:
        check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
        return history(conn, rtype, resource_id, count=count, offset=offset)

    total, rows = await api.query(page)
    await api.record_access(action="fhir.history", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                            details={"versions": [r.version_id for r in rows]})
    links = [("self", f"{api.base_url}/{rtype}/{resource_id}/_history?" + urlencode({"_count": count, "_offset": offset}))]
    if offset + count < total:
        links.append(("next", f"{api.base_url}/{rtype}/{resource_id}/_history?" + urlencode({"_count": count, "_offset": offset + count})))
    entries = [(rtype, resource_id, r.json_text, None) for r in rows]
    # R4 bdl-3/bdl-4: a history entry says how its version came to be (request) and what the
    # server answered (response): version 1 was created (POST), later ones updated (PUT).
    requests = [{"request": {"method": "POST", "url": rtype} if r.version_id == 1
                 else {"method": "PUT", "url": f"{rtype}/{resource_id}"},
                 "response": {"status": "201 Created" if r.version_id == 1 else "200 OK",
                              "etag": f'W/"{r.version_id}"', "lastModified": instant(utc(r.last_updated))}}
                for r in rows]
    body = bundle_body(bundle_type="history", base_url=api.base_url, total=total, links=links, entries=entries,
                       mode=api.mode, entry_extras=requests)
    return fhir_response(body)


@router.get("/fhir/{resource_type}/{resource_id}/_history/{version_id}", tags=["read"], response_class=Response,
            responses=openapi_responses(200, 400, 401, 403, 404, 406, 500, 503))
async def vread(resource_type: ResourceType, resource_id: IdPath,
                version_id: Annotated[int, Path(ge=1, le=2**31 - 1)], principal: PrincipalDep,
                request: Request, api: ApiDep) -> Response:
    """Read one version."""
    rtype = resource_type.value
    negotiate(request.headers.get("accept"), request.query_params.get("_format"))
    principal.require(rtype, "r")

    def version(conn: Connection) -> VersionRow:
        check_compartment(principal, fetch_current(conn, rtype, resource_id), "r")
        return get_version(conn, rtype, resource_id, version_id)

    row = await api.query(version)
    await api.record_access(action="fhir.vread", actor=principal.subject, entity_type=rtype, entity_id=resource_id,
                            details={"version": version_id})
    return fhir_response(resource_body(rtype, row.json_text, api.mode), headers=version_headers(row.version_id, row.last_updated))
