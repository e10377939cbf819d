"""Versioned prompt templates (files under ``inference/prompt_templates/<version>/``) and how they are filled.

A version folder (a package, so wheels ship its files) holds ``system.txt`` (BiMediX2's system prompt, sent explicitly), ``english.txt``,
``translate_arabic.txt``, ``direct_arabic.txt`` (``string.Template`` text) and
``instructions.yaml`` (instructions per modality and body part). The template id is
``bimedix2-report/<version>``; its sha256 covers every file of the folder, so provenance names
exactly the words the model was given. Pure functions: no I/O beyond reading the package's files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template

import yaml

from .types import Message, ReportSections, StudyContext

PROMPTS_DIR = Path(__file__).resolve().parent / "prompt_templates"
_FILES = ("system.txt", "english.txt", "translate_arabic.txt", "direct_arabic.txt", "instructions.yaml")
_MAX_FIELD_CHARS = 200
_SEX = {"M": "male", "F": "female", "O": "other"}
_AGE_UNITS = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}


@dataclass(frozen=True)
class PromptSet:
    """The templates of one version, loaded and hashed."""

    version: str
    template_id: str
    sha256: str
    system: str
    english: Template
    translate_arabic: Template
    direct_arabic: Template
    instructions: dict[str, str]


@lru_cache(maxsize=8)
def load_prompts(version: str = "v1") -> PromptSet:
    """Load and hash the templates of ``version``; ValueError when the folder is incomplete."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", version):
        raise ValueError(f"prompt version {version!r} is not a folder name")
    folder = PROMPTS_DIR / version
    texts: dict[str, str] = {}
    digest = hashlib.sha256()
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"prompt version {version!r} lacks {name} in {folder}")
        data = path.read_bytes()
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        texts[name] = data.decode("utf-8")
    instructions = yaml.safe_load(texts["instructions.yaml"]) or {}
    if not isinstance(instructions, dict) or "default" not in instructions:
        raise ValueError(f"{folder / 'instructions.yaml'} must map keys to text and include 'default'")
    return PromptSet(
        version=version,
        template_id=f"bimedix2-report/{version}",
        sha256=digest.hexdigest(),
        system=texts["system.txt"].strip(),
        english=Template(texts["english.txt"].strip()),
        translate_arabic=Template(texts["translate_arabic.txt"].strip()),
        direct_arabic=Template(texts["direct_arabic.txt"].strip()),
        instructions={str(k).upper(): str(v).strip() for k, v in instructions.items()},
    )


def _clean(value: str | None) -> str:
    """Header text made safe for a prompt line: no control characters, bounded length."""
    if not value:
        return ""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", value).strip()
    return text[:_MAX_FIELD_CHARS]


def describe_age(age: str | None) -> str:
    """DICOM Age String (PS3.5 6.2, e.g. ``045Y``) as words; unparseable values are dropped."""
    if not age:
        return ""
    match = re.fullmatch(r"\s*(\d{1,3})([DWMY])\s*", age.upper())
    if not match:
        return ""
    return f"{int(match.group(1))} {_AGE_UNITS[match.group(2)]}"


def render_context(context: StudyContext) -> str:
    """Study context lines from header facts. Never names or identifiers (StudyContext has none)."""
    lines = [f"- Modality: {_clean(context.modality) or 'unknown'}"]
    if context.body_part:
        lines.append(f"- Body part: {_clean(context.body_part)}")
    if context.study_description:
        lines.append(f"- Study description: {_clean(context.study_description)}")
    series = [s for s in (_clean(d) for d in context.series_descriptions) if s]
    if series:
        lines.append(f"- Series: {'; '.join(series[:8])}")
    age = describe_age(context.patient_age)
    if age:
        lines.append(f"- Patient age: {age}")
    sex = _SEX.get((context.patient_sex or "").strip().upper())
    if sex:
        lines.append(f"- Patient sex: {sex}")
    labels = [s for s in (_clean(label) for label in context.image_labels) if s]
    if labels:
        lines.append(f"- Images (in order): {'; '.join(labels[:16])}")
    return "\n".join(lines)


def instructions_for(prompts: PromptSet, context: StudyContext) -> str:
    modality = _clean(context.modality).upper()
    body = _clean(context.body_part).upper()
    for key in (f"{modality}/{body}", modality):
        if key in prompts.instructions:
            return prompts.instructions[key]
    return prompts.instructions["DEFAULT"]


def sections_json(sections: ReportSections) -> str:
    """Canonical JSON of a draft, as it is shown back to the model."""
    return json.dumps(sections.as_dict(), ensure_ascii=False)


def english_messages(prompts: PromptSet, context: StudyContext, n_images: int) -> list[Message]:
    """System prompt, then the images first in the user turn, then the English question."""
    question = prompts.english.substitute(
        instructions=instructions_for(prompts, context), context=render_context(context)
    )
    return [Message("system", prompts.system), Message("user", question, n_images)]


def arabic_translate_messages(
    prompts: PromptSet, context: StudyContext, n_images: int, english: ReportSections
) -> list[Message]:
    """The English conversation, its answer, then the request to translate it.

    The request starts with exactly the English request's tokens (system prompt, images, question),
    so a server's prefix cache reuses the image encoding and the whole English prompt.
    """
    return [
        *english_messages(prompts, context, n_images),
        Message("assistant", sections_json(english)),
        Message("user", prompts.translate_arabic.substitute()),
    ]


def arabic_direct_messages(prompts: PromptSet, context: StudyContext, n_images: int) -> list[Message]:
    """Arabic drafted from the images alone (same system prompt and images first)."""
    question = prompts.direct_arabic.substitute(
        instructions=instructions_for(prompts, context), context=render_context(context)
    )
    return [Message("system", prompts.system), Message("user", question, n_images)]
