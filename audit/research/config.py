"""Settings of the research export and report (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, Field, SecretStr

PLACEHOLDER_KEY: Final = "changethis"
"""The default pseudonym key: accepted only while ``environment`` is ``development``."""

DatePolicy = Literal["none", "year", "shifted", "full"]


class ResearchSettings(BaseModel):
    """``taqrir research export`` / ``taqrir research report``."""

    pseudonym_key: SecretStr = Field(
        SecretStr(PLACEHOLDER_KEY),
        description="Secret key of the keyed hashes (HMAC-SHA256) that replace patient, study, draft and "
        "reviewer identifiers in exports. The same key gives the same pseudonyms across exports (so they "
        "can be joined); keep it out of the researchers' hands. The placeholder is refused outside "
        "development (see `environment`); use at least 32 random characters.",
    )
    dates: DatePolicy = Field(
        "year",
        description="Which dates an export keeps: none (no dates; durations stay), year (the year only), "
        "shifted (full dates moved by a per-patient offset derived from the key, intervals within a patient "
        "kept), full (as stored: not de-identified, for an IRB that allows it).",
    )
    date_shift_max_days: int = Field(
        365, ge=1, le=3650, description="shifted: offsets are drawn from -N..+N days per patient."
    )
    include_text: bool = Field(
        True, description="Export the draft and signed texts (free text may hold identifiers the model or "
        "the radiologist wrote); false leaves the text columns empty."
    )
    reviewer_roles: dict[str, str] = Field(
        default_factory=dict,
        description="Reviewer (token subject) -> role exported in reviewer_role (e.g. radiologist, resident); "
        "Taqrir's tokens carry no role.",
    )
    default_reviewer_role: str = Field(
        "clinician", description="reviewer_role of a reviewer missing from reviewer_roles."
    )
    batch_rows: int = Field(
        2000, ge=10, le=100_000, description="Draft versions read, converted and written per batch "
        "(memory is bounded by one batch)."
    )
