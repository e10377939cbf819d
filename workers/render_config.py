"""Settings of key-image rendering (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class RenderSettings(BaseModel):
    """How a stable study becomes key images."""

    rules_file: Path | None = Field(None, description="YAML series-selection rules; None uses the built-in defaults.")
    max_side: int = Field(336, ge=32, description="Longest side of a key image in pixels (aspect kept).")
    slices_per_volume: int = Field(5, ge=1, description="Representative slices chosen from a volume series.")
