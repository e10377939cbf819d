"""In-process backend: a local LLaVA checkpoint in transformers layout, batched generation.

Offline only: ``HF_HUB_OFFLINE`` is set and every load passes ``local_files_only``. Images are
padded to a square with the CLIP mean colour before the processor (BiMediX2's training
preprocessing). bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU. Requests are grouped by
sampling parameters and constraint kind and generated in left-padded batches. Structured output
and script restriction use :mod:`inference.constraints` (field-by-field generation inside a JSON
skeleton, per-row token masks). With ``prefix_cache`` the last batch's prompt KV cache is kept,
and a batch whose prompts extend it (the Arabic request after the English one, the second field
after the first) computes only the new tokens; images are compared by digest, so a cached prefix
never covers another study's images. ``ignore_eos`` generates exactly ``max_new_tokens`` (benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .checkpoint import checkpoint_revision
from .constraints import (
    FieldStop,
    RowMaskProcessor,
    TokenTable,
    build_token_table,
    cut_value,
    unescape_value,
)
from .errors import BackendUnavailable
from .images import decode_image, pad_to_square, sha256_hex
from .prompt_format import END_OF_TEXT, EOT, IMAGE_TOKEN, render_chat
from .scripts import class_from_pattern, script_class
from .sections import string_fields
from .types import GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersBackend:
    """Generates with ``LlavaForConditionalGeneration`` in this process."""

    name = "transformers"

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        model_name: str | None = None,
        torch_threads: int | None = None,
        prefix_cache: bool = False,
    ) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").is_file():
            raise BackendUnavailable(
                f"no checkpoint at {self.model_path}; run `taqrir model tiny {self.model_path}` "
                "or `taqrir model prepare SRC DST` and set inference.model_path"
            )
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        config = json.loads((self.model_path / "config.json").read_text())
        tiny = bool(config.get("taqrir_tiny"))
        processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            str(self.model_path), local_files_only=True
        )
        model = LlavaForConditionalGeneration.from_pretrained(
            str(self.model_path), local_files_only=True, dtype=dtype_
        ).to(device_)  # type: ignore[arg-type]
        self._attach(
            model, processor, device=device_, dtype=dtype_, batch_size=batch_size, tiny=tiny,
            # The tiny random model never borrows a real model's name in provenance.
            model_name=self.model_path.name if tiny else (model_name or self.model_path.name),
            revision=checkpoint_revision(self.model_path), prefix_cache=prefix_cache,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any,
        *,
        model_name: str,
        revision: str,
        batch_size: int = 8,
        tiny: bool = False,
        prefix_cache: bool = False,
    ) -> TransformersBackend:
        """A backend over a model already in memory (the GPU benchmark builds one on the device)."""
        backend = cls.__new__(cls)
        backend.model_path = Path(model_name)
        parameter = next(model.parameters())
        backend._attach(
            model, processor, device=parameter.device, dtype=parameter.dtype, batch_size=batch_size,
            tiny=tiny, model_name=model_name, revision=revision, prefix_cache=prefix_cache,
        )
        return backend

    def _attach(
        self, model: Any, processor: Any, *, device: torch.device, dtype: torch.dtype, batch_size: int,
        tiny: bool, model_name: str, revision: str, prefix_cache: bool,
    ) -> None:
        self.device, self.dtype, self.batch_size, self.tiny = device, dtype, batch_size, tiny
        self.model_name, self.revision = model_name, revision
        self.prefix_cache = prefix_cache
        self._prefix: _PrefixEntry | None = None
        self.reused_prompt_tokens = 0
        """Prompt tokens taken from the prefix cache instead of being computed (a running count)."""
        self.processor = processor
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = EOT
        self.model = model
        self.model.eval()
        self.image_token_id = int(self.model.config.image_token_index)
        if self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise BackendUnavailable(f"{self.model_path}: tokenizer's <image> id differs from image_token_index")
        self.end_ids = [
            i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT))
            if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id
        ]
        vocab_rows = int(self.model.get_output_embeddings().weight.shape[0])
        self._table: TokenTable = build_token_table(self.tokenizer, vocab_rows, self.end_ids, [self.image_token_id])
        self._lock = threading.Lock()
        log.info("transformers backend ready: device=%s dtype=%s tiny=%s", self.device, self.dtype, self.tiny)

    # -- protocol ---------------------------------------------------------------------------
    def ready(self) -> None:
        """Loaded in the constructor; nothing can go away afterwards."""

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_name": self.model_name,
            "model_revision": self.revision,
            "model_path": str(self.model_path),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tiny": self.tiny,
        }

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def count_prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The exact token ids of ``request``'s prompt, image placeholders expanded."""
        prompt = render_chat(request.messages)
        images = [pad_to_square(decode_image(b)) for b in request.images] or None
        enc = self.processor(text=[prompt], images=images, add_special_tokens=False, return_tensors="pt")
        return [int(i) for i in enc["input_ids"][0]]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            fields = [n for n, _ in string_fields(request.json_schema)] if request.json_schema is not None else None
            key = json.dumps([request.sampling.as_dict(), fields], sort_keys=True)
            groups.setdefault(key, []).append(index)
        with self._lock, torch.inference_mode():
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    for index, result in zip(chunk, self._generate_batch([requests[i] for i in chunk]), strict=True):
                        results[index] = result
        return [r for r in results if r is not None]

    # -- internals --------------------------------------------------------------------------
    def _encode(self, prompts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        # The rendered prompt already starts with <|begin_of_text|>; Llama-3's tokenizer would add a second.
        enc = self.processor(
            text=prompts, images=images or None, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        out = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def _run(
        self,
        prompts: list[str],
        images: list[Any],
        sampling: SamplingParams,
        max_new_tokens: int,
        masks: torch.Tensor | None,
        *,
        field: bool,
        seed_offset: int = 0,
        image_keys: list[tuple[str, ...]] | None = None,
    ) -> tuple[list[list[int]], list[int]]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        enc = self._encode(prompts, images)
        keys = image_keys or [() for _ in prompts]
        cache = self._take_prefix(enc, keys) if self.prefix_cache else None
        prompt_len = int(enc["input_ids"].shape[1])
        processors = LogitsProcessorList()
        if masks is not None or field:
            row_masks = masks if masks is not None else torch.ones(len(prompts), self._table.vocab_rows, dtype=torch.bool)
            processors.append(
                RowMaskProcessor(row_masks, prompt_len=prompt_len, first_ban=self._table.first_token_ban() if field else None)
            )
        stopping = StoppingCriteriaList([FieldStop(self.tokenizer, prompt_len)]) if field else None
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed + seed_offset)
        kwargs: dict[str, Any] = {"do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        if cache is not None:
            kwargs[_cache_name()] = cache
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=processors,
            stopping_criteria=stopping,
            return_dict_in_generate=True,
            **kwargs,
        )
        sequences = out.sequences
        if self.prefix_cache:
            self._keep_prefix(enc, keys, getattr(out, _cache_name(), None))
        prompt_counts = [int(n) for n in enc["attention_mask"].sum(dim=1)]
        generated: list[list[int]] = []
        for row in sequences[:, prompt_len:].tolist():
            ids: list[int] = []
            for token in row:
                if token in self.end_ids or token == self.tokenizer.pad_token_id:
                    if sampling.ignore_eos and token not in self.end_ids:
                        ids.append(int(token))
                        continue
                    break
                ids.append(int(token))
            generated.append(ids)
        return generated, prompt_counts

    # -- prefix cache ---------------------------------------------------------------------------
    def clear_prefix_cache(self) -> None:
        """Drop the kept prompt cache (it holds one batch's KV memory until the next batch)."""
        self._prefix = None

    def _take_prefix(self, enc: dict[str, torch.Tensor], keys: list[tuple[str, ...]]) -> Any:
        """Reuse the last batch's prompt cache for the rows' common prefix; edits ``enc`` in place.

        The last batch's rows must be the same studies in the same order (images compared by
        digest, so a prefix never spans different images). The kept prefix is cut at one length
        for all rows (the cache is one tensor per layer); each row's remaining tokens follow it,
        padded *between* prefix and suffix with attention 0, and positions follow the attention
        mask (transformers derives them from its cumulative sum), so every row sees its own
        contiguous positions. Returns the cropped cache, or None when nothing can be reused.
        """
        entry, self._prefix = self._prefix, None
        if entry is None or len(entry.rows) != len(keys):
            return None
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows = [ids[r][mask[r].bool()].tolist() for r in range(ids.shape[0])]
        drop = 0
        for old, new, old_key, new_key in zip(entry.rows, rows, entry.keys, keys, strict=False):
            limit = len(old) if old_key == new_key else _first(old, self.image_token_id)
            common = _common_prefix(old[:limit], new)
            drop = max(drop, len(old) - common, len(old) - len(new) + 1)
        keep = entry.input_ids.shape[1] - drop
        suffixes = [new[max(0, len(old) - drop) :] for old, new in zip(entry.rows, rows, strict=False)]
        if keep < 16 or any(self.image_token_id in s for s in suffixes):
            return None
        width = max(len(s) for s in suffixes)
        pad = int(self.tokenizer.pad_token_id)
        tails = [[pad] * (width - len(s)) + s for s in suffixes]
        tail_mask = [[0] * (width - len(s)) + [1] * len(s) for s in suffixes]
        device = ids.device
        enc["input_ids"] = torch.cat([entry.input_ids[:, :keep], torch.tensor(tails, device=device)], dim=1)
        enc["attention_mask"] = torch.cat(
            [entry.attention_mask[:, :keep], torch.tensor(tail_mask, device=device, dtype=mask.dtype)], dim=1
        )
        for name in ("pixel_values", "image_sizes"):
            enc.pop(name, None)  # the images are in the cache already
        cache = entry.cache
        current = int(cache.get_seq_length())
        if keep < current:
            cache.crop(keep - current)  # a negative count removes tokens in transformers 4.4x and 5.x
        self.reused_prompt_tokens += int(entry.attention_mask[:, :keep].sum())
        return cache

    def _keep_prefix(self, enc: dict[str, torch.Tensor], keys: list[tuple[str, ...]], cache: Any) -> None:
        if cache is None:
            return
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows = [ids[r][mask[r].bool()].tolist() for r in range(ids.shape[0])]
        self._prefix = _PrefixEntry(rows=rows, keys=list(keys), input_ids=ids, attention_mask=mask, cache=cache)

    def _row_masks(self, classes: list[str | None], *, quote_ends: bool) -> torch.Tensor | None:
        if all(c is None for c in classes) and not quote_ends:
            return None
        return torch.stack([self._table.mask(c, quote_ends=quote_ends) for c in classes])

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        sampling = batch[0].sampling
        prompts = [render_chat(r.messages) for r in batch]
        images = [pad_to_square(decode_image(b)) for r in batch for b in r.images]
        image_keys = [tuple(sha256_hex(b) for b in r.images) for r in batch]
        completion = [0] * len(batch)
        if batch[0].json_schema is None:
            classes = [script_class(r.allowed_script) if r.allowed_script else None for r in batch]
            generated, prompt_counts = self._run(
                prompts, images, sampling, sampling.max_new_tokens, self._row_masks(classes, quote_ends=False),
                field=False, image_keys=image_keys,
            )
            texts = [self._finish_text(ids, sampling) for ids in generated]
            completion = [len(ids) for ids in generated]
        else:
            field_sets = [string_fields(r.json_schema or {}) for r in batch]
            names = [name for name, _ in field_sets[0]]
            if any([n for n, _ in fs] != names for fs in field_sets):
                raise ValueError("requests batched together must share the JSON schema's fields")
            per_field = max(1, sampling.max_new_tokens // len(names))
            values: list[dict[str, str]] = [{} for _ in batch]
            prompt_counts = [0] * len(batch)
            for position, name in enumerate(names):
                skeletons = [_skeleton(v, name) for v in values]
                classes = []
                for fields, request in zip(field_sets, batch, strict=True):
                    pattern = fields[position][1].get("pattern")
                    cls = class_from_pattern(pattern) if isinstance(pattern, str) else None
                    if cls is None and request.allowed_script:
                        cls = script_class(request.allowed_script)
                    classes.append(cls)
                generated, counts = self._run(
                    [p + s for p, s in zip(prompts, skeletons, strict=True)], images, sampling, per_field,
                    self._row_masks(classes, quote_ends=True), field=True, seed_offset=position,
                    image_keys=image_keys,
                )
                if position == 0:
                    prompt_counts = counts
                for row, ids in enumerate(generated):
                    raw, _ = cut_value(self.tokenizer.decode(ids, skip_special_tokens=True))
                    values[row][name] = unescape_value(raw)
                    completion[row] += len(ids)
            texts = [json.dumps(v, ensure_ascii=False) for v in values]
        latency = time.perf_counter() - started
        return [
            GenerationResult(
                text=text, prompt_tokens=prompt_counts[i], completion_tokens=completion[i],
                latency_s=latency, model_id=self.model_name, model_revision=self.revision,
            )
            for i, text in enumerate(texts)
        ]

    def _finish_text(self, ids: list[int], sampling: SamplingParams) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in sampling.stop:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return str(text).strip()


@dataclass
class _PrefixEntry:
    """The prompt cache of the last generated batch: its rows' tokens, image digests and padding."""

    rows: list[list[int]]
    keys: list[tuple[str, ...]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any


@lru_cache(maxsize=1)
def _cache_name() -> str:
    """generate()'s name for the KV cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {}) else "past_key_values"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _first(row: list[int], token: int) -> int:
    return row.index(token) if token in row else len(row)


def _skeleton(done: dict[str, str], field: str) -> str:
    """The JSON text before ``field``'s value: the finished fields, then the open string."""
    body = "".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}, " for k, v in done.items())
    return "{" + body + json.dumps(field) + ': "'
