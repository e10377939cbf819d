"""Settings of the inference room (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class InferenceSettings(BaseModel):
    """Which model answers, and how it is asked."""

    backend: Literal["transformers", "sglang"] = Field(
        "transformers", description="transformers: in-process local checkpoint; sglang: an OpenAI-compatible server."
    )
    model_path: Path | None = Field(
        None, description="Local checkpoint in transformers layout; None means the tiny demo model in data_dir."
    )
    server_url: str = Field("http://127.0.0.1:30000", description="Base URL of the SGLang/OpenAI-compatible server.")
    model_name: str = Field("BiMediX2-8B-Bi", description="Model name sent to the server.")
