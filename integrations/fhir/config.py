"""Settings of the FHIR API (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ApiSettings(BaseModel):
    """``taqrir api``."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port.")
    base_url: str = Field("http://127.0.0.1:8080/fhir", description="Public base URL used in links.")
