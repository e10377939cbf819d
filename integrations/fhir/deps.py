"""FastAPI dependencies shared by the routers: the API state and the caller.

Routers get what :func:`~integrations.fhir.app.create_app` assembled from ``request.app.state``
(never from a closure), so each router module can be read and tested on its own.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from .auth import Principal
from .fastpath import ID_PATTERN
from .interactions import FhirApi


class ResourceType(str, Enum):
    """The resource types this server serves."""

    DiagnosticReport = "DiagnosticReport"
    Patient = "Patient"
    ImagingStudy = "ImagingStudy"
    Device = "Device"
    Provenance = "Provenance"


def fhir_api(request: Request) -> FhirApi:
    """The :class:`FhirApi` of the application serving ``request``."""
    api: FhirApi = request.app.state.fhir
    return api


async def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The verified caller; kept on the request for the audit record of a refusal that follows."""
    # async: CPU-only (signature check), so it runs on the event loop without a threadpool hop.
    principal = fhir_api(request).verifier.verify(authorization)
    request.state.fhir_principal = principal
    return principal


ApiDep = Annotated[FhirApi, Depends(fhir_api)]
PrincipalDep = Annotated[Principal, Depends(caller)]
IdPath = Annotated[str, Path(pattern=f"^{ID_PATTERN}$")]
