"""The report sections as structured output: their JSON schema, a tolerant parser, and the guard.

Pure functions. The schema is the one shape every backend is asked for (an object of string
fields). When a backend cannot enforce it, :func:`parse_sections` still accepts JSON inside code
fences or around prose, and "Findings:/Impression:" headings (English or Arabic); :func:`check_sections`
then decides whether the draft is usable.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .scripts import arabic_letter_ratio, script_pattern
from .types import ReportSections

SECTION_NAMES: tuple[str, ...] = ("findings", "impression")

_HEADINGS: dict[str, tuple[str, ...]] = {
    "findings": ("findings", "finding", "الموجودات", "النتائج", "نتائج"),
    "impression": ("impression", "conclusion", "الانطباع", "الخلاصة", "الاستنتاج"),
}


def section_property(script: str | None = None) -> dict[str, Any]:
    """The schema of one non-empty section: ``minLength`` 1, or with ``script`` that script's pattern.

    Never both: xgrammar (SGLang's grammar engine) ignores ``minLength`` beside a ``pattern``, so
    the pattern itself says non-empty (see :func:`inference.scripts.script_pattern`).
    """
    if script is None:
        return {"type": "string", "minLength": 1}
    return {"type": "string", "pattern": script_pattern(script)}


def sections_schema(script: str | None = None) -> dict[str, Any]:
    """JSON schema of the sections; with ``script``, each string carries that script's ``pattern``."""
    prop = section_property(script)
    return {
        "title": "ReportSections",
        "type": "object",
        "properties": {name: dict(prop) for name in SECTION_NAMES},
        "required": list(SECTION_NAMES),
        "additionalProperties": False,
    }


def string_fields(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (name, property schema) pairs of an object-of-strings schema; ValueError otherwise."""
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise ValueError("structured output supports JSON schemas of type object with properties")
    fields: list[tuple[str, dict[str, Any]]] = []
    for name, prop in schema["properties"].items():
        if not isinstance(prop, dict) or prop.get("type") != "string":
            raise ValueError(f"structured output supports string properties only; {name!r} is not one")
        fields.append((str(name), prop))
    if not fields:
        raise ValueError("the JSON schema has no properties")
    return fields


def _from_mapping(data: Any) -> ReportSections | None:
    if not isinstance(data, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in data.items()}
    values: dict[str, str] = {}
    for name in SECTION_NAMES:
        for key in (name, *_HEADINGS[name]):
            value = lowered.get(key)
            if isinstance(value, str):
                values[name] = value.strip()
                break
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[name] = " ".join(v.strip() for v in value)
                break
    if len(values) != len(SECTION_NAMES):
        return None
    return ReportSections(**values)


def _json_candidates(text: str) -> list[str]:
    candidates = [text.strip()]
    candidates += [m.group(1) for m in re.finditer(r"```(?:json|JSON)?\s*(.*?)```", text, re.DOTALL)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    return candidates


def _from_headings(text: str) -> ReportSections | None:
    names = "|".join(re.escape(h) for hs in _HEADINGS.values() for h in hs)
    pattern = re.compile(rf"^[\s#*>-]*({names})[\s*]*[:：]\s*", re.IGNORECASE | re.MULTILINE)
    matches = list(pattern.finditer(text))
    found: dict[str, str] = {}
    for i, match in enumerate(matches):
        heading = match.group(1).lower()
        name = next(n for n, hs in _HEADINGS.items() if heading in hs)
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : stop].strip().strip("*").strip()
        if name not in found and body:
            found[name] = body
    if len(found) != len(SECTION_NAMES):
        return None
    return ReportSections(**found)


def parse_sections(text: str) -> ReportSections | None:
    """Sections from a model answer: JSON (bare, fenced or embedded) or headings; None if neither."""
    for candidate in _json_candidates(text):
        try:
            parsed = _from_mapping(json.loads(candidate))
        except json.JSONDecodeError:
            continue
        if parsed is not None:
            return parsed
    return _from_headings(text)


def check_sections(
    sections: ReportSections | None,
    *,
    language: str,
    max_chars: int,
    arabic_min_ratio: float,
) -> str | None:
    """Why this draft must be rejected, or None when it passes.

    Checks: both sections present and non-empty, each at most ``max_chars`` long, and for Arabic a
    share of Arabic-script letters of at least ``arabic_min_ratio``.
    """
    if sections is None:
        return f"{language}: no findings/impression sections could be parsed"
    for name, value in sections.as_dict().items():
        if not value.strip():
            return f"{language}: section {name} is empty"
        if len(value) > max_chars:
            return f"{language}: section {name} has {len(value)} characters (limit {max_chars})"
        if language == "arabic":
            ratio = arabic_letter_ratio(value)
            if ratio < arabic_min_ratio:
                return f"arabic: section {name} has {ratio:.0%} Arabic-script letters (minimum {arabic_min_ratio:.0%})"
    return None
