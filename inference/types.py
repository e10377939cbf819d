"""The data that crosses the inference room's boundary: requests, results, reports, provenance.

Plain dataclasses, no behaviour beyond validation: backends, prompts and the drafting service all
speak these shapes, and the pipeline stores :class:`BilingualReport` as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters. Defaults are BiMediX2's reference generation settings."""

    temperature: float = 0.1
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ("<|eot_id|>",)
    seed: int | None = None
    ignore_eos: bool = False
    """Benchmarks only: generate exactly ``max_new_tokens`` (SGLang's ``ignore_eos``)."""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        if not self.ignore_eos:  # provenance of real drafts keeps its shape
            del data["ignore_eos"]
        return data


@dataclass(frozen=True)
class Message:
    """One chat turn. ``images`` counts the image placeholders that open a user turn."""

    role: Role
    text: str
    images: int = 0


@dataclass
class GenerationRequest:
    """What a backend is asked: encoded key images, chat messages, sampling, optional constraints.

    ``images`` are encoded PNG/JPEG bytes, in the order the user message's placeholders consume
    them. ``json_schema`` (an object of string fields) asks for structured output;
    ``allowed_script`` ("arabic" or "latin") restricts the letters the answer may use.
    """

    images: list[bytes]
    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict[str, Any] | None = None
    allowed_script: str | None = None

    def __post_init__(self) -> None:
        placeholders = sum(m.images for m in self.messages)
        if placeholders != len(self.images):
            raise ValueError(
                f"messages hold {placeholders} image placeholders but {len(self.images)} images were given"
            )


@dataclass(frozen=True)
class GenerationResult:
    """What a backend answered for one request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model_id: str
    model_revision: str
    finish_reason: str = "stop"


@dataclass(frozen=True)
class StudyContext:
    """Header facts that frame the prompt. Never names or identifiers (they would be PHI)."""

    modality: str
    body_part: str | None = None
    study_description: str | None = None
    series_descriptions: list[str] = field(default_factory=list)
    patient_age: str | None = None
    patient_sex: str | None = None
    image_labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportSections:
    """The sections of one language's draft."""

    findings: str
    impression: str

    def as_dict(self) -> dict[str, str]:
        return {"findings": self.findings, "impression": self.impression}


@dataclass(frozen=True)
class InferenceProvenance:
    """Exactly how a draft was made: enough to reproduce and audit it."""

    backend: str
    model_name: str
    model_revision: str
    prompt_template_id: str
    prompt_template_sha256: str
    sampling: dict[str, Any]
    image_sha256: list[str]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    arabic_model_name: str = ""
    arabic_mode: str = "translate"
    attempts: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BilingualReport:
    """One draft in English and Arabic, with its provenance."""

    english: ReportSections
    arabic: ReportSections
    provenance: InferenceProvenance

    def as_dict(self) -> dict[str, Any]:
        return {
            "english": self.english.as_dict(),
            "arabic": self.arabic.as_dict(),
            "provenance": self.provenance.as_dict(),
        }
