"""The bodies the SGLang backend sends, validated by the protocol's own typed models.

Always against OpenAI's chat-completions params (the ``openai`` package's ``TypedDict``s, checked
with pydantic, which both SGLang and OpenAI use); and against SGLang's own ``ChatCompletionRequest``
(``sglang/srt/entrypoints/openai/protocol.py``, the pinned release that tests/run.sh installs
without its GPU dependencies). Pydantic ignores unknown fields silently, so the field names are checked explicitly: a
misspelt field would otherwise be dropped without a word.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from inference.config import InferenceSettings
from inference.drafting import build_requests
from inference.prompts import load_prompts
from inference.sglang import request_body
from inference.types import GenerationRequest, Message, ReportSections, SamplingParams, StudyContext

from .conftest import png_bytes

pydantic = pytest.importorskip("pydantic")
params = pytest.importorskip("openai.types.chat.completion_create_params")

# SGLang's additions to OpenAI's body that Taqrir may send (benchmarks only).
SGLANG_EXTENSIONS = {"ignore_eos"}


def bodies() -> list[dict[str, Any]]:
    """Every shape of body the backend sends: the pipeline's requests in each mode, and the rest."""
    prompts = load_prompts("v1")
    context = StudyContext(modality="CT", body_part="CHEST")
    images = [png_bytes(16, 12, 1), png_bytes(12, 16, 2)]
    out: list[dict[str, Any]] = []
    for structured, mode, seed, ignore_eos in product((True, False), ("translate", "direct"), (None, 7), (False, True)):
        settings = InferenceSettings(structured_output=structured, arabic_mode=mode)
        sampling = SamplingParams(seed=seed, ignore_eos=ignore_eos)
        en, ar = build_requests(prompts, images, context, settings, sampling, ReportSections("Clear.", "Normal."))
        out += [request_body(r, "BiMediX2-8B-Bi") for r in (en, ar) if r is not None]
    text_only = GenerationRequest([], [Message("user", "Say hello.")], SamplingParams())
    out.append(request_body(text_only, "BiMediX2-8B-Bi"))
    return out


BODIES = bodies()


def _keys(typed: Any) -> set[str]:
    return set(typed.__required_keys__) | set(typed.__optional_keys__)


@pytest.mark.parametrize("index", range(len(BODIES)))
def test_body_is_an_openai_chat_completion_request(index: int) -> None:
    body = BODIES[index]
    assert set(body) - SGLANG_EXTENSIONS <= _keys(params.CompletionCreateParamsNonStreaming)
    openai_body = {k: v for k, v in body.items() if k not in SGLANG_EXTENSIONS}
    validated = pydantic.TypeAdapter(params.CompletionCreateParamsNonStreaming).validate_python(openai_body)
    messages = list(validated["messages"])  # Iterable fields validate as they are read
    assert len(messages) == len(body["messages"]) and {m["role"] for m in messages} <= {"system", "user", "assistant"}
    from openai.types.chat import (
        ChatCompletionContentPartImageParam,
        ChatCompletionContentPartTextParam,
    )

    for message in body["messages"]:
        assert set(message) <= {"role", "content"}
        if isinstance(message["content"], list):
            for part in message["content"]:
                kind = ChatCompletionContentPartImageParam if part["type"] == "image_url" else ChatCompletionContentPartTextParam
                assert set(part) <= _keys(kind)
                pydantic.TypeAdapter(kind).validate_python(part)
    if "response_format" in body:
        from openai.types.shared_params.response_format_json_schema import (
            JSONSchema,
            ResponseFormatJSONSchema,
        )

        assert set(body["response_format"]) <= _keys(ResponseFormatJSONSchema)
        assert set(body["response_format"]["json_schema"]) <= _keys(JSONSchema)
        pydantic.TypeAdapter(ResponseFormatJSONSchema).validate_python(body["response_format"])


# SGLang's own request model, in a process of its own: its package's dependencies are CUDA kernels,
# so tests/run.sh installs the wheel alone, with the few modules protocol.py imports, into
# .venv/sglang-protocol (appended to sys.path, so nothing there shadows the venv's packages);
# importing sglang also patches transformers, which must not leak into this pytest process.
SGLANG_PROTOCOL = Path(__file__).resolve().parents[2] / ".venv" / "sglang-protocol"
SGLANG_CHECK = """
import json, sys
sys.path.append(sys.argv[1])
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest as model
import sglang
checked = 0
for body in json.load(sys.stdin):
    unknown = set(body) - set(model.model_fields)
    assert not unknown, f"fields SGLang does not know: {unknown}"
    request = model.model_validate(dict(body))
    assert request.max_tokens == body["max_tokens"] and request.stop == body["stop"]
    assert request.ignore_eos == body.get("ignore_eos", False)
    if "response_format" in body:
        assert request.response_format.type == "json_schema"
        assert request.response_format.json_schema.schema_ == body["response_format"]["json_schema"]["schema"]
    checked += 1
print(sglang.__version__, checked)
"""


def test_body_is_an_sglang_chat_completion_request() -> None:
    if not (SGLANG_PROTOCOL / "sglang").is_dir():
        pytest.skip(f"SGLang's protocol models are not installed in {SGLANG_PROTOCOL} (tests/run.sh installs them)")
    run = subprocess.run([sys.executable, "-c", SGLANG_CHECK, str(SGLANG_PROTOCOL)], input=json.dumps(BODIES),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    version, checked = run.stdout.split()[-2:]
    assert int(checked) == len(BODIES), run.stdout
    assert version.startswith("0."), version
