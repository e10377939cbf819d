"""Writing-system checks: which characters a script allows, and how Arabic a text is.

Used twice: as character classes for constrained decoding (a token is allowed when all its
characters are in the class) and as JSON-schema ``pattern``s, and by the output guard to measure the
share of Arabic letters. Pure functions.
"""

from __future__ import annotations

import re
import unicodedata

# Arabic, Arabic Supplement, Arabic Extended-A, Presentation Forms-A and -B.
_ARABIC_RANGES = "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff"
_LATIN_RANGES = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
# Digits, spacing and the punctuation a report uses; shared by every script. No double quote or
# backslash: in JSON values they would need escaping, and the constrained decoder ends a field at ".
_COMMON = r"0-9 \n.,;:!?()\[\]%/+\-'°×<>=~&#*_"

SCRIPT_CLASSES: dict[str, str] = {
    "arabic": _ARABIC_RANGES + _COMMON,
    "latin": _LATIN_RANGES + "µ" + _COMMON,
}


def script_class(script: str) -> str:
    """The regex character class body (without brackets) for ``script``."""
    try:
        return SCRIPT_CLASSES[script]
    except KeyError as err:
        raise ValueError(f"unknown script {script!r}; known: {sorted(SCRIPT_CLASSES)}") from err


def script_pattern(script: str) -> str:
    """A JSON-schema ``pattern`` (ECMA-262 and Python compatible) allowing only ``script``."""
    return f"^[{script_class(script)}]*$"


_CLASS_PATTERN = re.compile(r"^\^?\[(?P<body>(?:\\.|[^\]\\])+)\][*+]\$?$")


def class_from_pattern(pattern: str) -> str | None:
    """The character class of a single-class pattern like ``^[...]*$``; None for other patterns."""
    match = _CLASS_PATTERN.match(pattern)
    return match.group("body") if match else None


def text_fits_class(text: str, char_class: str) -> bool:
    return re.fullmatch(f"[{char_class}]*", text) is not None


def _is_arabic_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L") and re.match(f"[{_ARABIC_RANGES}]", ch) is not None


def arabic_letter_ratio(text: str) -> float:
    """Share of letters in ``text`` that are Arabic script; 0.0 when there are no letters."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if not letters:
        return 0.0
    return sum(1 for ch in letters if _is_arabic_letter(ch)) / len(letters)
