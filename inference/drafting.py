"""The drafting service: key images and study context in, a guarded bilingual draft out.

English first; Arabic then says the same thing: by default the bilingual model translates the
English draft in a request that repeats the English request (same system prompt, images first,
same question) and adds the English answer and a translation turn, so the server's prefix cache
reuses the image encoding and the whole English prompt. ``arabic_mode: direct`` drafts Arabic from
the images alone. Each language is guarded (sections present, lengths sane, Arabic script) and
retried once; a second failure raises :class:`OutputRejected` with every raw answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from .backend import InferenceBackend
from .config import InferenceSettings
from .errors import OutputRejected
from .images import sha256_hex
from .prompts import (
    PromptSet,
    arabic_direct_messages,
    arabic_translate_messages,
    english_messages,
    load_prompts,
)
from .sections import check_sections, parse_sections, sections_schema
from .types import (
    BilingualReport,
    GenerationRequest,
    GenerationResult,
    InferenceProvenance,
    Message,
    ReportSections,
    SamplingParams,
    StudyContext,
)

log = logging.getLogger(__name__)
ATTEMPTS = 2


def _guarded(
    backend: InferenceBackend,
    make_request: Callable[[int], GenerationRequest],
    *,
    language: str,
    settings: InferenceSettings,
    spent: list[GenerationResult],
    raw: list[str],
) -> ReportSections:
    reason = ""
    for attempt in range(ATTEMPTS):
        (result,) = backend.generate([make_request(attempt)])
        spent.append(result)
        raw.append(result.text)
        sections = parse_sections(result.text)
        reason = check_sections(
            sections, language=language, max_chars=settings.max_section_chars,
            arabic_min_ratio=settings.arabic_min_ratio,
        ) or ""
        if not reason and sections is not None:
            return sections
        log.warning("%s draft rejected (attempt %d of %d): %s", language, attempt + 1, ATTEMPTS, reason)
    raise OutputRejected(reason, raw)


def _sampling_for(base: SamplingParams, attempt: int) -> SamplingParams:
    """The retry draws again: a seeded run moves to the next seed."""
    if attempt and base.seed is not None:
        return replace(base, seed=base.seed + attempt)
    return base


def build_requests(
    prompts: PromptSet,
    images: Sequence[bytes],
    context: StudyContext,
    settings: InferenceSettings,
    sampling: SamplingParams,
    english: ReportSections | None = None,
) -> tuple[GenerationRequest, GenerationRequest | None]:
    """The English request and, given the English draft (or in direct mode), the Arabic one."""
    n = len(images)
    en = GenerationRequest(
        images=list(images),
        messages=english_messages(prompts, context, n),
        sampling=sampling,
        json_schema=sections_schema(settings.english_script) if settings.structured_output else None,
        allowed_script=settings.english_script,
    )
    messages: list[Message] | None = None
    if settings.arabic_mode == "direct":
        messages = arabic_direct_messages(prompts, context, n)
    elif english is not None:
        messages = arabic_translate_messages(prompts, context, n, english)
    ar = None
    if messages is not None:
        ar = GenerationRequest(
            images=list(images), messages=messages, sampling=sampling,
            json_schema=sections_schema("arabic") if settings.structured_output else None,
            allowed_script="arabic",
        )
    return en, ar


def draft_report(
    backend: InferenceBackend,
    images: Sequence[bytes],
    context: StudyContext,
    settings: InferenceSettings,
) -> BilingualReport:
    """Draft English and Arabic sections for ``images``; raise OutputRejected/BackendUnavailable."""
    if not images:
        raise ValueError("draft_report needs at least one key image")
    prompts = load_prompts(settings.prompt_version)
    description = backend.describe()
    sampling = settings.sampling(tiny=bool(description.get("tiny")))
    spent: list[GenerationResult] = []
    raw: list[str] = []

    def english_request(attempt: int) -> GenerationRequest:
        en, _ = build_requests(prompts, images, context, settings, _sampling_for(sampling, attempt))
        return en

    english = _guarded(backend, english_request, language="english", settings=settings, spent=spent, raw=raw)

    def arabic_request(attempt: int) -> GenerationRequest:
        _, ar = build_requests(prompts, images, context, settings, _sampling_for(sampling, attempt), english)
        assert ar is not None
        return ar

    arabic = _guarded(backend, arabic_request, language="arabic", settings=settings, spent=spent, raw=raw)
    provenance = InferenceProvenance(
        backend=str(description.get("backend", getattr(backend, "name", "unknown"))),
        model_name=spent[-1].model_id,
        model_revision=spent[-1].model_revision,
        prompt_template_id=prompts.template_id,
        prompt_template_sha256=prompts.sha256,
        sampling=sampling.as_dict(),
        image_sha256=[sha256_hex(b) for b in images],
        prompt_tokens=sum(r.prompt_tokens for r in spent),
        completion_tokens=sum(r.completion_tokens for r in spent),
        latency_s=round(sum(r.latency_s for r in spent), 4),
        arabic_model_name=spent[-1].model_id,
        arabic_mode=settings.arabic_mode,
        attempts=len(spent),
    )
    log.info(
        "draft made: images=%d attempts=%d prompt_tokens=%d completion_tokens=%d",
        len(images), len(spent), provenance.prompt_tokens, provenance.completion_tokens,
    )
    return BilingualReport(english=english, arabic=arabic, provenance=provenance)
