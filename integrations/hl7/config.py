"""Settings of the HL7 v2 MLLP receiver (composed into :class:`taqrir.settings.Settings` as ``hl7``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hl7Settings(BaseModel):
    """``taqrir hl7``: signed reports back from the RIS as ORU^R01 over MLLP."""

    host: str = Field(default="0.0.0.0", description="Address to bind.")
    port: int = Field(default=2575, ge=0, le=65535, description="TCP port (2575 is HL7's registered port).")
    application: str = Field(default="TAQRIR", max_length=180, description="MSH-3 of our ACKs (our application).")
    facility: str = Field(default="", max_length=180, description="MSH-4 of our ACKs (our facility).")
    default_encoding: str = Field(
        default="utf-8",
        description="Python codec for messages without MSH-18 (HL7's own default is ASCII, which UTF-8 reads alike).",
    )
    timezone: str = Field(
        default="UTC", description="IANA zone of the sender's timestamps without an offset (OBR-22)."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest MLLP frame accepted; larger ones close the connection."
    )
    idle_timeout: float = Field(default=600.0, gt=0, description="Seconds of silence before a connection is closed.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Peer IP addresses or CIDR networks allowed to connect; empty allows any."
    )
