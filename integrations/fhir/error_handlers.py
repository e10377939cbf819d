"""The FastAPI exception handlers: the one place an error of the FastAPI door becomes an HTTP
answer (an OperationOutcome), and every refused or failed access is recorded (issue 11, item 23)
as the fast path records its own (:mod:`integrations.fhir.fastpath`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .deps import ResourceType, fhir_api
from .errors import AuditUnavailable, FhirError
from .interactions import audit_failure, error_response, failure_reason
from .responses import operation_outcome

log = logging.getLogger(__name__)


async def _audited(request: Request, resp: Response, status: int, reason: str, *, record: bool = True) -> Response:
    if record:
        await audit_failure(fhir_api(request), principal=getattr(request.state, "fhir_principal", None),
                            method=request.method, path=request.url.path,
                            pairs=list(request.query_params.multi_items()), status=status, reason=reason)
    return resp


async def fhir_error(request: Request, err: FhirError) -> Response:
    return await _audited(request, error_response(err), err.status_code, failure_reason(err),
                          record=not isinstance(err, AuditUnavailable))  # the trail itself failed


async def invalid_request(request: Request, err: RequestValidationError) -> Response:
    if any(tuple(e.get("loc", ())) == ("path", "resource_type") for e in err.errors()):
        msg = "unknown resource type: this server serves " + ", ".join(t.value for t in ResourceType)
        return await _audited(request, operation_outcome(404, "not-supported", msg), 404, msg)
    problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
    msg = f"invalid request: {problems}"[:2000]
    return await _audited(request, operation_outcome(400, "invalid", msg), 400, msg)


async def http_error(request: Request, err: StarletteHTTPException) -> Response:
    code = {404: "not-found", 405: "not-supported"}.get(err.status_code, "processing")
    resp = operation_outcome(err.status_code, code, str(err.detail))
    if err.headers:
        resp.headers.update(err.headers)
    return await _audited(request, resp, err.status_code, str(err.detail))


async def unexpected(request: Request, err: Exception) -> Response:
    log.exception("unhandled error in the FHIR API: %s", type(err).__name__)
    return await _audited(request, operation_outcome(500, "exception", "internal server error"), 500,
                          f"internal server error: {type(err).__name__}")


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    FhirError: fhir_error,
    RequestValidationError: invalid_request,
    StarletteHTTPException: http_error,
    Exception: unexpected,
}
"""Passed to FastAPI by :func:`~integrations.fhir.app.create_app`."""
