"""Settings of the inference room (composed into :class:`taqrir.settings.Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .types import SamplingParams


class InferenceSettings(BaseModel):
    """Which model answers, and how it is asked."""

    backend: Literal["transformers", "sglang"] = Field(
        "transformers", description="transformers: in-process local checkpoint; sglang: an OpenAI-compatible server."
    )
    model_path: Path | None = Field(
        None, description="Local checkpoint in transformers layout; None means the tiny demo model in data_dir."
    )
    auto_tiny: bool = Field(
        True,
        description="When model_path is None and data_dir/models/tiny-hf is missing, write the tiny demo model there.",
    )
    server_url: str = Field("http://127.0.0.1:30000", description="Base URL of the SGLang/OpenAI-compatible server.")
    model_name: str = Field("BiMediX2-8B-Bi", description="Model name sent to the server.")
    api_key: str | None = Field(None, description="Bearer token for the server, if it asks for one.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection to the server.")
    request_timeout: float = Field(300.0, gt=0, description="Seconds to wait for one completion.")
    max_retries: int = Field(3, ge=0, description="Retries of transient HTTP failures (connect, 5xx, 429, timeout).")
    retry_backoff: float = Field(0.5, ge=0, description="First retry delay in seconds; doubles each try.")
    retry_backoff_max: float = Field(8.0, ge=0, description="Upper bound of one retry delay in seconds.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once against the server.")
    max_connections: int = Field(16, ge=1, description="Pooled HTTP connections kept to the server.")
    structured_output: bool = Field(
        True, description="Ask for JSON matching the sections schema (response_format / constrained decoding)."
    )
    temperature: float = Field(0.1, ge=0, description="Sampling temperature (BiMediX2 reference: 0.1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (BiMediX2 reference: 1.0).")
    max_new_tokens: int = Field(1024, ge=1, description="Generated tokens per request (BiMediX2 reference: 1024).")
    seed: int | None = Field(None, description="Sampling seed for reproducible drafts; None draws one.")
    arabic_mode: Literal["translate", "direct"] = Field(
        "translate",
        description="translate: the bilingual model translates the English draft (same system prompt and image "
        "first, so the server's prefix cache reuses the image); direct: Arabic is drafted from the image alone.",
    )
    english_script: Literal["latin"] | None = Field(
        "latin", description="Letters allowed in English sections (enforced by constrained decoding where possible)."
    )
    arabic_min_ratio: float = Field(
        0.9, ge=0, le=1, description="Share of letters in Arabic sections that must be Arabic script."
    )
    max_section_chars: int = Field(6000, ge=1, description="Longest acceptable section, in characters.")
    prompt_version: str = Field("v1", description="Folder of prompt templates under inference/prompt_templates.")
    device: str = Field("auto", description="torch device for the transformers backend: auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."
    )
    batch_size: int = Field(8, ge=1, description="Requests generated together by the transformers backend.")
    tiny_max_new_tokens: int = Field(
        24, ge=1, description="max_new_tokens used when the tiny demo model answers (keeps the demo quick on CPU)."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; None keeps torch's default.")
    prefix_cache: bool = Field(
        False,
        description="transformers backend: keep the last batch's prompt KV cache so the Arabic request reuses the "
        "English prompt (images and question are not computed again; greedy output unchanged). Holds one batch's "
        "KV memory between calls. SGLang does this itself (radix cache).",
    )

    def sampling(self, *, tiny: bool = False) -> SamplingParams:
        """The sampling parameters these settings ask for (shorter answers for the tiny model)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=min(self.max_new_tokens, self.tiny_max_new_tokens) if tiny else self.max_new_tokens,
            seed=self.seed,
        )

    def resolved_model_path(self, data_dir: Path) -> Path:
        return self.model_path if self.model_path is not None else Path(data_dir) / "models" / "tiny-hf"
