"""Does the Arabic say what the English says? A bilingual consistency check of a draft (pure).

Four checks compare the English and Arabic text of each section (findings, impression):

* **number**: measurements with their units (``1.2 cm`` = ``12 ملم`` = ``١٫٢ سم``), dimension
  chains and ranges (``3 x 4 cm``, ``٣ × ٤ سم``, ``2-3 mm``) and bare numerals. Arabic-Indic
  (U+0660-0669) and Eastern Arabic-Indic (U+06F0-06F9) digits, the Arabic decimal separator
  (U+066B), the Arabic percent sign (U+066A) and a decimal comma are read as numbers; lengths are
  compared in millimetres. A numeral written in one language may be a number word in the other
  (``3`` and ``ثلاث``), which is not a mismatch.
* **laterality**: left, right and bilateral, with the Arabic forms and their clitics
  (``الأيسر``, ``بالأيمن``, ``اليسرى``, ``واليمنى``, ``الجانبين``). Each side mention is tied to
  the nearest lexicon term in its sentence, so a swap between two findings (left lobe, right
  effusion vs. right lobe, left effusion) is caught although both texts name both sides.
* **negation**: each finding of the lexicon is affirmed or negated (``no``, ``without``,
  ``not`` / ``لا``, ``لم``, ``بدون``, ``عدم``, ``لا يوجد``, ``غير``), NegEx-style: a cue scopes
  over its sentence up to a termination word (``but`` / ``لكن``).
* **term**: a key anatomy or finding term of the committed lexicon
  (``reporting/consistency_lexicon.json``) named in one language and not in the other.

The result is a :class:`ConsistencyResult`: consistent, or the typed mismatches. The measured
precision and recall on the hand-built pairs in ``tests/reporting/data/consistency_pairs.jsonl``
are asserted by ``tests/reporting/test_consistency.py`` and given in the README.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

from reporting.draft import Language, Sections

CHECKER_VERSION: Final = "1"
"""Bumped whenever a rule or the lexicon changes what the check finds (stored with each result)."""

MismatchKind = Literal["number", "laterality", "negation", "term"]
Side = Literal["left", "right", "bilateral"]
SectionName = Literal["findings", "impression"]


class Mismatch(BaseModel):
    """One disagreement between the English and the Arabic of a section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: MismatchKind
    section: SectionName
    concept: str = ""
    english: str = ""
    arabic: str = ""
    detail: str = ""


class ConsistencyResult(BaseModel):
    """The check of one draft: consistent, or its mismatches (stored with the draft, exported)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checker_version: str = CHECKER_VERSION
    lexicon_version: str = ""
    consistent: bool
    mismatches: tuple[Mismatch, ...] = ()
    checked_sections: tuple[SectionName, ...] = ()

    @property
    def kinds(self) -> list[MismatchKind]:
        """The distinct mismatch kinds, in a fixed order."""
        found = {m.kind for m in self.mismatches}
        return [k for k in ("number", "laterality", "negation", "term") if k in found]

    def summary(self) -> str:
        """One short line for listings: ``consistent`` or ``2 mismatches: laterality, number``."""
        if self.consistent:
            return "consistent"
        n = len(self.mismatches)
        return f"{n} mismatch{'es' if n != 1 else ''}: {', '.join(self.kinds)}"


# -- normalisation ---------------------------------------------------------------------------

_DIGITS = {**{0x0660 + i: str(i) for i in range(10)}, **{0x06F0 + i: str(i) for i in range(10)}}
_ARABIC_FOLD = str.maketrans({
    "أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ة": "ه", "ؤ": "و", "ئ": "ي",
    "\u066b": ".",  # Arabic decimal separator
    "\u066a": "%",  # Arabic percent sign
    "\u066c": ",",  # Arabic thousands separator (a comma before three digits is dropped below)
    "\u060c": ",",  # Arabic comma: a list separator, as ','
    "\u061b": ";",  # Arabic semicolon
    "\u061f": "?",  # Arabic question mark
    "\u00d7": " x ", "\u2013": "-", "\u2014": "-", "\u2212": "-",
})
_TASHKEEL = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")  # marks and tatweel


def normalize(text: str) -> str:
    """NFKC, Eastern digits to ASCII, Arabic letters folded (alef, hamza carriers, ta marbuta,
    alef maqsura), diacritics and tatweel removed, Arabic punctuation to ASCII, lower case."""
    text = unicodedata.normalize("NFKC", text).translate(_DIGITS)
    text = _TASHKEEL.sub("", text).translate(_ARABIC_FOLD)
    # thousands separators: a comma followed by exactly three digits inside a number
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    # a decimal comma (3,5 سم): any other comma between digits
    text = re.sub(r"(?<=\d),(?=\d)", ".", text)
    return text.lower()


# -- numbers and units -------------------------------------------------------------------------

#: unit spelling -> (dimension, factor to the dimension's base unit); Arabic keys are normalised
#: with :func:`normalize` where the table is built
_UNITS_WRITTEN: Final[dict[str, tuple[str, float]]] = {
    "mm": ("length", 1.0), "millimeter": ("length", 1.0), "millimeters": ("length", 1.0),
    "millimetre": ("length", 1.0), "millimetres": ("length", 1.0),
    "cm": ("length", 10.0), "centimeter": ("length", 10.0), "centimeters": ("length", 10.0),
    "centimetre": ("length", 10.0), "centimetres": ("length", 10.0),
    "ml": ("volume", 1.0), "cc": ("volume", 1.0), "milliliter": ("volume", 1.0),
    "milliliters": ("volume", 1.0), "millilitre": ("volume", 1.0), "millilitres": ("volume", 1.0),
    "hu": ("density", 1.0), "hounsfield units": ("density", 1.0), "hounsfield unit": ("density", 1.0),
    "%": ("percent", 1.0), "percent": ("percent", 1.0),
    "degrees": ("angle", 1.0), "degree": ("angle", 1.0), "°": ("angle", 1.0),
    "ملم": ("length", 1.0), "مم": ("length", 1.0), "مليمتر": ("length", 1.0),
    "ملليمتر": ("length", 1.0), "مليمترات": ("length", 1.0), "ملليمترات": ("length", 1.0),
    "سم": ("length", 10.0), "سنتيمتر": ("length", 10.0), "سنتمتر": ("length", 10.0),
    "سنتيمترات": ("length", 10.0), "سنتمترات": ("length", 10.0), "سانتيمتر": ("length", 10.0),
    "مل": ("volume", 1.0), "ملل": ("volume", 1.0), "مليلتر": ("volume", 1.0), "ميليلتر": ("volume", 1.0),
    "سم مكعب": ("volume", 1.0), "سم3": ("volume", 1.0),
    "وحدة هونسفيلد": ("density", 1.0), "وحدة هاونسفيلد": ("density", 1.0), "هاونسفيلد": ("density", 1.0),
    "هونسفيلد": ("density", 1.0),
    "بالمئة": ("percent", 1.0), "بالمائة": ("percent", 1.0), "في المئة": ("percent", 1.0),
    "في المائة": ("percent", 1.0),
    "درجة": ("angle", 1.0), "درجات": ("angle", 1.0),
}
_UNITS: Final = {normalize(k): v for k, v in _UNITS_WRITTEN.items()}
_UNIT_RE = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
_NUM = r"\d+(?:\.\d+)?"
_CHAIN_SEP = r"\s*(?:x|\*|by|to|-|الي|في)\s*"
_QUANTITY = re.compile(
    rf"(?<![a-z\d.])(?P<nums>{_NUM}(?:{_CHAIN_SEP}{_NUM})*)(?!\d)"
    rf"(?:\s*-?\s*(?P<unit>{_UNIT_RE})(?![a-z\u0621-\u064a\d]))?"
)
_NUM_IN_CHAIN = re.compile(_NUM)

_NUMBER_WORDS: Final[dict[str, int]] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "single": 1, "twice": 2,
    "واحد": 1, "واحدة": 1, "اثنان": 2, "اثنين": 2, "اثنتان": 2, "اثنتين": 2, "ثلاث": 3, "ثلاثة": 3,
    "أربع": 4, "أربعة": 4, "خمس": 5, "خمسة": 5, "ست": 6, "ستة": 6, "سبع": 7, "سبعة": 7,
    "ثمان": 8, "ثماني": 8, "ثمانية": 8, "تسع": 9, "تسعة": 9, "عشر": 10, "عشرة": 10,
}

_NUMBER_WORDS = {normalize(k): v for k, v in _NUMBER_WORDS.items()}  # type: ignore[misc]


@dataclass(frozen=True)
class Quantity:
    """A number as written (``value``) and, when it has a unit, its dimension and base value."""

    text: str
    value: float
    dimension: str  # "" for a bare number

    @property
    def key(self) -> tuple[str, float]:
        return self.dimension, round(self.value, 3)


def quantities(norm: str) -> list[Quantity]:
    """Numbers of a normalised text with their units (a chain's unit applies to every member).

    Numbers glued to Latin letters (``L4``, ``T2``, ``3rd``) are codes or ordinals, not values.
    """
    out = []
    for m in _QUANTITY.finditer(norm):
        unit = m.group("unit")
        if unit is None and re.match(r"[a-z]", norm[m.end("nums"):m.end("nums") + 1]):
            continue  # 3rd, 2nd, 4x

        dim, factor = _UNITS[unit] if unit else ("", 1.0)
        for n in _NUM_IN_CHAIN.findall(m.group("nums")):
            out.append(Quantity(m.group(0).strip(), float(n) * factor, dim))
    return out


# -- tokens, lexicon ---------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+|[\u0621-\u064a]+|(?<!\d)\.|\.(?!\d)|[;:!?\n]|,")
_AR_PREFIXES: Final = ("وبال", "وال", "فال", "بال", "كال", "لل", "ال", "وب", "ول", "فب", "فل", "و", "ف", "ب", "ل", "ك")
_SENTENCE_END: Final = frozenset({".", ";", ":", "!", "?", "\n"})


@dataclass(frozen=True)
class Token:
    text: str
    forms: frozenset[str]  # the token and its clitic-stripped stems (Arabic), or plural-stripped (English)
    index: int
    sentence: int


def _arabic(token: str) -> bool:
    return "\u0621" <= token[0] <= "\u064a"


def _forms(token: str) -> frozenset[str]:
    forms = {token}
    if _arabic(token):
        for p in _AR_PREFIXES:
            if token.startswith(p) and len(token) - len(p) >= 2:
                forms.add(token[len(p):])
        stems = frozenset(forms)
        for f in stems:
            # dual (عقيدتان, الفصين), sound feminine plural (آفات) and feminine nisba (نفاخية):
            # the singular / masculine stem, as the lexicon lists it
            if f.endswith(("تان", "تين")) and len(f) > 4:
                forms.add(f[:-3] + "ه")
            elif f.endswith(("ان", "ين")) and len(f) >= 4:
                forms.add(f[:-2])
            if f.endswith("ات") and len(f) > 4:
                forms.update({f[:-2], f[:-2] + "ه"})
            if f.endswith("يه") and len(f) > 3:
                forms.add(f[:-1])
    else:
        for suffix in ("es", "s"):
            if token.endswith(suffix) and len(token) - len(suffix) >= 3:
                forms.add(token[: -len(suffix)])
    return frozenset(forms)


def tokenize(norm: str) -> list[Token]:
    """Word tokens of a normalised text, each with its sentence number (., ;, :, newline end one)."""
    out: list[Token] = []
    sentence = 0
    for m in _TOKEN.finditer(norm):
        t = m.group(0)
        if t in _SENTENCE_END:
            sentence += 1
            continue
        if t == ",":
            continue
        out.append(Token(t, _forms(t), len(out), sentence))
    return out


@dataclass(frozen=True)
class Concept:
    id: str
    kind: Literal["anatomy", "finding"]
    parts: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Lexicon:
    """Variants (as token tuples) per concept, for each language; longest variants first."""

    version: str
    concepts: dict[str, Concept]
    variants: dict[Language, tuple[tuple[tuple[str, ...], str], ...]]


def _lexicon_token(word: str) -> str:
    word = normalize(word)
    if _arabic(word) and word.startswith("ال") and len(word) > 4:
        return word[2:]
    return word


@functools.cache
def load_lexicon() -> Lexicon:
    """The committed lexicon (``reporting/consistency_lexicon.json``), normalised once."""
    raw = json.loads(resources.files("reporting").joinpath("consistency_lexicon.json").read_text("utf-8"))
    concepts: dict[str, Concept] = {}
    variants: dict[Language, list[tuple[tuple[str, ...], str]]] = {"en": [], "ar": []}
    for entry in raw["entries"]:
        concepts[entry["id"]] = Concept(entry["id"], entry["kind"], frozenset(entry.get("parts", ())))
        for lang in ("en", "ar"):
            for v in entry[lang]:
                words = tuple(_lexicon_token(w) for w in v.split())
                variants[lang].append((words, entry["id"]))
    ordered = {lang: tuple(sorted(vs, key=lambda x: -len(x[0]))) for lang, vs in variants.items()}
    return Lexicon(str(raw["version"]), concepts, ordered)


@dataclass(frozen=True)
class Mention:
    concept: str
    start: int  # token index of the first word
    end: int  # one past the last
    sentence: int
    text: str


_LINKS: Final[dict[Language, frozenset[str]]] = {"en": frozenset({"of"}), "ar": frozenset({"في"})}
"""Words a multi-word term may be split by (``تضخم في حجم القلب``, ``انزياح في الخط المتوسط``)."""


def _match_at(tokens: list[Token], i: int, words: tuple[str, ...], links: frozenset[str]) -> int | None:
    """End index of ``words`` matched from token ``i`` (one link word allowed between two words)."""
    j = i
    for k, w in enumerate(words):
        if j >= len(tokens):
            return None
        if k and tokens[j].text in links and j + 1 < len(tokens) and w in tokens[j + 1].forms:
            j += 1
        if w not in tokens[j].forms or tokens[j].sentence != tokens[i].sentence:
            return None
        j += 1
    return j


def mentions(tokens: list[Token], lang: Language, lexicon: Lexicon) -> list[Mention]:
    """Lexicon terms in ``tokens``: longest variant first, no overlaps, within one sentence."""
    out: list[Mention] = []
    taken: set[int] = set()
    for words, cid in lexicon.variants[lang]:
        for i in range(len(tokens)):
            end = _match_at(tokens, i, words, _LINKS[lang])
            if end is None or any(j in taken for j in range(i, end)):
                continue
            out.append(Mention(cid, i, end, tokens[i].sentence, " ".join(t.text for t in tokens[i:end])))
            taken.update(range(i, end))
    return sorted(out, key=lambda m: m.start)


# -- laterality --------------------------------------------------------------------------------

_SIDE_WORDS: Final[dict[Language, dict[str, Side]]] = {
    "en": {"left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral"},
    "ar": {
        "يسار": "left", "أيسر": "left", "يسرى": "left",
        "يمين": "right", "أيمن": "right", "يمنى": "right",
        "ثنائي": "bilateral", "ثنائية": "bilateral", "ثنائيا": "bilateral", "جانبين": "bilateral",
        "جهتين": "bilateral",
    },
}
_SIDE_WORDS = {lang: {normalize(k): v for k, v in words.items()} for lang, words in _SIDE_WORDS.items()}  # type: ignore[misc]
_BOTH_SIDES: Final = (("both", "sides"), ("both", "side"))


@dataclass(frozen=True)
class SideMention:
    side: Side
    index: int
    sentence: int
    text: str


def side_mentions(tokens: list[Token], lang: Language) -> list[SideMention]:
    words = _SIDE_WORDS[lang]
    out = []
    for t in tokens:
        hit = next((words[f] for f in t.forms if f in words), None)
        if hit is not None:
            out.append(SideMention(hit, t.index, t.sentence, t.text))
    if lang == "en":
        for a, b in itertools.pairwise(tokens):
            if (a.text, b.text) in _BOTH_SIDES:
                out.append(SideMention("bilateral", a.index, a.sentence, "both sides"))
    return out


def _nearest(side: SideMention, found: list[Mention]) -> Mention | None:
    best: tuple[int, Mention] | None = None
    for m in found:
        if m.sentence != side.sentence:
            continue
        d = m.start - side.index if m.start > side.index else side.index - (m.end - 1)
        if best is None or d < best[0]:
            best = (d, m)
    return best[1] if best else None


_BOTH: Final[frozenset[Side]] = frozenset({"bilateral", "left", "right"})


def _side_set(sides: Iterable[Side]) -> frozenset[Side]:
    """Sides as a set in which "bilateral" and "left and right" say the same thing."""
    s = frozenset(sides)
    return _BOTH if "bilateral" in s or {"left", "right"} <= s else s


# -- negation ----------------------------------------------------------------------------------

_NEG_CUES: Final[dict[Language, dict[str, Literal["pre", "both"]]]] = {
    "en": {"no": "pre", "without": "pre", "neither": "pre", "nor": "pre", "none": "pre", "free": "pre",
           "negative": "pre", "not": "both", "absent": "both", "resolved": "both"},
    "ar": {"لا": "pre", "لم": "pre", "لن": "pre", "بدون": "pre", "دون": "pre", "بلا": "pre", "عدم": "pre",
           "انعدام": "pre", "خلو": "pre", "خالي": "pre", "خالية": "pre", "ليس": "both", "ليست": "both",
           "غير": "both", "زوال": "both"},
}
_TERMINATORS: Final[dict[Language, frozenset[str]]] = {
    "en": frozenset({"but", "however", "although", "though", "except", "whereas", "while", "yet"}),
    "ar": frozenset({"لكن", "بينما", "إلا", "باستثناء", "عدا", "سوى"}),
}

_NEG_CUES = {lang: {normalize(k): v for k, v in cues.items()} for lang, cues in _NEG_CUES.items()}  # type: ignore[misc]
_TERMINATORS = {lang: frozenset(normalize(w) for w in ws) for lang, ws in _TERMINATORS.items()}  # type: ignore[misc]


def _negated(tokens: list[Token], lang: Language, mention: Mention) -> bool:
    cues = _NEG_CUES[lang]
    stops = _TERMINATORS[lang]
    same = [t for t in tokens if t.sentence == mention.sentence]
    # backwards from the mention: a pre cue before any terminator negates it
    for t in reversed([t for t in same if t.index < mention.start]):
        if t.forms & stops:
            break
        if any(cues.get(f) for f in t.forms if f in cues):
            return True
    # forwards: a cue that also works after its term ("is not seen", "غير موجود")
    for t in [t for t in same if t.index >= mention.end]:
        if t.forms & stops:
            break
        if any(cues.get(f) == "both" for f in t.forms if f in cues):
            return True
    return False


# -- comparison ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Analysis:
    quantities: list[Quantity]
    numerals_as_words: Counter[int]
    mentions: list[Mention]
    sides: list[SideMention]
    sides_by_concept: dict[tuple[str, bool], frozenset[Side]]  # (concept, negated) -> sides
    polarity: dict[str, frozenset[bool]]  # finding -> {True: negated, False: affirmed}


def _analyse(text: str, lang: Language, lexicon: Lexicon) -> _Analysis:
    norm = normalize(text)
    tokens = tokenize(norm)
    found = mentions(tokens, lang, lexicon)
    sides = side_mentions(tokens, lang)
    negated = {m.start: _negated(tokens, lang, m) for m in found}
    by_concept: dict[tuple[str, bool], set[Side]] = {}
    for s in sides:
        c = _nearest(s, found)
        if c is not None:
            by_concept.setdefault((c.concept, negated[c.start]), set()).add(s.side)
    polarity: dict[str, set[bool]] = {}
    for m in found:
        if lexicon.concepts[m.concept].kind == "finding":
            polarity.setdefault(m.concept, set()).add(negated[m.start])
    words = Counter(_NUMBER_WORDS[f] for t in tokens for f in t.forms if f in _NUMBER_WORDS)
    return _Analysis(quantities(norm), words, found, sides,
                     {c: _side_set(v) for c, v in by_concept.items()},
                     {c: frozenset(v) for c, v in polarity.items()})


def _fmt(qs: Iterable[Quantity]) -> str:
    return ", ".join(sorted({re.sub(r"\s+", " ", q.text) for q in qs}))


def compare(english: str, arabic: str, *, section: SectionName = "findings",
            lexicon: Lexicon | None = None) -> list[Mismatch]:
    """The mismatches between an English and an Arabic text of the same section."""
    lex = lexicon or load_lexicon()
    en, ar = _analyse(english, "en", lex), _analyse(arabic, "ar", lex)
    out: list[Mismatch] = []

    # numbers: measured values by dimension; bare numerals may be number words on the other side
    en_q = Counter(q.key for q in en.quantities if q.dimension)
    ar_q = Counter(q.key for q in ar.quantities if q.dimension)
    if en_q != ar_q:
        only_en = [q for q in en.quantities if q.dimension and (en_q - ar_q)[q.key]]
        only_ar = [q for q in ar.quantities if q.dimension and (ar_q - en_q)[q.key]]
        out.append(Mismatch(kind="number", section=section, english=_fmt(only_en), arabic=_fmt(only_ar),
                            detail="measurements differ (value or unit)"))
    en_b = Counter(q.value for q in en.quantities if not q.dimension)
    ar_b = Counter(q.value for q in ar.quantities if not q.dimension)
    missing_en = {v: n for v, n in (en_b - ar_b).items() if not (v.is_integer() and ar.numerals_as_words[int(v)] >= n)}
    missing_ar = {v: n for v, n in (ar_b - en_b).items() if not (v.is_integer() and en.numerals_as_words[int(v)] >= n)}
    if missing_en or missing_ar:
        out.append(Mismatch(kind="number", section=section,
                            english=", ".join(f"{v:g}" for v in sorted(missing_en)),
                            arabic=", ".join(f"{v:g}" for v in sorted(missing_ar)),
                            detail="numbers differ"))

    # laterality: per concept where both texts tie a side to it, and overall
    for key in sorted(set(en.sides_by_concept) & set(ar.sides_by_concept)):
        if en.sides_by_concept[key] != ar.sides_by_concept[key]:
            cid = key[0]
            out.append(Mismatch(kind="laterality", section=section, concept=cid,
                                english=",".join(sorted(en.sides_by_concept[key])),
                                arabic=",".join(sorted(ar.sides_by_concept[key])),
                                detail=f"side of {'the negated ' if key[1] else ''}{cid} differs"))
    en_sides, ar_sides = _side_set(s.side for s in en.sides), _side_set(s.side for s in ar.sides)
    if en_sides != ar_sides and not any(m.kind == "laterality" for m in out):
        out.append(Mismatch(kind="laterality", section=section, english=",".join(sorted(en_sides)),
                            arabic=",".join(sorted(ar_sides)), detail="sides named differ"))

    # terms and negation
    en_c = {m.concept for m in en.mentions}
    ar_c = {m.concept for m in ar.mentions}

    def covered(c: str, other: set[str]) -> bool:
        # named in the other language itself, as a part of a compound there, or by all its parts
        said = other | {p for o in other for p in lex.concepts[o].parts}
        parts = lex.concepts[c].parts
        return c in said or (bool(parts) and parts <= said)

    for cid in sorted({c for c in en_c if not covered(c, ar_c)} | {c for c in ar_c if not covered(c, en_c)}):
        side_en = cid in en_c
        out.append(Mismatch(kind="term", section=section, concept=cid,
                            english=next((m.text for m in en.mentions if m.concept == cid), ""),
                            arabic=next((m.text for m in ar.mentions if m.concept == cid), ""),
                            detail=f"{cid} only in the {'English' if side_en else 'Arabic'}"))
    for cid in sorted(set(en.polarity) & set(ar.polarity)):
        if en.polarity[cid] != ar.polarity[cid]:
            def says(p: frozenset[bool]) -> str:
                return "/".join(("negated" if v else "affirmed") for v in sorted(p))
            out.append(Mismatch(kind="negation", section=section, concept=cid, english=says(en.polarity[cid]),
                                arabic=says(ar.polarity[cid]), detail=f"{cid} negated in one language only"))
    return out


def check_sections(sections: Mapping[Language, Sections]) -> ConsistencyResult:
    """The check of a draft's sections. A draft without both languages has nothing to compare
    and is consistent with an empty list of checked sections."""
    lex = load_lexicon()
    if "en" not in sections or "ar" not in sections:
        return ConsistencyResult(lexicon_version=lex.version, consistent=True)
    found: list[Mismatch] = []
    names: tuple[SectionName, ...] = ("findings", "impression")
    for name in names:
        found += compare(getattr(sections["en"], name), getattr(sections["ar"], name), section=name, lexicon=lex)
    return ConsistencyResult(lexicon_version=lex.version, consistent=not found, mismatches=tuple(found),
                             checked_sections=names)
