"""Constrained decoding for the transformers backend: token masks, a logits processor, a stop rule.

Structured output is produced by *field-by-field generation inside a fixed JSON skeleton*: for each
string property of the schema, the prompt is followed by the skeleton so far (``{"findings": "``),
the model writes the value, and the value ends at the first unescaped double quote or at
end-of-turn. The backend then closes the skeleton with ``json.dumps``, so the answer is always a JSON
object with exactly the schema's keys, whatever the model (even a random one) does. Within a value,
a character class (from a script, from a script's own ``pattern`` or from a ``^[...]*$`` one; see
:func:`inference.scripts.class_from_pattern`) restricts tokens to
those whose text lies in the class: Arabic sections stay Arabic script, a real guard against
code-switching. The first token of a value may not end it, so values are never empty.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .scripts import text_fits_class


@dataclass
class TokenTable:
    """Decoded text of every token id, built once per tokenizer (the masks are cached per class)."""

    texts: list[str]
    vocab_rows: int
    end_ids: tuple[int, ...]
    banned_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        self._masks: dict[tuple[str | None, bool], torch.Tensor] = {}

    def mask(self, char_class: str | None, *, quote_ends: bool) -> torch.Tensor:
        """Bool[vocab_rows]: tokens allowed inside a value written in ``char_class``.

        With ``quote_ends`` a token may also carry the closing quote: only its text before the
        first ``"`` has to fit. End-of-turn ids are always allowed; banned ids (the image token,
        ids beyond the tokenizer) never are.
        """
        key = (char_class, quote_ends)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        allowed = torch.zeros(self.vocab_rows, dtype=torch.bool)
        for token_id, text in enumerate(self.texts):
            if char_class is None:
                ok = True
            else:
                head = text.split('"', 1)[0] if quote_ends else text
                ok = bool(head or quote_ends) and text_fits_class(head, char_class)
                if not quote_ends and '"' in text:
                    ok = False
            allowed[token_id] = ok
        for token_id in self.end_ids:
            if token_id < self.vocab_rows:
                allowed[token_id] = True
        for token_id in self.banned_ids:
            if token_id < self.vocab_rows:
                allowed[token_id] = False
        self._masks[key] = allowed
        return allowed

    def first_token_ban(self) -> torch.Tensor:
        """Bool[vocab_rows]: tokens that may not open a value (they would leave it empty)."""
        cached = self._masks.get(("__first__", False))
        if cached is not None:
            return cached
        ban = torch.zeros(self.vocab_rows, dtype=torch.bool)
        for token_id, text in enumerate(self.texts):
            stripped = text.strip()
            if not stripped or stripped.startswith('"'):
                ban[token_id] = True
        for token_id in self.end_ids:
            if token_id < self.vocab_rows:
                ban[token_id] = True
        if len(self.texts) < self.vocab_rows:
            ban[len(self.texts) :] = True
        self._masks[("__first__", False)] = ban
        return ban


def build_token_table(tokenizer: object, vocab_rows: int, end_ids: Sequence[int], banned_ids: Sequence[int]) -> TokenTable:
    """Decode every id of ``tokenizer`` once. ``vocab_rows`` is the model's logits width."""
    size = len(tokenizer)  # type: ignore[arg-type]
    texts: list[str] = tokenizer.batch_decode(  # type: ignore[attr-defined]
        [[i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    special = set(getattr(tokenizer, "all_special_ids", []))
    banned = set(banned_ids) | (special - set(end_ids)) | set(range(size, vocab_rows))
    return TokenTable(texts=texts, vocab_rows=vocab_rows, end_ids=tuple(end_ids), banned_ids=tuple(sorted(banned)))


class RowMaskProcessor(LogitsProcessor):
    """Per-row allowed-token masks; on the first generated step also bans value-ending tokens."""

    def __init__(self, masks: torch.Tensor, *, prompt_len: int, first_ban: torch.Tensor | None) -> None:
        self.masks = masks
        self.prompt_len = prompt_len
        self.first_ban = first_ban

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        width = scores.shape[-1]
        if self.masks.device != scores.device:  # copied to the device once, not at every step
            self.masks = self.masks.to(scores.device)
        allowed = self.masks[:, :width]
        if self.first_ban is not None and input_ids.shape[1] == self.prompt_len:
            allowed = allowed & ~self.first_ban[:width].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))  # type: ignore[return-value]


def cut_value(text: str) -> tuple[str, bool]:
    """The JSON string value at the start of ``text`` and whether its closing quote was seen."""
    escaped = False
    for index, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return text[:index], True
    return text, False


def unescape_value(raw: str) -> str:
    """A JSON string body as text; a body with broken escapes is kept literally."""
    try:
        value = json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return raw.replace("\n", " ").strip()
    return str(value).strip()


class FieldStop(StoppingCriteria):
    """Stops each row once its value's closing quote has been generated."""

    def __init__(self, tokenizer: object, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] <= self.prompt_len:
            return done  # type: ignore[return-value]
        decode = self.tokenizer.batch_decode  # type: ignore[attr-defined]
        last = decode(input_ids[:, -1:], skip_special_tokens=True)
        for row, piece in enumerate(last):
            if '"' in piece:  # only then is the whole value decoded, to honour escapes
                (text,) = decode(input_ids[row : row + 1, self.prompt_len :], skip_special_tokens=True)
                done[row] = cut_value(text)[1]
        return done  # type: ignore[return-value]
