"""The tolerant parser and the output guard, on real answers' shapes."""

from __future__ import annotations

import json

from inference.scripts import arabic_letter_ratio, class_from_pattern, script_class, script_pattern
from inference.sections import check_sections, parse_sections, sections_schema
from inference.types import ReportSections

GOOD = ReportSections("The lungs are clear.", "No acute abnormality.")


def test_parses_json_fenced_embedded_and_headings() -> None:
    data = json.dumps(GOOD.as_dict())
    assert parse_sections(data) == GOOD
    assert parse_sections(f"Here you go:\n```json\n{data}\n```") == GOOD
    assert parse_sections(f"Sure. {data} Hope this helps.") == GOOD
    assert parse_sections("**Findings:** The lungs are clear.\n\n**Impression:** No acute abnormality.") == GOOD
    assert parse_sections("الموجودات: الرئتان صافيتان.\nالانطباع: لا شذوذ.") == ReportSections(
        "الرئتان صافيتان.", "لا شذوذ."
    )
    assert parse_sections("I cannot help with that.") is None
    assert parse_sections('{"findings": "only one"}') is None


def test_guard_checks_presence_length_and_script() -> None:
    kw = {"max_chars": 100, "arabic_min_ratio": 0.9}
    assert check_sections(GOOD, language="english", **kw) is None
    assert "no findings" in (check_sections(None, language="english", **kw) or "")
    assert "empty" in (check_sections(ReportSections(" ", "x"), language="english", **kw) or "")
    assert "characters" in (check_sections(ReportSections("x" * 101, "x"), language="english", **kw) or "")
    assert "Arabic-script" in (check_sections(GOOD, language="arabic", **kw) or "")
    assert check_sections(ReportSections("الرئتان صافيتان ١٢ mm", "لا شذوذ."), language="arabic",
                          max_chars=100, arabic_min_ratio=0.6) is None
    assert arabic_letter_ratio("abc") == 0.0 and arabic_letter_ratio("") == 0.0


def test_schema_pattern_roundtrips_to_a_character_class() -> None:
    schema = sections_schema("arabic")
    pattern = schema["properties"]["findings"]["pattern"]
    assert pattern == script_pattern("arabic")
    assert class_from_pattern(pattern) == script_class("arabic")
    assert schema["required"] == ["findings", "impression"]
