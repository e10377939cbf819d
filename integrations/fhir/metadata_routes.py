"""``GET /fhir/metadata`` (the CapabilityStatement) and the SMART configuration: public discovery.

Both bodies are built once at start-up (:func:`~integrations.fhir.app.create_app` keeps them in
``app.state``) and served as bytes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from .interactions import negotiate
from .responses import fhir_response, openapi_responses

PUBLIC_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})
"""The paths served without a token (SMART App Launch requires both to be public)."""

router = APIRouter(tags=["capabilities"])


@router.get("/fhir/metadata", response_class=Response, responses=openapi_responses(200, 406))
def capabilities(request: Request) -> Response:
    """The CapabilityStatement (public, as SMART App Launch requires)."""
    negotiate(request.headers.get("accept"), request.query_params.get("_format"))
    body: str = request.app.state.capability_body
    return fhir_response(body)


@router.get("/fhir/.well-known/smart-configuration", response_class=Response,
            responses={200: {"description": "SMART configuration", "content": {"application/json": {}}}})
def smart_configuration(request: Request) -> Response:
    """How SMART clients get a token (public, SMART App Launch 2.0 conformance.html)."""
    return Response(request.app.state.smart_body, media_type="application/json")
