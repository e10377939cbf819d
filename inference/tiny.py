"""A tiny random-weight BiMediX2 look-alike for tests and the CPU demo.

Same architecture as BiMediX2 (CLIP ViT vision tower at 336 px with 14 px patches, so 576 image
tokens, features from the second-to-last layer; 2-layer GELU projector; Llama decoder) at toy width,
with a byte-level BPE tokenizer trained offline on an embedded English/Arabic radiology text
(``tiny_corpus.txt`` plus the prompt templates) and Llama-3's special tokens. The released layout
mimics MBZUAI's checkpoints (``llava_llama``, LLaVA key names, no ``<image>`` token, a separate
CLIP folder); the hf layout is that folder passed through :func:`prepare_checkpoint`, so every
tiny hf checkpoint exercises the preparation path. Random weights: output is gibberish by design.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from ground.errors import ConfigError

from .checkpoint import VISION_DIR, prepare_checkpoint
from .prompt_format import (
    BOS,
    END_OF_TEXT,
    EOT,
    HEADER_END,
    HEADER_START,
    LLAMA3_LLAVA_CHAT_TEMPLATE,
)
from .prompts import PROMPTS_DIR

PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = (
    BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT, PAD,
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
)
TINY_VOCAB = 3000
CORPUS = Path(__file__).resolve().parent / "tiny_corpus.txt"


def _training_lines() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    for path in sorted(PROMPTS_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".txt", ".yaml"):
            lines += path.read_text(encoding="utf-8").splitlines()
    lines += ["0 1 2 3 4 5 6 7 8 9 ٠ ١ ٢ ٣ ٤ ٥ ٦ ٧ ٨ ٩ { } \" : , . ; ( ) % / - mm cm"]
    return [line for line in lines if line.strip()]


def build_tokenizer(dst: Path) -> None:
    """Train a byte-level BPE on the embedded text and save it as a Llama-3-style fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_training_lines(), trainer)
    # Like Llama-3's tokenizer, prepend <|begin_of_text|> when special tokens are added.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[2:4]) + list(SPECIAL_TOKENS[6:]),
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_LLAVA_CHAT_TEMPLATE
    fast.save_pretrained(str(dst))


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise ConfigError(f"tokenizer has no single id for {token}")
    return token_id


def write_tiny_released(dst: Path, *, seed: int = 0, image_size: int = 336, patch_size: int = 14) -> Path:
    """Write a tiny checkpoint in the released ``llava_llama`` layout (plus a local CLIP folder)."""
    from safetensors.torch import save_file
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    build_tokenizer(dst)
    tokenizer = AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=_token_id(tokenizer, BOS), eos_token_id=_token_id(tokenizer, EOT),
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    llm = LlamaForCausalLM(text)
    tower = CLIPVisionModel(vision)
    projector = torch.nn.Sequential(
        torch.nn.Linear(vision.hidden_size, text.hidden_size), torch.nn.GELU(),
        torch.nn.Linear(text.hidden_size, text.hidden_size),
    )
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v.contiguous() for k, v in projector.state_dict().items()})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    # The CLIP folder as the hub's openai/clip-vit-large-patch14-336 stores it: vision_model.* keys.
    (dst / VISION_DIR).mkdir(exist_ok=True)
    tower_state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v.contiguous()
                   for k, v in tower.state_dict().items()}
    save_file(tower_state, str(dst / VISION_DIR / "model.safetensors"), metadata={"format": "pt"})
    vision.architectures = ["CLIPVisionModel"]
    vision.to_json_file(str(dst / VISION_DIR / "config.json"))
    llama = text.to_dict()
    config: dict[str, Any] = {k: llama[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "head_dim",
    ) if k in llama}
    config.update({
        "_name_or_path": "taqrir/tiny-bimedix2",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "torch_dtype": "float32",
        "mm_vision_tower": str((dst / VISION_DIR).resolve()),
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 8192,
        "taqrir_tiny": True,
    })
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_tiny(dst: Path, *, layout: Literal["hf", "released"] = "hf", seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny checkpoint to ``dst`` in ``layout`` (hf: loadable by transformers and SGLang)."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConfigError(f"{dst} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(dst)
    if layout == "released":
        return write_tiny_released(dst, seed=seed)
    with tempfile.TemporaryDirectory(prefix="taqrir-tiny-") as tmp:
        released = write_tiny_released(Path(tmp) / "released", seed=seed)
        return prepare_checkpoint(released, dst)
