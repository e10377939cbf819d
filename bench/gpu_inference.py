"""BiMediX2-8B at real size on one GPU: bilingual studies per second, and how far from the roofline.

No download: a random-weight model of BiMediX2-8B's architecture is built directly on the device
(Llama-3.1-8B: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128,256,
rope theta 500,000 with llama3 scaling; CLIP ViT-L/14 at 336 px, features of the second-to-last
layer; the mlp2x_gelu projector; bf16). Speed does not depend on the weights' values, so it costs
what the real model costs, token for token. Layout, tokenizer and image processor are those of
``taqrir model tiny`` (its hf checkpoint is written first; only the sizes change), so the prompt
path is Taqrir's own: the tokenizer is the tiny one (3,000 tokens: prompts tokenize to somewhat
different lengths than with Llama-3's; the counts printed are the real ones of this run).

Each study is what the pipeline sends (inference/drafting.py): its key images, the English request,
then the Arabic request that repeats the English one (same system prompt, images first, same
question) and adds the English answer and a translation turn. Random weights never stop by
themselves, so every request generates exactly ``--english-tokens`` / ``--arabic-tokens`` tokens
(``ignore_eos``; the end-of-turn token is suppressed until then). Requests are plain text under the
script masks (structured_output off: the field-by-field JSON path ends a field at a random quote).

Sweeps the studies in flight (one static batch of N studies: English batch, then Arabic batch),
with the transformers backend's prefix cache (the Arabic request reuses the English prompt's KV:
images and question are not computed again) and without it. Per point: studies/s, prompt and
generated tokens/s, p50/p99 time per study, peak GPU memory, and the ratio of a roofline bound
to the measured time; the roofline uses this device's memory bandwidth (a large copy) and bf16
matrix throughput (a large GEMM), both measured in the same run.

    python3 bench/gpu_inference.py --out /tmp/gpu-bench          # on a GPU machine (8B, bf16)
    .venv/bin/python bench/gpu_inference.py --tiny --out /tmp/b  # the same path, tiny model, CPU
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.prompts import PromptSet, arabic_translate_messages, english_messages, load_prompts
from inference.tiny import write_tiny
from inference.transformers_backend import TransformersBackend
from inference.types import GenerationRequest, ReportSections, SamplingParams, StudyContext

# BiMediX2-8B = LLaVA-1.5 layout over Llama-3.1-8B and CLIP ViT-L/14-336 (MBZUAI/BiMediX2-8B config).
LLAMA_31_8B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
}
CONTEXT = StudyContext(modality="CR", body_part="CHEST", study_description="Chest PA and lateral",
                       series_descriptions=["PA", "LAT"], patient_age="045Y", patient_sex="F",
                       image_labels=["PA", "Lateral"])
log = logging.getLogger("gpu_inference")


# -- the model ---------------------------------------------------------------------------------
def model_config(tiny_dir: Path, *, tiny: bool) -> dict[str, Any]:
    """The tiny hf checkpoint's config with BiMediX2-8B's sizes (or unchanged with ``tiny``)."""
    config: dict[str, Any] = json.loads((tiny_dir / "config.json").read_text())
    if tiny:
        return config
    text = {k: v for k, v in config["text_config"].items() if k not in ("rope_parameters",)}
    text.update(LLAMA_31_8B)
    vision = dict(config["vision_config"])
    vision.update(CLIP_VIT_L14_336)
    config.update(text_config=text, vision_config=vision, mm_hidden_size=vision["hidden_size"], dtype="bfloat16")
    config.pop("taqrir_tiny", None)
    return config


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """LlavaForConditionalGeneration with random weights, created directly on ``device`` in ``dtype``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    llava_config = LlavaConfig.from_dict(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # the init leaves some weights at zero; random values everywhere
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                param.fill_(1.0)
    return model.eval()  # type: ignore[no-untyped-call]  # parameters made in dtype; rotary buffers stay fp32


def parameter_counts(model: Any) -> dict[str, int]:
    counts = {"language": 0, "vision": 0, "projector": 0, "lm_head": 0, "embed": 0}
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            counts["vision"] += param.numel()
        elif "multi_modal_projector" in name:
            counts["projector"] += param.numel()
        elif "lm_head" in name:
            counts["lm_head"] += param.numel()
        elif "embed_tokens" in name:
            counts["embed"] += param.numel()
        else:
            counts["language"] += param.numel()
    return counts


# -- the device's roofline -----------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = (time.perf_counter() - started) / repeats
    del src, dst
    return 2 * nbytes / seconds


def measure_matmul(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a ``size``-cubed matrix product on random data."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - started) / repeats
    return 2 * size**3 / seconds


@dataclass
class Shape:
    """What the roofline needs to know about the model."""

    params: dict[str, int]
    bytes_per_param: int
    layers: int
    hidden: int
    kv_bytes_per_token: int
    vision_tokens: int  # per image (CLIP: patches + class token)


def roofline_seconds(shape: Shape, *, studies: int, images: int, prompt_en: float, prompt_ar: float,
                     computed_ar: float, gen_en: int, gen_ar: int, bandwidth: float, flops: float) -> float:
    """A lower bound of one batch's time: prefill at peak matrix throughput, each decode step at
    max(bytes of weights + KV read / bandwidth, its FLOPs / peak). ``computed_ar`` is the Arabic
    prompt's tokens actually computed (all of them without prefix reuse)."""
    llm = shape.params["language"] + shape.params["lm_head"]
    weight_bytes = (llm + shape.params["projector"]) * shape.bytes_per_param

    def prefill(tokens: float, context: float) -> float:
        dense = 2 * llm * tokens
        attention = 4 * shape.layers * shape.hidden * tokens * context  # QK^T and AV
        return studies * (dense + attention) / flops

    vision = studies * images * 2 * (shape.params["vision"] + shape.params["projector"]) * shape.vision_tokens / flops
    seconds = vision + prefill(prompt_en, prompt_en / 2)
    seconds += prefill(computed_ar, prompt_ar - computed_ar / 2)
    if computed_ar >= prompt_ar:  # without reuse the images are encoded again
        seconds += vision
    for start, steps in ((prompt_en, gen_en), (prompt_ar, gen_ar)):
        for step in range(steps):
            context = start + step
            memory = weight_bytes + studies * context * shape.kv_bytes_per_token
            compute = studies * (2 * llm + 4 * shape.layers * shape.hidden * context)
            seconds += max(memory / bandwidth, compute / flops)
    return seconds


# -- the requests --------------------------------------------------------------------------------
def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def english_request(prompts: PromptSet, images: list[bytes], sampling: SamplingParams) -> GenerationRequest:
    """As inference.drafting.build_requests makes it with structured_output off (checked in tests)."""
    return GenerationRequest(images=list(images), messages=english_messages(prompts, CONTEXT, len(images)),
                             sampling=sampling, json_schema=None, allowed_script="latin")


def arabic_request(prompts: PromptSet, images: list[bytes], sampling: SamplingParams,
                   english: ReportSections) -> GenerationRequest:
    messages = arabic_translate_messages(prompts, CONTEXT, len(images), english)
    return GenerationRequest(images=list(images), messages=messages, sampling=sampling,
                             json_schema=None, allowed_script="arabic")


def as_sections(text: str) -> ReportSections:
    """The English answer as the pipeline shows it back: findings and impression (here 2/3 and 1/3)."""
    cut = max(1, 2 * len(text) // 3)
    return ReportSections(findings=text[:cut].strip() or "x", impression=text[cut:].strip() or "x")


# -- the sweep -----------------------------------------------------------------------------------
@dataclass
class Point:
    studies: int
    prefix_reuse: bool
    batches: int
    seconds: list[float] = field(default_factory=list)
    english_s: float = 0.0
    arabic_s: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    peak_gib: float = 0.0
    roofline_s: float = 0.0
    status: str = "ok"

    def summary(self) -> dict[str, Any]:
        total = sum(self.seconds)
        n = self.studies * self.batches
        ordered = sorted(self.seconds)
        return {
            "studies_in_flight": self.studies, "prefix_reuse": self.prefix_reuse, "status": self.status,
            "batches": self.batches, "studies_per_s": n / total if total else 0.0,
            "prompt_tokens_per_s": self.prompt_tokens / total if total else 0.0,
            "generated_tokens_per_s": self.generated_tokens / total if total else 0.0,
            # static batches: every study of a batch finishes with it, so a study's time is its batch's
            "p50_s_per_study": statistics.median(ordered) if ordered else 0.0,
            "p99_s_per_study": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0.0,
            "english_s": self.english_s / max(1, self.batches), "arabic_s": self.arabic_s / max(1, self.batches),
            "prompt_tokens": self.prompt_tokens, "reused_prompt_tokens": self.reused_tokens,
            "generated_tokens": self.generated_tokens, "peak_memory_gib": self.peak_gib,
            "roofline_s_per_batch": self.roofline_s,
            "roofline_ratio": (self.roofline_s * self.batches / total) if total else 0.0,
        }


def run_point(backend: TransformersBackend, prompts: PromptSet, point: Point, *, images: int,
              gen_en: int, gen_ar: int, shape: Shape, bandwidth: float, flops: float, seed: int) -> None:
    device = backend.device
    backend.clear_prefix_cache()
    backend.prefix_cache = point.prefix_reuse
    backend.batch_size = point.studies
    en_sampling = SamplingParams(temperature=0.0, max_new_tokens=gen_en, ignore_eos=True)
    ar_sampling = SamplingParams(temperature=0.0, max_new_tokens=gen_ar, ignore_eos=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prompt_en = prompt_ar = computed_ar = 0.0
    for batch in range(point.batches):
        study_images = [[png(336 + s % 7, 294, seed + batch * 1000 + s * 10 + i) for i in range(images)]
                        for s in range(point.studies)]
        reused_before = backend.reused_prompt_tokens
        _sync(device)
        started = time.perf_counter()
        english = backend.generate([english_request(prompts, imgs, en_sampling) for imgs in study_images])
        _sync(device)
        middle = time.perf_counter()
        arabic = backend.generate([arabic_request(prompts, imgs, ar_sampling, as_sections(r.text))
                                   for imgs, r in zip(study_images, english, strict=True)])
        _sync(device)
        ended = time.perf_counter()
        point.seconds.append(ended - started)
        backend.clear_prefix_cache()
        point.english_s += middle - started
        point.arabic_s += ended - middle
        reused = backend.reused_prompt_tokens - reused_before
        point.reused_tokens += reused
        point.prompt_tokens += sum(r.prompt_tokens for r in english + arabic)
        point.generated_tokens += sum(r.completion_tokens for r in english + arabic)
        prompt_en = sum(r.prompt_tokens for r in english) / point.studies
        prompt_ar = sum(r.prompt_tokens for r in arabic) / point.studies
        computed_ar = prompt_ar - reused / point.studies
    point.roofline_s = roofline_seconds(
        shape, studies=point.studies, images=images, prompt_en=prompt_en, prompt_ar=prompt_ar,
        computed_ar=computed_ar, gen_en=gen_en, gen_ar=gen_ar, bandwidth=bandwidth, flops=flops)
    if device.type == "cuda":
        point.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30


# Datasheet figures (NVIDIA H100 SXM5 80 GB and H200 SXM 141 GB): HBM bandwidth, dense bf16 tensor
# throughput (no sparsity), memory. Bounds from these are upper limits, not measurements.
DATASHEETS: dict[str, tuple[float, float, float]] = {
    "H100 SXM (datasheet)": (3.35e12, 989e12, 80e9),
    "H200 (datasheet)": (4.8e12, 989e12, 141e9),
}


@dataclass
class Tokens:
    """Tokens of one study: English prompt, Arabic prompt (all of it, and the part computed when the
    English prompt is reused), and the fixed generated lengths."""

    prompt_en: float
    prompt_ar: float
    computed_ar: float
    gen_en: int
    gen_ar: int


def sizing(shape: Shape, tokens: Tokens, *, bandwidth: float, flops: float, memory: float,
           latency_s: float, images: int) -> dict[str, Any]:
    """The roofline's best static batch whose time stays within ``latency_s`` (all studies of a
    batch finish with it, so p99 = batch time) and whose KV cache fits beside the weights: studies
    per hour per GPU that no implementation can exceed on that device."""
    weights = sum(shape.params.values()) * shape.bytes_per_param  # resident: the embedding too
    per_study = shape.kv_bytes_per_token * (tokens.prompt_ar + tokens.gen_ar)
    most = max(0, int((0.9 * memory - weights) // per_study))  # 10% for activations and the allocator
    best: dict[str, Any] = {"studies_in_flight": 0, "batch_s": 0.0, "studies_per_hour": 0.0}
    candidates = sorted({2**k for k in range(most.bit_length()) if 2**k <= most} | ({most} if most else set()))
    for studies in candidates:
        seconds = roofline_seconds(shape, studies=studies, images=images, prompt_en=tokens.prompt_en,
                                   prompt_ar=tokens.prompt_ar, computed_ar=tokens.computed_ar, gen_en=tokens.gen_en,
                                   gen_ar=tokens.gen_ar, bandwidth=bandwidth, flops=flops)
        if seconds > latency_s:
            break
        best = {"studies_in_flight": studies, "batch_s": seconds, "studies_per_hour": 3600 * studies / seconds}
    single = roofline_seconds(shape, studies=1, images=images, prompt_en=tokens.prompt_en, prompt_ar=tokens.prompt_ar,
                              computed_ar=tokens.computed_ar, gen_en=tokens.gen_en, gen_ar=tokens.gen_ar,
                              bandwidth=bandwidth, flops=flops)
    return {"latency_s": latency_s, "max_in_memory": most, "one_study_s": single, **best}


def sizing_markdown(rows: list[dict[str, Any]], tokens: Tokens) -> str:
    lines = [
        ("Roofline bounds (not measurements): BiMediX2-8B bf16, per study "
        f"{tokens.prompt_en:.0f} English prompt tokens + {tokens.gen_en} generated, "
        f"{tokens.prompt_ar:.0f} Arabic prompt tokens ({tokens.computed_ar:.0f} computed with prefix reuse) "
        f"+ {tokens.gen_ar} generated; static batches, p99 = batch time."),
        "",
        "| device | prefix reuse | p99 limit | one study alone | studies in flight | batch time | studies/hour/GPU (bound) |",
        "|:--|:--|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {'yes' if r['prefix_reuse'] else 'no'} | {r['latency_s']:.0f} s | {r['one_study_s']:.1f} s "
            f"| {r['studies_in_flight']} (memory: {r['max_in_memory']}) | {r['batch_s']:.1f} s "
            f"| {r['studies_per_hour']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def sizing_rows(shape: Shape, tokens: Tokens, devices: dict[str, tuple[float, float, float]],
                latencies: list[float], images: int) -> list[dict[str, Any]]:
    rows = []
    for name, (bandwidth, flops, memory) in devices.items():
        for latency in latencies:
            for reuse in (True, False):
                t = tokens if reuse else Tokens(tokens.prompt_en, tokens.prompt_ar, tokens.prompt_ar,
                                                tokens.gen_en, tokens.gen_ar)
                rows.append({"device": name, "prefix_reuse": reuse,
                             **sizing(shape, t, bandwidth=bandwidth, flops=flops, memory=memory,
                                      latency_s=latency, images=images)})
    return rows


def study_tokens(backend: TransformersBackend, prompts: PromptSet, images: int, gen_en: int, gen_ar: int) -> Tokens:
    """Prompt tokens of one study as this tokenizer counts them; the English answer in the Arabic
    prompt is counted as ``gen_en`` tokens; reuse keeps the English prompt but its last 2 tokens."""
    pictures = [png(512, 448, i) for i in range(images)]
    sampling = SamplingParams(max_new_tokens=1)
    en = len(backend.count_prompt_tokens(english_request(prompts, pictures, sampling)))
    ar = len(backend.count_prompt_tokens(arabic_request(prompts, pictures, sampling, ReportSections("x", "x"))))
    ar += gen_en
    return Tokens(prompt_en=en, prompt_ar=ar, computed_ar=ar - (en - 2), gen_en=gen_en, gen_ar=gen_ar)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Taqrir transformers backend, {meta['model']} on {meta['device_name']}",
        "",
        (f"- measured here: copy bandwidth {meta['bandwidth_gb_s']:.0f} GB/s (read+write), "
         f"{meta['matmul_dtype']} GEMM {meta['matmul_tflops']:.1f} TFLOP/s ({meta['matmul_size']}^3)"),
        (f"- per study: {meta['images_per_study']} key images; English {meta['english_tokens']} + Arabic "
         f"{meta['arabic_tokens']} generated tokens, fixed (random weights never stop: ignore_eos)"),
        (f"- model built on the device in {meta['build_s']:.1f} s; {meta['params_total'] / 1e9:.2f} B parameters; "
         f"torch {meta['torch']}, transformers {meta['transformers']}"),
        "- static batches: all studies of a batch finish together, so p50/p99 are over batch times",
        "- roofline ratio = lower-bound time from the measured bandwidth and GEMM rate / measured time",
        "",
        ("| studies in flight | prefix reuse | studies/s | prompt tok/s | generated tok/s | p50 s/study "
         "| p99 s/study | English s | Arabic s | peak GiB | roofline ratio | status |"),
        "|---:|:--|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|",
    ]
    for r in rows:
        lines.append(
            f"| {r['studies_in_flight']} | {'yes' if r['prefix_reuse'] else 'no'} | {r['studies_per_s']:.3f} "
            f"| {r['prompt_tokens_per_s']:.0f} | {r['generated_tokens_per_s']:.0f} | {r['p50_s_per_study']:.2f} "
            f"| {r['p99_s_per_study']:.2f} | {r['english_s']:.2f} | {r['arabic_s']:.2f} | {r['peak_memory_gib']:.1f} "
            f"| {r['roofline_ratio']:.1%} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def eight_b_shape(tiny_dir: Path) -> Shape:
    """BiMediX2-8B's shape for the roofline, from the model built on the meta device (no memory)."""
    config = model_config(tiny_dir, tiny=False)
    return shape_of(config, parameter_counts(build_model(config, torch.device("meta"), torch.bfloat16)), torch.bfloat16)


def shape_of(config: dict[str, Any], params: dict[str, int], dtype: torch.dtype) -> Shape:
    text, vision = config["text_config"], config["vision_config"]
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    width = torch.finfo(dtype).bits // 8
    return Shape(
        params=params, bytes_per_param=width, layers=int(text["num_hidden_layers"]), hidden=int(text["hidden_size"]),
        kv_bytes_per_token=2 * int(text["num_hidden_layers"]) * int(text["num_key_value_heads"]) * head_dim * width,
        vision_tokens=(int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1,
    )


def sizing_only(args: argparse.Namespace) -> int:
    gen_en, gen_ar = args.english_tokens or 300, args.arabic_tokens or 400
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="taqrir-sizing-") as tmp:
        tiny_dir = write_tiny(Path(tmp) / "tiny-hf")
        shape = eight_b_shape(tiny_dir)
        backend = TransformersBackend(tiny_dir, device="cpu")
        tokens = study_tokens(backend, load_prompts("v1"), args.images, gen_en, gen_ar)
    latencies = [float(x) for x in args.latency_s.split(",")]
    rows = sizing_rows(shape, tokens, DATASHEETS, latencies, args.images)
    table = sizing_markdown(rows, tokens)
    (args.out / "sizing.md").write_text(table)
    (args.out / "sizing.json").write_text(json.dumps({"tokens": asdict(tokens), "shape": asdict(shape), "rows": rows},
                                                     indent=2))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_inference.md and .json")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU smoke test of the same path)")
    parser.add_argument("--device", default=None, help="default: cuda (8B) or cpu (--tiny)")
    parser.add_argument("--images", type=int, default=2, help="key images per study")
    parser.add_argument("--english-tokens", type=int, default=None, help="default 300 (tiny: 8)")
    parser.add_argument("--arabic-tokens", type=int, default=None, help="default 400 (tiny: 10)")
    parser.add_argument("--inflight", default=None, help="studies in flight to sweep (default 1,4,16,64,128; tiny: 1,2)")
    parser.add_argument("--batches", type=int, default=1, help="measured batches per point")
    parser.add_argument("--budget-s", type=float, default=380.0, help="skip sweep points that would end after this many seconds (from start)")
    parser.add_argument("--sizing", action="store_true",
                        help="only the roofline sizing for datasheet H100/H200 (CPU, seconds; no GPU needed)")
    parser.add_argument("--latency-s", default="10,30", help="p99 limits per study for the sizing table")
    args = parser.parse_args(argv)
    if args.sizing:
        return sizing_only(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    begun = time.perf_counter()

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen_en = args.english_tokens or (8 if args.tiny else 300)
    gen_ar = args.arabic_tokens or (10 if args.tiny else 400)
    inflight = [int(n) for n in (args.inflight or ("1,2" if args.tiny else "1,4,16,64,128")).split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda":
        bandwidth = measure_bandwidth(device, 2 << 30)
        matmul_size = 8192
    else:
        bandwidth = measure_bandwidth(device, 32 << 20)
        matmul_size = 256
    flops = measure_matmul(device, dtype, matmul_size)
    log.info("device %s: copy %.0f GB/s, GEMM %.1f TFLOP/s", device, bandwidth / 1e9, flops / 1e12)

    with tempfile.TemporaryDirectory(prefix="taqrir-gpu-bench-") as tmp:
        tiny_dir = write_tiny(Path(tmp) / "tiny-hf")
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(tiny_dir), local_files_only=True)  # type: ignore[no-untyped-call]
        config = model_config(tiny_dir, tiny=args.tiny)
        started = time.perf_counter()
        model = build_model(config, device, dtype)
        _sync(device)
        build_s = time.perf_counter() - started
    params = parameter_counts(model)
    log.info("model built in %.1f s: %s", build_s, params)
    name = "tiny-bimedix2 (random)" if args.tiny else "BiMediX2-8B architecture (random weights)"
    backend = TransformersBackend.from_model(model, processor, model_name=name, revision="random", tiny=args.tiny)
    shape = shape_of(config, params, dtype)
    prompts = load_prompts("v1")
    with torch.inference_mode():  # warm-up: kernels, allocator, the token masks
        warm = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        (first,) = backend.generate([english_request(prompts, [png(64, 64, 0)] * args.images, warm)])
        backend.generate([arabic_request(prompts, [png(64, 64, 0)] * args.images, warm, as_sections(first.text))])

    import transformers

    meta: dict[str, Any] = {
        "model": name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "dtype": str(dtype).removeprefix("torch."), "bandwidth_gb_s": bandwidth / 1e9,
        "matmul_tflops": flops / 1e12, "matmul_size": matmul_size, "matmul_dtype": str(dtype).removeprefix("torch."),
        "images_per_study": args.images, "english_tokens": gen_en, "arabic_tokens": gen_ar,
        "build_s": build_s, "params": params, "params_total": sum(params.values()), "shape": asdict(shape),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    tokens = study_tokens(backend, prompts, args.images, gen_en, gen_ar)
    memory = float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else 16e9
    measured = {f"{meta['device_name']} (measured bandwidth and GEMM)": (bandwidth, flops, memory)}
    bounds = sizing_rows(shape, tokens, measured, [float(x) for x in args.latency_s.split(",")], args.images)
    rows: list[dict[str, Any]] = []

    def write() -> str:
        """Written after every point, so a run cut short still leaves its table."""
        meta["wall_s"] = time.perf_counter() - begun
        table = markdown(meta, rows) + "\n" + sizing_markdown(bounds, tokens)
        (args.out / "gpu_inference.md").write_text(table)
        (args.out / "gpu_inference.json").write_text(
            json.dumps({"meta": meta, "points": rows, "roofline_sizing": bounds, "tokens": asdict(tokens)}, indent=2))
        return table

    last = 0.0
    for studies in inflight:
        for reuse in (True, False):
            elapsed = time.perf_counter() - begun
            if last and elapsed + 2.2 * last > args.budget_s:
                rows.append(Point(studies, reuse, 0, status="skipped: time budget").summary())
                continue
            point = Point(studies, reuse, args.batches)
            try:
                run_point(backend, prompts, point, images=args.images, gen_en=gen_en, gen_ar=gen_ar, shape=shape,
                          bandwidth=bandwidth, flops=flops, seed=studies)
            except torch.cuda.OutOfMemoryError:
                backend.clear_prefix_cache()
                torch.cuda.empty_cache()
                point.status, point.seconds = "out of memory", []
            rows.append(point.summary())
            last = sum(point.seconds) if point.seconds else last
            log.info("%s", json.dumps(rows[-1]))
            write()
        if rows[-1]["status"] == "out of memory" and rows[-2]["status"] == "out of memory":
            break
    table = write()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
