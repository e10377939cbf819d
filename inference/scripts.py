"""Writing-system checks: which characters a script allows, and how Arabic a text is.

Used three ways: as character classes for the transformers backend's token masks (a token is
allowed when all its characters are in the class), as JSON-schema ``pattern``s sent to SGLang, and
by the output guard to measure the share of Arabic letters. Pure functions.

The ``pattern`` is written for the semantics of xgrammar, the grammar engine SGLang compiles
``response_format: json_schema`` with: the pattern is matched against the *raw JSON text* between
the quotes, not the decoded value, and ``minLength`` is ignored when a pattern is present. So the
pattern itself says "non-empty" (its first element is a visible character), never admits a raw
control character (a raw newline inside a JSON string is invalid JSON), and admits the JSON
escapes explicitly: ``\\" \\\\ \\/ \\n \\r \\t`` and ``\\uXXXX`` for the script's own code points only
(so an escape cannot smuggle another script past the mask). A standard JSON-schema validator, which
applies ``pattern`` to the decoded value, would refuse a decoded newline or quote; nothing in Taqrir
validates that way (the transformers backend reads the class, the guard checks the parsed text).
"""

from __future__ import annotations

import re
import unicodedata

# Arabic, Arabic Supplement, Arabic Extended-A, Presentation Forms-A and -B. The Arabic block holds
# the Arabic comma, semicolon and question mark (U+060C, U+061B, U+061F), the Arabic percent sign and
# decimal separator, and the Arabic-Indic and extended Arabic-Indic digits (U+0660-0669, U+06F0-06F9).
_ARABIC_RANGES: tuple[tuple[int, int], ...] = (
    (0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF),
)
_LATIN_RANGES: tuple[tuple[int, int], ...] = (
    (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x024F),
)
# Digits, the space and the punctuation a report uses; shared by every script. No double quote,
# backslash or control character: in JSON text they exist only as escapes (see script_pattern).
_COMMON = (
    "0123456789 .,;:!?()[]%/+-'°×<>=~&#*_"
    "\u2013\u2014"  # en and em dash (ranges "2–3 mm", asides)
    "\u00b1\u2264\u2265\u00b2\u00b3\u00b7\u2026"  # ± ≤ ≥ ² ³ · …
    "\u2018\u2019\u201c\u201d"  # typographic quotes (not JSON-special)
)
_SCRIPTS: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {
    "arabic": (_ARABIC_RANGES, _COMMON),
    "latin": (_LATIN_RANGES, _COMMON + "\u00b5"),  # µ (micro sign) for units
}
# Short JSON escapes a report can need (PS: RFC 8259 section 7); \b and \f have no place in a report.
_SHORT_ESCAPES = r'\\["\\/nrt]'
_HEX = "0123456789abcdef"


def _class_char(ch: str) -> str:
    """One character as it may stand inside a regex class (Python re, ECMA-262 and xgrammar)."""
    return "\\" + ch if ch in "\\]-[^" else ch


def _code_points(script: str) -> list[tuple[int, int]]:
    """The script's allowed code points as sorted, merged, inclusive ranges."""
    try:
        ranges, extra = _SCRIPTS[script]
    except KeyError as err:
        raise ValueError(f"unknown script {script!r}; known: {sorted(_SCRIPTS)}") from err
    points = sorted([*ranges, *((ord(c), ord(c)) for c in extra)])
    merged: list[tuple[int, int]] = []
    for lo, hi in points:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _class_body(ranges: list[tuple[int, int]]) -> str:
    parts = []
    for lo, hi in ranges:
        if lo == hi:
            parts.append(_class_char(chr(lo)))
        elif hi == lo + 1:
            parts.append(_class_char(chr(lo)) + _class_char(chr(hi)))
        else:
            parts.append(f"{_class_char(chr(lo))}-{_class_char(chr(hi))}")
    return "".join(parts)


def _hex_digits(lo: int, hi: int) -> str:
    """A regex class of the hex digits lo..hi, either case."""
    chars = "".join(_HEX[v] + (_HEX[v].upper() if v > 9 else "") for v in range(lo, hi + 1))
    return chars if len(chars) == 1 else f"[{chars}]"


def _hex_range(lo: int, hi: int, width: int) -> list[str]:
    """Regex alternatives matching exactly the ``width``-digit hex numbers lo..hi."""
    if width == 1:
        return [_hex_digits(lo, hi)]
    unit = 16 ** (width - 1)
    lo_head, lo_tail = divmod(lo, unit)
    hi_head, hi_tail = divmod(hi, unit)
    if lo_head == hi_head:
        return [_hex_digits(lo_head, lo_head) + _group(_hex_range(lo_tail, hi_tail, width - 1))]
    out: list[str] = []
    first, last = lo_head, hi_head
    if lo_tail:
        out.append(_hex_digits(lo_head, lo_head) + _group(_hex_range(lo_tail, unit - 1, width - 1)))
        first += 1
    if hi_tail != unit - 1:
        out.append(_hex_digits(hi_head, hi_head) + _group(_hex_range(0, hi_tail, width - 1)))
        last -= 1
    if first <= last:
        out.append(_hex_digits(first, last) + "[0-9a-fA-F]" * (width - 1))
    return out


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def script_class(script: str) -> str:
    """The regex character class body (without brackets) of the literal characters ``script`` allows."""
    return _class_body(_code_points(script))


def script_pattern(script: str) -> str:
    """The JSON-schema ``pattern`` of a non-empty JSON string body written in ``script``.

    Under xgrammar's semantics (see the module docstring): first a visible character of the script
    (literal, ``\\uXXXX`` or an escaped quote), then characters of the script, the space and the
    JSON escapes; ``\\uXXXX`` only for code points the script allows outside ASCII.
    """
    ranges = _code_points(script)
    visible = _class_body(_without_space(ranges))
    wide = [(max(lo, 0x80), hi) for lo, hi in ranges if hi >= 0x80]
    unicode_escape = r"\\u" + _group([alt for lo, hi in wide for alt in _hex_range(lo, hi, 4)])
    element = f"[{_class_body(ranges)}]|{_SHORT_ESCAPES}|{unicode_escape}"
    return f'^(?:[{visible}]|\\\\"|{unicode_escape})(?:{element})*$'


def _without_space(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if lo <= 0x20 <= hi:
            out += [r for r in ((lo, 0x1F), (0x21, hi)) if r[0] <= r[1]]
        else:
            out.append((lo, hi))
    return out


_CLASS_PATTERN = re.compile(r"^\^?\[(?P<body>(?:\\.|[^\]\\])+)\][*+]\$?$")


def class_from_pattern(pattern: str) -> str | None:
    """The character class a pattern restricts values to: a script's :func:`script_pattern`, or a
    single-class pattern like ``^[...]*$``; None for other patterns."""
    for script in _SCRIPTS:
        if pattern == script_pattern(script):
            return script_class(script)
    match = _CLASS_PATTERN.match(pattern)
    return match.group("body") if match else None


def text_fits_class(text: str, char_class: str) -> bool:
    return re.fullmatch(f"[{char_class}]*", text) is not None


_ARABIC_CLASS = re.compile("[" + _class_body(list(_ARABIC_RANGES)) + "]")


def _is_arabic_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L") and _ARABIC_CLASS.match(ch) is not None


def arabic_letter_ratio(text: str) -> float:
    """Share of letters in ``text`` that are Arabic script; 0.0 when there are no letters."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if not letters:
        return 0.0
    return sum(1 for ch in letters if _is_arabic_letter(ch)) / len(letters)
