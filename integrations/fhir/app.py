"""The FHIR R4 REST API (FastAPI), mounted at ``/fhir``: :func:`create_app` assembles it.

Interactions (R4 http.html), one router module each: ``GET /metadata`` and the SMART
configuration (:mod:`~integrations.fhir.metadata_routes`); read, vread and instance ``_history``
of DiagnosticReport, Patient, ImagingStudy, Device and Provenance
(:mod:`~integrations.fhir.read_routes`); search (:mod:`~integrations.fhir.search_routes`,
parameters in :mod:`~integrations.fhir.search_params`); ``$review``
(:mod:`~integrations.fhir.review`); signed reports back from a RIS/EHR
(:mod:`~integrations.fhir.signed`); the audit trail as AuditEvents
(:mod:`~integrations.fhir.audit_routes`). Routers read what is assembled here from
``request.app.state`` (:mod:`~integrations.fhir.deps`). Every error is an OperationOutcome
(:mod:`~integrations.fhir.error_handlers`). Every read and search is committed to the audit trail
with the caller's identity before its response is sent (:mod:`audit.access_writer`); a review
records in its own transaction.

The hot path. Nearly all traffic is two requests: read a DiagnosticReport, search one patient's
reports. What they do lives once, in :mod:`integrations.fhir.interactions`, and two doors lead
to it: :class:`~integrations.fhir.fastpath.FastPath`, an ASGI middleware (``api.fast_path``, on by
default) that takes ``GET /fhir/<type>`` and ``GET /fhir/<type>/<valid id>`` itself, skipping
Starlette's route matching, FastAPI's dependency resolution and validation; and the FastAPI routes
for everything else. Both answer with the same status, headers, body and audit record
(``tests/integrations/fhir/test_fastpath.py``). Objects built at start-up are frozen out of the
cyclic garbage collector (below). Measured throughput and latency: ``bench/README.md``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from ground.clock import utcnow
from reporting.fhir.timing import instant

from . import metadata_routes, read_routes, review, search_routes, signed
from .audit_routes import router as audit_router
from .auth import smart_configuration
from .capability import capability_statement
from .config import FhirSettings
from .error_handlers import EXCEPTION_HANDLERS
from .fastpath import FastPath
from .interactions import FhirApi
from .metadata_routes import PUBLIC_PATHS
from .review import VerifiedSrStore


def document_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's schema as this server really behaves: no 422 (validation errors are answered
    400 with an OperationOutcome by the handler), and the bearer scheme on every interaction but
    the public discovery documents."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "SMART App Launch v2 scopes: .r read, .s search, .u review "
                       "(see /fhir/.well-known/smart-configuration)"}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.get("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":
                responses.pop("422")  # FastAPI's own: never sent (the handler answers 400)
            if path not in PUBLIC_PATHS:
                op["security"] = [{"bearer": []}]
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if not components.get("schemas"):
        components.pop("schemas", None)
    return schema


class _OpenApi:
    """``app.openapi``: FastAPI's generator, documented once (:func:`document_openapi`) and cached."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._generate = app.openapi

    def __call__(self) -> dict[str, Any]:
        if self._app.openapi_schema is None:
            self._app.openapi_schema = document_openapi(self._generate())
        return self._app.openapi_schema


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Everything imported and built so far (FastAPI, pydantic and fhir.resources models,
    # SQLAlchemy) lives as long as the process: every full (gen2) collection would walk it again,
    # a pause of the event loop stalling every request in flight (the p99). Freezing it leaves the
    # collector only what requests allocate.
    gc.collect()
    gc.freeze()
    yield
    await fhir_api_of(app).aclose()


def fhir_api_of(app: FastAPI) -> FhirApi:
    """The :class:`FhirApi` an application built by :func:`create_app` serves with."""
    api: FhirApi = app.state.fhir
    return api


def create_app(settings: FhirSettings, engine: Engine, *, store_verified_sr: VerifiedSrStore) -> FastAPI:
    """The FastAPI application serving the FHIR API at ``/fhir`` over ``engine`` (the caller's).

    ``store_verified_sr`` runs in the transaction of an accepted or edited ``$review`` (the roof
    passes ``workers.dicom_objects.store_verified_sr``)."""
    api = FhirApi(settings, engine)
    app = FastAPI(
        lifespan=_lifespan,
        title="Taqrir FHIR R4 API (research drafts)",
        version=metadata.version("taqrir") if _installed() else "0",
        description="Bilingual research drafts of imaging reports. Not for clinical use.",
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.fhir = api
    app.state.store_verified_sr = store_verified_sr
    app.state.capability_body = capability_statement(api.base_url, app.version, instant(utcnow())).model_dump_json()
    app.state.smart_body = smart_configuration(settings.api)
    if settings.api.fast_path:
        app.add_middleware(FastPath, api=api)
    app.openapi = _OpenApi(app)  # type: ignore[method-assign]
    app.include_router(metadata_routes.router)
    app.include_router(audit_router)  # before /fhir/{resource_type}: AuditEvent is not a stored type
    app.include_router(search_routes.router)
    app.include_router(read_routes.router)
    app.include_router(review.router)
    app.include_router(signed.router)  # signed reports back from a RIS/EHR: POST, PUT DiagnosticReport
    return app


def _installed() -> bool:
    try:
        metadata.version("taqrir")
    except metadata.PackageNotFoundError:
        return False
    return True

