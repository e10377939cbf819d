"""Settings of the DICOM objects (``TAQRIR_DICOM_OBJECTS__...``); apart from ``reporting.dicom`` so that
loading settings does not import highdicom."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DicomObjectSettings(BaseModel):
    """What the DICOM SR, PDF and KOS of each draft carry, and whether they are made."""

    enabled: bool = Field(
        True, description="Build the draft SR, report PDF and key-image KOS of every draft when it is published."
    )
    institution_name: str = Field(
        "", max_length=64, description="Institution Name (0008,0080) written on every object; empty writes none."
    )
    verifying_organization: str = Field(
        "", max_length=64,
        description="Verifying Organization (0040,A027) of verified SRs (the reviewer's organisation; the "
                    "token carries none). Empty: institution_name, else 'Unspecified organization'.",
    )

    def organization(self) -> str:
        """The Verifying Organization to write (Type 1: never empty)."""
        return self.verifying_organization or self.institution_name or "Unspecified organization"
