"""Checkpoints on disk: content revision, and preparing a released BiMediX2 checkpoint for serving.

Released BiMediX2 weights (MBZUAI/BiMediX2-8B, -8B-Bi) use the LLaVA codebase layout
(``model_type: llava_llama``; keys ``model.layers.*``, ``model.mm_projector.{0,2}.*``, optionally
``model.vision_tower.vision_tower.*``; ``mm_vision_tower`` naming a hub CLIP). Neither transformers
nor SGLang loads that as is. :func:`prepare_checkpoint` writes a folder both load:

* ``config.json``: ``model_type: llava``, ``LlavaForConditionalGeneration``, nested ``text_config``
  (Llama) and ``vision_config`` (CLIP), ``image_token_index``, ``vision_feature_layer`` from
  ``mm_vision_select_layer`` (-2), and LLaVA's keys kept for SGLang (``mm_vision_tower`` pointing at
  the bundled local tower, ``image_aspect_ratio: pad``, ...);
* weights renamed to the llava-hf layout (``language_model.model.*``, ``language_model.lm_head``,
  ``multi_modal_projector.linear_{1,2}``, ``vision_tower.vision_model.*``), streamed tensor by
  tensor in their stored dtype;
* the tokenizer with an ``<image>`` token (an unused ``<|reserved_special_token_N|>`` slot renamed,
  so no embedding grows; otherwise a new row initialised at the mean embedding), and a Llama-3 chat
  template that puts image placeholders first;
* ``preprocessor_config.json``/``processor_config.json`` (CLIP 336 px, pad to square with the CLIP
  mean, 576 image tokens) and ``generation_config.json`` with BiMediX2's reference sampling;
* the CLIP vision tower copied into ``clip-vision-tower/`` (SGLang's LLaVA loader reads it by path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ground.errors import ConfigError

from .images import CLIP_MEAN, CLIP_STD
from .prompt_format import END_OF_TEXT, EOT, IMAGE_TOKEN, LLAMA3_LLAVA_CHAT_TEMPLATE

log = logging.getLogger(__name__)

REVISION_CACHE = ".taqrir-revision.json"
VISION_DIR = "clip-vision-tower"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
    "pretraining_tp", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
)


def checkpoint_revision(path: Path) -> str:
    """sha256 of the safetensors files' content (names and bytes), cached beside them.

    The cache is keyed by each file's name, size and mtime, so a changed file is hashed again.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no .safetensors files in {path}: not a checkpoint folder")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = path / REVISION_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    revision = f"sha256:{digest.hexdigest()}"
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": revision}))
    except OSError:
        log.warning("could not cache the checkpoint revision in %s (read-only?)", path)
    return revision


def released_to_hf_key(key: str) -> str:
    """Rename one released (LLaVA codebase) weight key to the llava-hf layout."""
    rules = (
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    )
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    raise ConfigError(f"unexpected weight {key!r} in a llava_llama checkpoint")


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            yield key, fh.get_tensor(key)


def _vision_source(src: Path, config: dict[str, Any], vision_tower: Path | None) -> Path:
    candidates: list[Path] = []
    if vision_tower is not None:
        candidates.append(Path(vision_tower))
    named = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    if named:
        candidates += [Path(named), src / named, src / Path(named).name]
    candidates.append(src / VISION_DIR)
    for candidate in candidates:
        if (candidate / "config.json").is_file() and list(candidate.glob("*.safetensors")):
            return candidate
    raise ConfigError(
        f"the vision tower {named or '(unnamed)'} is not available locally; download "
        "openai/clip-vit-large-patch14-336 (safetensors) and pass its folder with --vision-tower"
    )


def _vision_config(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "config.json").read_text())
    vision = data.get("vision_config", data) if data.get("model_type") == "clip" else data
    vision = {k: v for k, v in vision.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    vision["model_type"] = "clip_vision_model"
    return vision


def _prepare_tokenizer(src: Path, dst: Path) -> tuple[int, bool]:
    """Copy the tokenizer with an ``<image>`` token; returns (its id, whether it is new)."""
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    tok_path = dst / "tokenizer.json"
    if not tok_path.is_file():
        raise ConfigError(f"{src} has no tokenizer.json (a fast tokenizer is required)")
    data = json.loads(tok_path.read_text(encoding="utf-8"))
    added = data.get("added_tokens", [])
    for entry in added:
        if entry["content"] == IMAGE_TOKEN:
            return int(entry["id"]), False
    reserved = sorted(
        (int(m.group(1)), entry)
        for entry in added
        if (m := re.fullmatch(r"<\|reserved_special_token_(\d+)\|>", entry["content"]))
    )
    if reserved:
        old = reserved[0][1]["content"]
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            path = dst / name
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                path.write_text(text.replace(json.dumps(old), json.dumps(IMAGE_TOKEN)), encoding="utf-8")
        return int(reserved[0][1]["id"]), False
    new_id = max([int(e["id"]) for e in added] + [len(data["model"]["vocab"]) - 1]) + 1
    added.append({"id": new_id, "content": IMAGE_TOKEN, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True})
    data["added_tokens"] = added
    tok_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return new_id, True


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)], dim=0)


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def _vision_key(key: str) -> str | None:
    """A CLIP weight key as ``vision_model.*``; None for the text half of a full CLIP checkpoint."""
    if key.startswith("vision_model."):
        return key
    if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "vision_model." + key
    return None


def _write_weights(src: Path, dst: Path, vision_dir: Path, vocab_rows: int) -> dict[str, str]:
    """Stream every tensor to the new layout; the CLIP tower joins unless the checkpoint has one."""
    sources = sorted(src.glob("*.safetensors"))
    if not sources:
        raise ConfigError(f"no .safetensors weights in {src}; convert .bin shards to safetensors first")
    has_tower = any(k.startswith("model.vision_tower.vision_tower.") for p in sources for k in _keys(p))
    if any(k.startswith("model.image_newline") for p in sources for k in _keys(p)):
        raise ConfigError("image_newline (anyres) is not a LLaVA-1.5 checkpoint")
    total = len(sources) + (0 if has_tower else 1)
    weight_map: dict[str, str] = {}
    for index, path in enumerate(sources, start=1):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in _tensors(path):
            new_key = released_to_hf_key(key)
            if new_key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
                tensor = _grow_rows(tensor, vocab_rows)
            out[new_key] = tensor.contiguous()
        name = f"model-{index:05d}-of-{total:05d}.safetensors"
        save_file(out, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in out})
    if not has_tower:
        vision: dict[str, torch.Tensor] = {}
        for path in sorted(vision_dir.glob("*.safetensors")):
            for key, tensor in _tensors(path):
                vision_key = _vision_key(key)
                if vision_key is not None:
                    vision["vision_tower." + vision_key] = tensor.contiguous()
        if not vision:
            raise ConfigError(f"{vision_dir} holds no vision_model.* weights")
        name = f"model-{total:05d}-of-{total:05d}.safetensors"
        save_file(vision, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in vision})
    return weight_map


def _copy_vision_tower(vision_dir: Path, dst: Path) -> Path:
    target = dst / VISION_DIR
    target.mkdir(exist_ok=True)
    for item in vision_dir.iterdir():
        if item.is_file() and (item.suffix in (".json", ".safetensors", ".txt")):
            shutil.copy2(item, target / item.name)
    return target


def _write_compat_files(dst: Path, image_processor: dict[str, Any]) -> None:
    """Files older loaders (SGLang's transformers 4.x) read: preprocessor_config.json, tokenizer class."""
    image_processor = {k: v for k, v in image_processor.items() if not k.startswith("_")}
    image_processor["image_processor_type"] = "LlavaImageProcessor"
    image_processor["processor_class"] = "LlavaProcessor"
    (dst / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    tok_config_path = dst / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["chat_template"] = LLAMA3_LLAVA_CHAT_TEMPLATE
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")


def relocate_checkpoint(path: Path, *, final: Path | None = None) -> None:
    """Point ``mm_vision_tower`` at the bundled tower of a prepared folder that is (or will be,
    at ``final``) somewhere else than where it was prepared."""
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    if (Path(path) / VISION_DIR).is_dir():
        config["mm_vision_tower"] = str((Path(final or path) / VISION_DIR).resolve())
        config_path.write_text(json.dumps(config, indent=2))


def prepare_checkpoint(src: Path, dst: Path, *, vision_tower: Path | None = None, overwrite: bool = False) -> Path:
    """Convert a released ``llava_llama`` checkpoint in ``src`` into a servable folder ``dst``."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil as LlavaImageProcessor,
    )

    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{src} has no config.json")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in ("llava_llama", "llava"):
        raise ConfigError(f"{src} is model_type {config.get('model_type')!r}, not a released llava_llama checkpoint")
    if "text_config" in config:
        raise ConfigError(f"{src} is already in the transformers layout")
    if config.get("image_aspect_ratio", "pad") != "pad" or config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError("only LLaVA-1.5 checkpoints (pad to square, mlp2x_gelu projector) are supported")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConfigError(f"{dst} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)

    vision_dir = _vision_source(src, config, vision_tower)
    vision_config = _vision_config(vision_dir)
    bundled = _copy_vision_tower(vision_dir, dst)
    image_token_id, grown = _prepare_tokenizer(src, dst)
    text_config = {k: config[k] for k in _LLAMA_KEYS if k in config}
    text_config["model_type"] = "llama"
    vocab_rows = int(text_config["vocab_size"])
    if grown or image_token_id >= vocab_rows:
        vocab_rows = image_token_id + 1
        text_config["vocab_size"] = vocab_rows
    weight_map = _write_weights(src, dst, vision_dir, vocab_rows)
    total = sum((dst / n).stat().st_size for n in set(weight_map.values()))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )

    image_size = int(vision_config.get("image_size", 336))
    patch = int(vision_config.get("patch_size", 14))
    select = config.get("mm_vision_select_feature", "patch")
    hf_config: dict[str, Any] = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": image_token_id,
        "image_seq_length": (image_size // patch) ** 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dtype": config.get("torch_dtype", config.get("dtype", "bfloat16")),
        # LLaVA's own keys, read by SGLang's LLaVA loader.
        "mm_vision_tower": str(bundled.resolve()),
        "mm_hidden_size": int(vision_config["hidden_size"]),
        "mm_vision_select_layer": int(config.get("mm_vision_select_layer", -2)),
        "mm_vision_select_feature": select,
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": config.get("mm_patch_merge_type", "flat"),
        "image_aspect_ratio": "pad",
        "taqrir_prepared_from": config.get("_name_or_path", src.name),
    }
    if config.get("taqrir_tiny"):
        hf_config["taqrir_tiny"] = True
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ConfigError("the prepared tokenizer does not map <image> to image_token_index")
    tokenizer.chat_template = LLAMA3_LLAVA_CHAT_TEMPLATE
    image_processor = LlavaImageProcessor(
        do_pad=True, do_resize=True, size={"shortest_edge": image_size},
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy=hf_config["vision_feature_select_strategy"],
        num_additional_image_tokens=1, chat_template=LLAMA3_LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(dst))
    _write_compat_files(dst, image_processor.to_dict())
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT)]
    generation = {"do_sample": True, "temperature": 0.1, "top_p": 1.0, "max_new_tokens": 1024,
                  "eos_token_id": [i for i in eos if isinstance(i, int) and i >= 0]}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2))
    log.info("prepared checkpoint: %d tensors, image token id %d", len(weight_map), image_token_id)
    return dst
