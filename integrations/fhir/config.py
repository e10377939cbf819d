"""Settings of the FHIR API (composed into :class:`taqrir.settings.Settings`), and what the API
reads of the composed settings (:class:`FhirSettings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field, model_validator

from integrations.dicom.destinations import ExportSettings
from reporting.dicom_config import DicomObjectSettings


class ApiSettings(BaseModel):
    """``taqrir api``."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port.")
    base_url: str = Field(
        "",
        description="Public base URL used in links and the CapabilityStatement. Empty: derived from "
        "api.host and api.port as http://<host>:<port>/fhir (127.0.0.1 when bound to every address), so "
        "that setting the port alone moves the links too; set it behind a proxy or TLS terminator.",
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    jwt_algorithm: Literal["HS256", "RS256"] = Field(
        "HS256", description="HS256 with a shared key (embedded default) or RS256 with a JWKS."
    )
    jwt_key_file: Path | None = Field(
        None, description="HS256 key file; None means data_dir/api-key, created on first use (0600)."
    )
    jwks_url: str | None = Field(None, description="RS256: URL of the issuer's JWKS (fetched and cached).")
    jwks_file: Path | None = Field(None, description="RS256: a local JWKS file (instead of jwks_url).")
    jwt_issuer: str | None = Field(None, description="Required `iss` claim; None accepts any issuer.")
    jwt_audience: str | None = Field(None, description="Required `aud` claim; None accepts tokens without one.")
    token_ttl_s: int = Field(3600, ge=60, description="Lifetime of tokens issued by `taqrir token`.")
    leeway_s: int = Field(30, ge=0, description="Clock skew tolerated on exp/nbf/iat.")
    study_timezone: str = Field(
        "UTC", description="IANA zone in which naive DICOM Study Date/Time values are read (FHIR needs an offset)."
    )
    response_mode: Literal["model", "raw"] = Field(
        "raw",
        description="raw: stored JSON, validated by the fhir.resources models when it was built, is sent "
        "as stored; model: it is parsed into the models again on every response (about 2 ms per "
        "DiagnosticReport; bench/fhir_api.py measures both).",
    )
    fast_path: bool = Field(
        True,
        description="Serve GET read and search through integrations.fhir.fastpath (same responses and "
        "audit records, without FastAPI's per-request routing and dependency work); false routes "
        "every request through FastAPI.",
    )
    audit_linger_ms: float = Field(
        5.0,
        ge=0,
        le=100,
        description="How long the access-audit writer waits after the first event of a batch for more "
        "to join it (group commit). Each batch costs about the same whatever its size (chain lock, "
        "head read, INSERT, commit), so a few milliseconds' wait buys far fewer batches; a response "
        "still waits for its record's commit, so the linger is a floor under every read's latency. "
        "5 ms measured best of 0/2/5/10 in bench/fhir_api.py at 500-1000 req/s. 0 writes each batch "
        "as soon as the writer is free.",
    )
    page_max: int = Field(500, ge=1, le=500, description="Largest _count honoured.")
    statement_timeout_ms: int = Field(
        10_000,
        ge=0,
        description="PostgreSQL statement_timeout of the API's read connections (0: none). Searches are "
        "bounded in their parameters (integrations.fhir.search_params), and this bounds what is left: "
        "a query that would run on for minutes is cancelled by the server and answered 503.",
    )
    smart_token_endpoint: str | None = Field(
        None, description="Token endpoint of the identity provider that issues this API's tokens, published "
        "in /fhir/.well-known/smart-configuration (None: tokens are issued out of band by `taqrir token`).")
    smart_authorization_endpoint: str | None = Field(
        None, description="Authorization endpoint of that identity provider (for SMART app launch), if any.")

    @model_validator(mode="after")
    def _derive_base_url(self) -> ApiSettings:
        if not self.base_url:
            host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
            host = f"[{host}]" if ":" in host else host
            self.base_url = f"http://{host}:{self.port}/fhir"
        return self

    @model_validator(mode="after")
    def _rs256_needs_keys(self) -> ApiSettings:
        if self.jwt_algorithm == "RS256" and not (self.jwks_url or self.jwks_file):
            raise ValueError("api.jwt_algorithm RS256 needs api.jwks_url or api.jwks_file")
        return self


class _CalledAe(Protocol):
    @property
    def ae_title(self) -> str: ...


class FhirSettings(Protocol):
    """The sections and places the API reads: the roof's composed settings satisfy it as they are
    (a room never imports the roof). ``listener.ae_title`` names us in AuditEvents;
    ``storage_url``, ``dicom_objects`` and ``export`` serve the verified SR a review writes and
    queues for PACS destinations."""

    @property
    def api(self) -> ApiSettings: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def listener(self) -> _CalledAe: ...

    @property
    def dicom_objects(self) -> DicomObjectSettings: ...

    @property
    def storage_url(self) -> str: ...

    @property
    def export(self) -> ExportSettings: ...
