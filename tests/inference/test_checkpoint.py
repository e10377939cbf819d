"""Preparing a released llava_llama checkpoint, and the CLI that writes and prepares checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from inference.checkpoint import REVISION_CACHE, checkpoint_revision, released_to_hf_key
from inference.cli import model_app
from inference.transformers_backend import TransformersBackend
from inference.types import GenerationRequest, Message, SamplingParams

from .conftest import png_bytes


def test_key_renames() -> None:
    assert released_to_hf_key("model.mm_projector.0.weight") == "multi_modal_projector.linear_1.weight"
    assert released_to_hf_key("model.mm_projector.2.bias") == "multi_modal_projector.linear_2.bias"
    assert released_to_hf_key("model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    assert released_to_hf_key("lm_head.weight") == "language_model.lm_head.weight"
    assert released_to_hf_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == (
        "vision_tower.vision_model.post_layernorm.weight")


def test_cli_tiny_released_then_prepare_then_generate(tmp_path: Path) -> None:
    runner = CliRunner()
    released, prepared = tmp_path / "released", tmp_path / "prepared"
    result = runner.invoke(model_app, ["tiny", str(released), "--layout", "released"])
    assert result.exit_code == 0, result.output
    config = json.loads((released / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_vision_select_layer"] == -2
    with safe_open(str(released / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.mm_projector.0.weight" in keys and "lm_head.weight" in keys
    assert "<image>" not in (released / "tokenizer.json").read_text()

    result = runner.invoke(model_app, ["prepare", str(released), str(prepared)])
    assert result.exit_code == 0, result.output
    hf = json.loads((prepared / "config.json").read_text())
    assert hf["model_type"] == "llava" and hf["architectures"] == ["LlavaForConditionalGeneration"]
    assert hf["vision_feature_layer"] == -2 and hf["vision_feature_select_strategy"] == "default"
    assert hf["image_seq_length"] == 576 and hf["image_aspect_ratio"] == "pad"
    assert Path(hf["mm_vision_tower"]).is_dir() and "clip" in hf["mm_vision_tower"]
    assert json.loads((prepared / "preprocessor_config.json").read_text())["do_pad"] is True
    assert (prepared / "processor_config.json").is_file()

    backend = TransformersBackend(prepared, device="cpu")
    assert backend.tokenizer.convert_tokens_to_ids("<image>") == hf["image_token_index"]
    # Weights survive the renames unchanged.
    with safe_open(str(released / "model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("model.mm_projector.0.weight"),
                           backend.model.model.multi_modal_projector.linear_1.weight)
        assert torch.equal(fh.get_tensor("lm_head.weight"), backend.model.lm_head.weight)
    (out,) = backend.generate([GenerationRequest([png_bytes(50, 30)], [Message("user", "Describe.", 1)],
                                                 SamplingParams(max_new_tokens=6, seed=0))])
    assert out.completion_tokens > 0

    revision = checkpoint_revision(prepared)
    assert json.loads((prepared / REVISION_CACHE).read_text())["sha256"] == revision
    assert checkpoint_revision(prepared) == revision

    again = runner.invoke(model_app, ["prepare", str(released), str(prepared)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_prepare_refuses_non_llava(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = CliRunner().invoke(model_app, ["prepare", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert result.exit_code == 2 and "llava_llama" in result.output


@pytest.mark.parametrize("layout", ["bogus"])
def test_tiny_rejects_unknown_layout(tmp_path: Path, layout: str) -> None:
    assert CliRunner().invoke(model_app, ["tiny", str(tmp_path / "x"), "--layout", layout]).exit_code == 2


def test_prepare_grows_embeddings_when_no_reserved_token_is_free(tmp_path: Path) -> None:
    from inference.checkpoint import prepare_checkpoint
    from inference.tiny import write_tiny

    released = write_tiny(tmp_path / "released", layout="released")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = released / name
        path.write_text(path.read_text(encoding="utf-8").replace("reserved_special_token", "unused_token"),
                        encoding="utf-8")
    old_vocab = json.loads((released / "config.json").read_text())["vocab_size"]
    prepared = prepare_checkpoint(released, tmp_path / "prepared")
    config = json.loads((prepared / "config.json").read_text())
    assert config["image_token_index"] == old_vocab and config["text_config"]["vocab_size"] == old_vocab + 1
    backend = TransformersBackend(prepared, device="cpu")
    embed = backend.model.get_input_embeddings().weight
    assert embed.shape[0] == old_vocab + 1
    assert torch.allclose(embed[-1], embed[:-1].mean(dim=0), atol=1e-6)
    (out,) = backend.generate([GenerationRequest([png_bytes(20, 20)], [Message("user", "Hi.", 1)],
                                                 SamplingParams(max_new_tokens=4, seed=0))])
    assert out.prompt_tokens > 576
