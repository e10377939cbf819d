"""The in-process backend on the tiny checkpoint: batching, constrained decoding, whole drafts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from inference.backend import make_backend
from inference.config import InferenceSettings
from inference.drafting import draft_report
from inference.images import CLIP_MEAN_RGB, decode_image, pad_to_square, sha256_hex
from inference.prompts import load_prompts
from inference.scripts import arabic_letter_ratio
from inference.sections import parse_sections, sections_schema
from inference.transformers_backend import TransformersBackend
from inference.types import GenerationRequest, Message, SamplingParams, StudyContext

from .conftest import png_bytes

CONTEXT = StudyContext(modality="CT", body_part="HEAD", study_description="CT head without contrast",
                       series_descriptions=["Axial 5mm"], patient_age="070Y", patient_sex="M")


def test_pad_to_square_uses_clip_mean() -> None:
    img = pad_to_square(decode_image(png_bytes(40, 20)))
    assert img.size == (40, 40)
    assert img.getpixel((0, 0)) == CLIP_MEAN_RGB and img.getpixel((39, 39)) == CLIP_MEAN_RGB


def test_batched_structured_and_script_constrained(tiny_backend: TransformersBackend) -> None:
    sampling = SamplingParams(max_new_tokens=16, seed=3)
    requests = [
        GenerationRequest([png_bytes(60 + 10 * i, 40, i)], [Message("user", "Describe the image.", 1)], sampling,
                          json_schema=sections_schema(), allowed_script="arabic" if i % 2 else "latin")
        for i in range(4)
    ]
    results = tiny_backend.generate(requests)
    assert len(results) == 4
    for i, result in enumerate(results):
        data = json.loads(result.text)
        assert list(data) == ["findings", "impression"]
        assert all(isinstance(v, str) and v for v in data.values())
        assert result.prompt_tokens > 576 and 0 < result.completion_tokens <= 16
        if i % 2:
            assert all(arabic_letter_ratio(v) == 1.0 for v in data.values())
        else:
            assert all(arabic_letter_ratio(v) == 0.0 for v in data.values())
        assert result.model_revision.startswith("sha256:")


def test_free_text_with_script_mask(tiny_backend: TransformersBackend) -> None:
    (result,) = tiny_backend.generate([GenerationRequest(
        [png_bytes(32, 32)], [Message("user", "Describe.", 1)], SamplingParams(max_new_tokens=12, seed=1),
        allowed_script="arabic")])
    assert arabic_letter_ratio(result.text) == 1.0


def test_draft_report_end_to_end_is_quick(tiny_hf: Path) -> None:
    settings = InferenceSettings(model_path=tiny_hf, seed=7, device="cpu")
    backend = make_backend(settings, data_dir=tiny_hf.parent)
    images = [png_bytes(80, 50, 1), png_bytes(50, 80, 2)]
    try:
        backend.ready()
        started = time.perf_counter()
        report = draft_report(backend, images, CONTEXT, settings)
        elapsed = time.perf_counter() - started
    finally:
        backend.close()
    assert elapsed < 10, f"tiny draft took {elapsed:.1f} s"
    assert report.english.findings and report.english.impression
    assert arabic_letter_ratio(report.arabic.findings) >= 0.9 and arabic_letter_ratio(report.arabic.impression) >= 0.9
    prov = report.provenance
    prompts = load_prompts("v1")
    assert prov.backend == "transformers" and prov.model_name == "tiny-hf"
    assert prov.model_revision.startswith("sha256:")
    assert prov.prompt_template_id == "bimedix2-report/v1" and prov.prompt_template_sha256 == prompts.sha256
    assert prov.image_sha256 == [sha256_hex(b) for b in images]
    assert prov.sampling["temperature"] == 0.1 and prov.sampling["max_new_tokens"] == settings.tiny_max_new_tokens
    assert prov.prompt_tokens > 2 * 2 * 576 and prov.completion_tokens > 0 and prov.latency_s > 0


def test_direct_arabic_mode(tiny_backend: TransformersBackend) -> None:
    settings = InferenceSettings(seed=2, arabic_mode="direct")
    report = draft_report(tiny_backend, [png_bytes(40, 40)], CONTEXT, settings)
    assert report.provenance.arabic_mode == "direct"
    assert arabic_letter_ratio(report.arabic.findings) >= 0.9


def test_unstructured_gibberish_is_rejected_with_raw_outputs(tiny_backend: TransformersBackend) -> None:
    from ground.errors import PermanentError
    from inference.errors import OutputRejected

    settings = InferenceSettings(seed=2, structured_output=False)
    with pytest.raises(OutputRejected) as info:
        draft_report(tiny_backend, [png_bytes(40, 40)], CONTEXT, settings)
    assert isinstance(info.value, PermanentError)
    assert "could be parsed" in info.value.reason and len(info.value.raw_outputs) == 2


def test_missing_checkpoint_is_unavailable(tmp_path: Path) -> None:
    from inference.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="taqrir model tiny"):
        make_backend(InferenceSettings(auto_tiny=False), data_dir=tmp_path)


def test_parse_of_backend_output(tiny_backend: TransformersBackend) -> None:
    (result,) = tiny_backend.generate([GenerationRequest(
        [png_bytes(30, 30)], [Message("user", "Report.", 1)], SamplingParams(max_new_tokens=8, seed=5),
        json_schema=sections_schema("latin"))])
    assert parse_sections(result.text) is not None


def test_auto_tiny_writes_the_demo_model_once(tmp_path: Path) -> None:
    from inference.backend import ensure_tiny

    target = tmp_path / "models" / "tiny-hf"
    assert ensure_tiny(target) == target
    config = json.loads((target / "config.json").read_text())
    assert config["mm_vision_tower"] == str((target / "clip-vision-tower").resolve())
    stamp = (target / "config.json").stat().st_mtime_ns
    ensure_tiny(target)
    assert (target / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["tiny-hf"]


def test_settings_compose_into_taqrir_settings(tmp_path: Path) -> None:
    from taqrir.settings import load_settings

    settings = load_settings(data_dir=tmp_path, inference={"backend": "sglang", "arabic_mode": "direct"})
    assert settings.inference.arabic_mode == "direct" and settings.inference.temperature == 0.1
    for name, field in InferenceSettings.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize("structured", [False, True])
def test_prefix_cache_reuses_the_english_prompt_and_changes_nothing(tiny_hf: Path, structured: bool) -> None:
    """The Arabic request after the English one (the pipeline's order) reuses the English prompt's
    KV cache, with rows of different suffix lengths in one batch; greedy output is unchanged."""
    from inference.drafting import build_requests
    from inference.types import ReportSections

    prompts = load_prompts("v1")
    settings = InferenceSettings(structured_output=structured)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=not structured)
    studies = [[png_bytes(40 + i, 30, i)] for i in range(3)]
    outputs = {}
    for cached in (False, True):
        backend = TransformersBackend(tiny_hf, device="cpu", prefix_cache=cached)
        english = backend.generate([build_requests(prompts, s, CONTEXT, settings, sampling)[0] for s in studies])
        after_english = backend.reused_prompt_tokens
        arabic_requests = []
        for i, images in enumerate(studies):
            answer = ReportSections("lungs clear" + " x" * i, "normal")  # answers of different lengths
            _, ar = build_requests(prompts, images, CONTEXT, settings, sampling, answer)
            assert ar is not None
            arabic_requests.append(ar)
        arabic = backend.generate(arabic_requests)
        outputs[cached] = [(r.text, r.prompt_tokens, r.completion_tokens) for r in english + arabic]
        if cached:
            english_prompt = min(r.prompt_tokens for r in english)
            # at least the images and the whole question of every study came from the cache
            assert backend.reused_prompt_tokens - after_english >= 3 * (english_prompt - 2)
        else:
            assert backend.reused_prompt_tokens == 0
    assert outputs[True] == outputs[False]
    if not structured:  # ignore_eos: exactly max_new_tokens each
        assert all(count == 8 for _, _, count in outputs[True])


def test_prefix_cache_never_spans_other_images(tiny_hf: Path) -> None:
    """Same question, other images: only the text before the first image may come from the cache."""
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    messages = [Message("system", "You are a radiology assistant. " * 6), Message("user", "Describe the image.", 1)]
    texts = {}
    for cached in (False, True):
        backend = TransformersBackend(tiny_hf, device="cpu", prefix_cache=cached)
        backend.generate([GenerationRequest([png_bytes(30, 30, 1)], messages, sampling)])
        before = backend.reused_prompt_tokens
        (result,) = backend.generate([GenerationRequest([png_bytes(30, 30, 2)], messages, sampling)])
        texts[cached] = result.text
        reused = backend.reused_prompt_tokens - before
        assert reused < result.prompt_tokens - 576  # never the image tokens of another image
    assert texts[True] == texts[False]


def test_draft_with_the_prefix_cache_setting_is_the_same_draft(tiny_hf: Path) -> None:
    images = [png_bytes(80, 50, 1)]
    drafts = {}
    for cached in (False, True):
        settings = InferenceSettings(model_path=tiny_hf, temperature=0.0, device="cpu", prefix_cache=cached)
        backend = make_backend(settings, data_dir=tiny_hf.parent)
        assert isinstance(backend, TransformersBackend) and backend.prefix_cache is cached
        report = draft_report(backend, images, CONTEXT, settings)
        drafts[cached] = (report.english, report.arabic)
        # the Arabic request took the images and the English question from the English request's cache
        assert (backend.reused_prompt_tokens > 576) is cached
        backend.close()
    assert drafts[True] == drafts[False]
