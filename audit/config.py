"""Settings of the ATNA audit sender (composed into :class:`taqrir.settings.Settings` as ``atna``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator


class AtnaSettings(BaseModel):
    """``taqrir audit-ship`` and the background sender of ``taqrir listen``/``serve``: the audit trail
    as RFC 5424 syslog over TLS (RFC 5425) to an IHE ATNA Audit Record Repository."""

    enabled: bool = Field(False, description="Run the background sender in `taqrir listen`/`serve`.")
    host: str = Field("", description="Collector (Audit Record Repository) host name or address.")
    port: int = Field(6514, ge=1, le=65535, description="Collector TCP port (6514: syslog over TLS, RFC 5425).")
    ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the collector's certificate (None: the system store)."
    )
    cert_file: Path | None = Field(None, description="PEM client certificate for mutual TLS (ATNA node authentication).")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    server_name: str | None = Field(
        None, description="Name to check the collector's certificate against (None: host)."
    )
    app_name: str = Field("taqrir", max_length=48, description="RFC 5424 APP-NAME of every message.")
    hostname: str | None = Field(None, max_length=255, description="RFC 5424 HOSTNAME (None: this machine's FQDN).")
    enterprise_site: str = Field("", description="AuditEnterpriseSiteID of the DICOM audit messages (the site's name).")
    batch: int = Field(200, ge=1, le=10_000, description="Records sent before waiting for the collector's TCP acknowledgement "
                                                         "and committing the cursor (bounds re-sends after a failure).")
    poll_s: float = Field(1.0, gt=0, description="Seconds between looks for new records when caught up.")
    retry_min_s: float = Field(1.0, gt=0, description="First wait after a failed connection or send.")
    retry_max_s: float = Field(300.0, gt=0, description="Cap of the doubling wait between retries.")
    ack_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the collector to acknowledge a batch at TCP level.")
    settle_s: float = Field(
        0.05, ge=0, description="After a batch is acknowledged, how long to watch the connection for a close or reset "
        "(a collector that closed with unread data) before committing the cursor.",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect and TLS handshake timeout.")

    @model_validator(mode="after")
    def _complete(self) -> AtnaSettings:
        if self.enabled and not self.host:
            raise ValueError("atna.enabled needs atna.host (the collector)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("atna.cert_file and atna.key_file go together (mutual TLS)")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("atna.retry_max_s must be at least atna.retry_min_s")
        return self

    @property
    def collector(self) -> str:
        """The cursor key: ``host:port``."""
        return f"{self.host}:{self.port}"
