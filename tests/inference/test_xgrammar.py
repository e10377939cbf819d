"""The schemas the SGLang backend sends, compiled and matched by xgrammar (SGLang's grammar engine).

xgrammar runs on a CPU. Every schema ``request_body`` can send is compiled as SGLang compiles a
``response_format: json_schema`` (``compile_json_schema``, with and without free whitespace) and
matched character by character with a ``GrammarMatcher``: what it accepts is what the model can
emit under SGLang, so these tests pin the constraint's real meaning, not the schema's intent.
"""

from __future__ import annotations

import json
import re
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from inference.config import InferenceSettings
from inference.drafting import build_requests
from inference.prompts import load_prompts
from inference.scripts import class_from_pattern, script_class, script_pattern
from inference.sections import sections_schema
from inference.sglang import request_body
from inference.types import GenerationRequest, ReportSections, SamplingParams, StudyContext
from tests.inference.conftest import png_bytes

xgr = pytest.importorskip("xgrammar")

CONTEXT = StudyContext(modality="CR", body_part="CHEST", study_description="Chest PA")
ENGLISH = ReportSections("The lungs are clear.", "No acute abnormality.")


def sent_schemas() -> dict[str, dict[str, Any]]:
    """Every distinct schema the backend sends, from the pipeline's own requests and raw requests."""
    prompts = load_prompts("v1")
    found: dict[str, dict[str, Any]] = {}
    for english_script, arabic_mode in product(("latin", None), ("translate", "direct")):
        settings = InferenceSettings(english_script=english_script, arabic_mode=arabic_mode)
        en, ar = build_requests(prompts, [png_bytes(8, 8)], CONTEXT, settings, SamplingParams(), ENGLISH)
        for request in (en, ar):
            assert request is not None
            schema = request_body(request, "m")["response_format"]["json_schema"]["schema"]
            found[f"{request.allowed_script}/{english_script}/{arabic_mode}"] = schema
    for script, allowed in product((None, "latin", "arabic"), (None, "latin", "arabic")):
        request = GenerationRequest([], [], SamplingParams(), json_schema=sections_schema(script), allowed_script=allowed)
        found[f"raw:{script}:{allowed}"] = request_body(request, "m")["response_format"]["json_schema"]["schema"]
    unique: dict[str, dict[str, Any]] = {}
    for name, schema in found.items():
        unique.setdefault(json.dumps(schema, sort_keys=True), schema | {"$comment": name})
    return {s["$comment"]: {k: v for k, v in s.items() if k != "$comment"} for s in unique.values()}


SCHEMAS = sent_schemas()
_COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)


def accepts(schema: dict[str, Any], text: str, *, any_whitespace: bool = True) -> bool:
    compiled = _COMPILER.compile_json_schema(json.dumps(schema), any_whitespace=any_whitespace)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return bool(matcher.accept_string(text)) and bool(matcher.is_terminated())


def script_of(schema: dict[str, Any]) -> str | None:
    pattern = schema["properties"]["findings"].get("pattern")
    if pattern is None:
        return None
    return next(s for s in ("latin", "arabic") if pattern == script_pattern(s))


def answer(findings: str, impression: str) -> str:
    return json.dumps({"findings": findings, "impression": impression}, ensure_ascii=False)


GOOD = {
    "latin": answer("The lungs are clear. Heart size is normal (CTR 0.45).", "No acute abnormality."),
    "arabic": answer("الرئتان صافيتان. حجم القلب طبيعي.", "لا يوجد شذوذ حاد."),
}


def test_the_backend_sends_the_expected_schemas() -> None:
    scripts = {script_of(s) for s in SCHEMAS.values()}
    assert scripts == {None, "latin", "arabic"}
    for schema in SCHEMAS.values():
        for prop in schema["properties"].values():
            # never both: xgrammar would ignore minLength and warn
            assert ("pattern" in prop) != ("minLength" in prop)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("any_whitespace", [True, False])
def test_every_sent_schema_compiles_and_takes_a_well_formed_answer(name: str, any_whitespace: bool) -> None:
    schema = SCHEMAS[name]
    script = script_of(schema)
    good = GOOD[script or "latin"]
    assert accepts(schema, good, any_whitespace=any_whitespace)
    assert not accepts(schema, answer("", "x"), any_whitespace=any_whitespace)  # empty section
    assert not accepts(schema, good[:-1], any_whitespace=any_whitespace)  # unterminated
    if script is not None:
        other = GOOD["arabic" if script == "latin" else "latin"]
        assert not accepts(schema, other, any_whitespace=any_whitespace)  # wrong script


@pytest.mark.parametrize("script", ["latin", "arabic"])
def test_escapes_newlines_and_punctuation(script: str) -> None:
    schema = sections_schema(script)
    word, unit = ("lung", "mm") if script == "latin" else ("رئة", "مم")
    ok = {
        "escaped newline": json.dumps(f"{word}\n{word}", ensure_ascii=False),
        "escaped quote": json.dumps(f'"{word}" {word}', ensure_ascii=False),
        "escaped backslash and slash": f'"{word} \\\\ {word} \\/ {word}"',
        "escaped tab": json.dumps(f"{word}\t{word}", ensure_ascii=False),
        "en and em dash": json.dumps(f"{word} 2–3 {unit} — {word}", ensure_ascii=False),
        "brackets, percent, slash, signs": json.dumps(f"{word} (10%) 3/4 [2] ±1 ≤2 ≥3 5×4 37° {word}.", ensure_ascii=False),
        "\\u escape of the script's own letter": '"' + ("lung \\u00e9" if script == "latin" else "رئة \\u0627") + '"',
        "\\u escape of an en dash": f'"{word} \\u2013 {word}"',
        "ensure_ascii style (escape first)": json.dumps(f"{'é' if script == 'latin' else 'ا'}{word}"),
    }
    bad = {
        "raw newline": f'"{word}\n{word}"',
        "raw tab": f'"{word}\t{word}"',
        "raw quote": f'"{word} " {word}"',
        "lone backslash": f'"{word} \\ {word}"',
        "unknown escape": f'"{word} \\x41"',
        "form feed escape": f'"{word} \\f"',
        "only a space": '" "',
        "starts with a space": f'" {word}"',
        "starts with an escaped newline": f'"\\n{word}"',
        "\\u escape of another script": '"' + word + (" \\u0627" if script == "latin" else " \\u0041") + '"',
        "\\u escape of a control character": f'"{word} \\u0000"',
    }
    for label, value in ok.items():
        assert accepts(schema, f'{{"findings": {value}, "impression": {value}}}'), label
    for label, value in bad.items():
        assert not accepts(schema, f'{{"findings": {value}, "impression": {ok["escaped tab"]}}}'), label


def test_arabic_punctuation_and_digits() -> None:
    schema = sections_schema("arabic")
    assert accepts(schema, answer("كثافة، بحجم ٢٣ مم؛ هل هي جديدة؟ ٪٥ ۴", "طبيعي (بدون تغيير) ٣/٤."))
    assert accepts(schema, answer("كثافة بحجم 23 مم", "طبيعي"))  # Latin digits are shared
    assert not accepts(schema, answer("كثافة 23 mm", "طبيعي"))  # Latin letters are not
    latin = sections_schema("latin")
    assert not accepts(latin, answer("mass of ٢٣ mm", "normal"))  # Arabic-Indic digits are Arabic


@pytest.mark.parametrize("schema_name", sorted(SCHEMAS))
def test_malformed_json_is_refused(schema_name: str) -> None:
    schema = SCHEMAS[schema_name]
    script = script_of(schema) or "latin"
    value = "lung" if script == "latin" else "رئة"
    for text in (
        f'{{"findings": "{value}"}}',  # a required key missing
        f'{{"findings": "{value}", "impression": "{value}", "extra": "{value}"}}',  # additionalProperties
        f'{{"findings": "{value}", "impression": "{value}",}}',  # trailing comma
        f'{{findings: "{value}", "impression": "{value}"}}',  # unquoted key
        f'{{"findings": {value}, "impression": "{value}"}}',  # unquoted value
        f'["{value}", "{value}"]',  # not an object
        f'{{"findings": "{value}", "impression": 1}}',  # not a string
    ):
        assert not accepts(schema, text), text


def test_without_a_script_min_length_is_enforced() -> None:
    schema = sections_schema(None)
    assert accepts(schema, answer("any text at all: ok", "x"))
    assert not accepts(schema, answer("", "x"))


def test_python_and_transformers_read_the_same_pattern() -> None:
    """The pattern also holds under Python's re on the raw JSON body, and maps back to the class
    the transformers backend masks tokens with."""
    for script in ("latin", "arabic"):
        pattern = re.compile(script_pattern(script))
        body = json.dumps(json.loads(GOOD[script])["findings"], ensure_ascii=False)[1:-1]
        assert pattern.fullmatch(body)
        assert pattern.fullmatch(body + "\\n" + body)
        assert not pattern.fullmatch(body + "\n" + body)
        assert class_from_pattern(script_pattern(script)) == script_class(script)


def test_compiles_against_a_real_tokenizer(tiny_hf: Path) -> None:
    """As SGLang does: the tokenizer's vocabulary, a token bitmask after the opening of a value."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf), local_files_only=True)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(sections_schema("arabic")))
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string('{"findings": "')
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    words = [int(w) for w in bitmask[0].tolist()]
    allowed = [bool((words[i // 32] >> (i % 32)) & 1) for i in range(info.vocab_size)]  # bit i: token i allowed
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    arabic = [i for i, t in enumerate(texts) if t and re.fullmatch(f"[{script_class('arabic')}]+", t) and t[0] != " "]
    latin = [i for i, t in enumerate(texts) if re.fullmatch("[A-Za-z]+", t)]
    newline = [i for i, t in enumerate(texts) if "\n" in t]
    assert arabic and latin
    assert all(allowed[i] for i in arabic)
    assert not any(allowed[i] for i in latin + newline)
