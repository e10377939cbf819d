"""Where drafts go back to: the PACS destinations of the outbox, as typed settings.

A PACS admin adds Taqrir's AE title to the PACS's list of known modalities, then lists the PACS
here (``export.destinations`` in the YAML settings, or ``TAQRIR_EXPORT__DESTINATIONS`` as JSON).
Each destination names which kinds of object it takes, so that a PACS that does not display
Enhanced SR can still receive the PDF, and a second archive can take everything.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator


class ObjectKind(StrEnum):
    """The DICOM objects a draft becomes (built in ``reporting/dicom``)."""

    sr = "sr"
    """The draft Enhanced SR (VerificationFlag UNVERIFIED)."""
    pdf = "pdf"
    """The bilingual Encapsulated PDF (Modality DOC)."""
    kos = "kos"
    """The Key Object Selection naming the key images."""
    verified_sr = "verified_sr"
    """The SR a clinician's review makes (VerificationFlag VERIFIED)."""


ALL_KINDS: tuple[ObjectKind, ...] = tuple(ObjectKind)


def _ae_title(value: str) -> str:
    """PS3.5 6.2: AE titles are 1-16 characters of the default repertoire, no backslash or
    control characters; leading/trailing spaces are not significant."""
    v = value.strip()
    if not 1 <= len(v) <= 16 or "\\" in v or any(ord(c) < 0x20 or ord(c) > 0x7E for c in v):
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return v


class DestinationTls(BaseModel):
    """TLS towards one destination (DICOM over TLS, PS3.15 Annex B.1). Leave out for plain TCP."""

    ca_file: Path | None = Field(
        None, description="PEM CA bundle that signs the PACS's certificate; None uses the system store."
    )
    cert_file: Path | None = Field(None, description="Our PEM client certificate, when the PACS asks for one.")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    check_hostname: bool = Field(True, description="Check the PACS's certificate names host.")

    @model_validator(mode="after")
    def _pairs(self) -> DestinationTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        return self


class Destination(BaseModel):
    """One PACS (or archive) that receives draft objects by C-STORE."""

    name: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Stable identifier used in outbox rows, metrics and the CLI; never rename a live one.",
    )
    ae_title: str = Field(..., description="The PACS's own (called) AE title.")
    host: str = Field(..., min_length=1, description="Host name or IP address of the PACS.")
    port: int = Field(..., ge=1, le=65535, description="The PACS's DICOM port.")
    calling_ae_title: str | None = Field(
        None, description="Our AE title towards this PACS; None uses export.calling_ae_title."
    )
    kinds: list[ObjectKind] = Field(
        default_factory=lambda: list(ALL_KINDS), description="Which object kinds this destination takes."
    )
    tls: DestinationTls | None = Field(None, description="TLS settings; None sends over plain TCP.")
    storage_commitment: bool = Field(
        False, description="Ask the PACS to commit each sent object (N-ACTION); the answer is recorded per object."
    )
    enabled: bool = Field(True, description="False keeps the destination's history but queues nothing new.")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae_title(v)

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling(cls, v: str | None) -> str | None:
        return None if v is None else _ae_title(v)

    def takes(self, kind: ObjectKind | str) -> bool:
        """Whether this destination receives objects of ``kind``."""
        return self.enabled and ObjectKind(kind) in self.kinds


class ExportSettings(BaseModel):
    """Sending draft objects back to PACS destinations (the outbox, ``taqrir outbox``)."""

    destinations: list[Destination] = Field(
        default_factory=list, description="PACS destinations; empty sends nothing (objects are still written)."
    )
    calling_ae_title: str = Field("TAQRIR", description="Our AE title when a destination names none.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open the TCP connection.")
    acse_timeout: float = Field(15.0, gt=0, description="Seconds to finish association negotiation.")
    dimse_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a C-STORE response.")
    network_timeout: float = Field(60.0, gt=0, description="Seconds of silence before the association is dropped.")
    backoff_initial: float = Field(30.0, gt=0, description="Delay before the first retry of a transient failure.")
    backoff_factor: float = Field(2.0, ge=1, description="Each further retry waits this many times longer.")
    backoff_max: float = Field(
        3600.0, gt=0, description="Cap on the retry delay: a PACS down for days is tried at most this often."
    )
    give_up_after: float = Field(
        14 * 86400.0, gt=0,
        description="Seconds of transient failures after which a row goes dead (`taqrir outbox retry --dead` replays).",
    )
    sending_lease: float = Field(
        600.0, gt=0,
        description="A row left 'sending' this long (its worker died) is sent again by the sweep; same SOP Instance UID.",
    )
    commitment_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for a Storage Commitment result before recording it as timed out."
    )

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling(cls, v: str) -> str:
        return _ae_title(v)

    @model_validator(mode="after")
    def _unique_names(self) -> ExportSettings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"export.destinations names must be unique; repeated: {dupes}")
        return self

    def destination(self, name: str) -> Destination | None:
        """The destination called ``name``, or None when it is no longer configured."""
        return next((d for d in self.destinations if d.name == name), None)

    def calling_ae(self, dest: Destination) -> str:
        """Our AE title towards ``dest``."""
        return dest.calling_ae_title or self.calling_ae_title

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (capped exponential)."""
        return float(min(self.backoff_initial * self.backoff_factor ** max(attempts - 1, 0), self.backoff_max))
