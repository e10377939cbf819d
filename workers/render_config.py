"""Settings of key-image rendering (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class RenderSettings(BaseModel):
    """How a stable study becomes key images."""

    rules_file: Path | None = Field(
        None, description="YAML series-selection rules; None uses the built-in defaults."
    )
    max_side: int = Field(
        336, ge=32, description="Longest side of a key image in pixels (aspect kept)."
    )
    slices_per_volume: int = Field(
        5, ge=1, description="Representative slices chosen from a volume series."
    )
    frames_per_cine: int = Field(
        3,
        ge=1,
        description="Representative frames chosen from a cine or temporal multi-frame instance.",
    )
    views_per_series: int = Field(
        4, ge=1, description="Most single images (views) or cine clips rendered from one series."
    )
    max_series: int = Field(
        4, ge=1, description="Most series rendered per study (best-ranked first)."
    )
    max_key_images: int = Field(
        16, ge=1, description="Most key images per study, all series together."
    )
    ct_window_presets: bool = Field(
        True,
        description=(
            "CT uses standard windows chosen per study (brain+bone, soft tissue+lung or soft tissue+bone); "
            "False uses the header's window like other modalities."
        ),
    )
    wsi_patches: int = Field(
        3, ge=0, description="High-magnification patches taken where a whole slide shows tissue."
    )
    montage: bool = Field(
        False,
        description="Also emit one labelled montage of the chosen slices of each volume series.",
    )
