"""An ASGI layer that serves the hot requests (GET read, GET search) before FastAPI routes them.

Why: in ``bench/fhir_api.py`` about a third of the server's CPU per request went to framework
plumbing around two tiny handlers: Starlette routing over every route, FastAPI's dependency
resolution (the principal, the ``Request``), enum and pattern validation of the path, the
exception-handler wrappers and response adapters. For the two interactions that make nearly all
the traffic this layer does the routing itself with a split and a set lookup, and calls the very
functions the FastAPI routes call (:mod:`integrations.fhir.interactions`), so both paths answer
with the same status, headers, body and audit record. ``bench/fhir_api.py --fast-path off``
measures the difference (figures in ``bench/README.md``).

It takes a request only when FastAPI would route it to the read or search route with valid path
parameters: ``GET /fhir/<type>`` and ``GET /fhir/<type>/<id>`` with ``<type>`` one of the served
resource types and ``<id>`` matching the route's id pattern (the whole string: Python's ``$``
would accept a trailing newline, pydantic's does not). Anything else (other methods, HEAD,
unknown types, invalid ids, vread, history, metadata, $review, a ``root_path``) goes to FastAPI
untouched, which keeps the OpenAPI schema and every other behaviour as it was.

It is installed as a FastAPI middleware (``app.add_middleware``), so it sits inside Starlette's
ServerErrorMiddleware and FastAPI's telemetry and body-limit layers: an unexpected exception
still becomes the same logged 500 OperationOutcome. FHIR errors (401, 403, 404, 400, 503) are
answered with :func:`~integrations.fhir.interactions.error_response`, the function FastAPI's
exception handler uses.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import Principal
from .errors import AuditUnavailable, FhirError
from .interactions import (
    FhirApi,
    audit_failure,
    error_response,
    failure_reason,
    negotiate,
    read_resource,
    search_resources,
)
from .store import RESOURCE_TYPES

ID_PATTERN: Final = r"[A-Za-z0-9\-.]{1,64}"
"""The id path pattern of the FastAPI routes (``IdPath``), without anchors."""

_ID: Final = re.compile(ID_PATTERN)
_TYPES: Final = frozenset(RESOURCE_TYPES)
_PREFIX: Final = "/fhir/"


class FastPath:
    """ASGI middleware: serve GET read and GET search directly, pass everything else on."""

    def __init__(self, app: ASGIApp, api: FhirApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        parts = path[len(_PREFIX):].split("/")
        rtype = parts[0]
        if rtype not in _TYPES or len(parts) > 2 or (len(parts) == 2 and not _ID.fullmatch(parts[1])):
            await self.app(scope, receive, send)
            return
        principal: Principal | None = None
        query: bytes = scope["query_string"]
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else []
        try:
            principal = self.api.verifier.verify(_header(scope, b"authorization"))
            # the state FastAPI's handlers read: an unexpected error's 500 is audited with the caller
            scope.setdefault("state", {})["fhir_principal"] = principal
            negotiate(_header(scope, b"accept"), next((v for k, v in pairs if k == "_format"), None))
            if len(parts) == 2:
                response = await read_resource(self.api, principal, rtype, parts[1],
                                               if_none_match=_header(scope, b"if-none-match"))
            else:
                response = await search_resources(self.api, principal, rtype, pairs, receive=receive)
        except FhirError as err:
            response = error_response(err)
            if not isinstance(err, AuditUnavailable):  # the audit trail itself is what failed
                await audit_failure(self.api, principal=principal, method="GET", path=path, pairs=pairs,
                                    status=err.status_code, reason=failure_reason(err))
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first header ``name`` (lower case), as Starlette's ``Headers.get`` (and so FastAPI's ``Header()``) reads it."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None
