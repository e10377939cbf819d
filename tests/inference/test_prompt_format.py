"""The exact BiMediX2 prompt: rendered string and token ids, as the model was trained."""

from __future__ import annotations

from inference.prompt_format import (
    BIMEDIX2_SYSTEM_PROMPT,
    openai_messages,
    parse_openai_messages,
    render_chat,
)
from inference.prompts import english_messages, load_prompts
from inference.transformers_backend import TransformersBackend
from inference.types import GenerationRequest, Message, StudyContext

from .conftest import png_bytes

CONTEXT = StudyContext(modality="CR", body_part="CHEST", study_description="Chest PA", patient_age="045Y",
                       patient_sex="F", image_labels=["PA view"])


def test_system_prompt_file_is_bimedix2s() -> None:
    assert load_prompts("v1").system == BIMEDIX2_SYSTEM_PROMPT


def test_rendered_string_matches_bimedix2_format_and_chat_template(tiny_backend: TransformersBackend) -> None:
    messages = [Message("system", BIMEDIX2_SYSTEM_PROMPT), Message("user", "What is shown?", 1)]
    rendered = render_chat(messages)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + BIMEDIX2_SYSTEM_PROMPT
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    chat = openai_messages(messages, ["data:image/png;base64,AAAA"])
    templated = tiny_backend.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert templated == rendered
    parsed, urls = parse_openai_messages(chat)
    assert parsed == messages and urls == ["data:image/png;base64,AAAA"]


def test_prompt_token_ids(tiny_backend: TransformersBackend) -> None:
    tok = tiny_backend.tokenizer
    prompts = load_prompts("v1")
    messages = english_messages(prompts, CONTEXT, 1)
    ids = tiny_backend.count_prompt_tokens(GenerationRequest([png_bytes(64, 40)], messages))

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    def special(token: str) -> int:
        return int(tok.convert_tokens_to_ids(token))

    expected = (
        [special("<|begin_of_text|>"), special("<|start_header_id|>")] + enc("system")
        + [special("<|end_header_id|>")] + enc("\n\n" + BIMEDIX2_SYSTEM_PROMPT) + [special("<|eot_id|>")]
        + [special("<|start_header_id|>")] + enc("user") + [special("<|end_header_id|>")] + enc("\n\n")
        + [tiny_backend.image_token_id] * 576
        + enc("\n" + messages[1].text) + [special("<|eot_id|>")]
        + [special("<|start_header_id|>")] + enc("assistant") + [special("<|end_header_id|>")] + enc("\n\n")
    )
    assert ids == expected
    assert ids.count(tiny_backend.image_token_id) == 576
    assert "Chest PA" in messages[1].text and "45 years" in messages[1].text and "female" in messages[1].text
