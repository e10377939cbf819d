"""Benchmark of the transformers backend: requests/s and tokens/s at batch sizes 1/4/16, and the
share of the Arabic (translation) request's prompt tokens that a shared prefix with the English
request can reuse, from the real token ids of both requests.

    .venv/bin/python bench/inference.py                      # tiny model on CPU (made if missing)
    .venv/bin/python bench/inference.py --device cuda --model-path /models/BiMediX2-8B-Bi-prepared
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.config import InferenceSettings
from inference.drafting import build_requests
from inference.prompts import load_prompts
from inference.tiny import write_tiny
from inference.transformers_backend import TransformersBackend
from inference.types import GenerationRequest, ReportSections, SamplingParams, StudyContext


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, default=None, help="transformers-layout checkpoint (default: tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--structured", action="store_true", help="also constrain to the sections JSON schema")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or write_tiny(Path(tmp) / "tiny-hf")
        backend = TransformersBackend(path, device=args.device, dtype=args.dtype, batch_size=max(
            int(b) for b in args.batch_sizes.split(",")))
        prompts = load_prompts("v1")
        context = StudyContext(modality="CR", body_part="CHEST", study_description="Chest PA",
                               patient_age="045Y", patient_sex="F")
        settings = InferenceSettings(structured_output=args.structured)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
        print(f"model={path.name} device={backend.device} dtype={str(backend.dtype).removeprefix('torch.')} "
              f"max_new_tokens={args.max_new_tokens} structured={args.structured}")
        print(f"{'batch':>5} {'req/s':>8} {'gen tok/s':>10} {'prompt tok/s':>13} {'s/batch':>8}")
        backend.generate([GenerationRequest([png(64, 48, 0)], build_requests(
            prompts, [png(64, 48, 0)], context, settings, sampling)[0].messages, sampling)])  # warm-up
        for size in (int(b) for b in args.batch_sizes.split(",")):
            times: list[float] = []
            gen = prompt = 0
            for rep in range(args.repeats):
                requests = []
                for i in range(size):
                    images = [png(96 + i, 64, rep * 100 + i)]
                    en, _ = build_requests(prompts, images, context, settings, sampling)
                    requests.append(en)
                started = time.perf_counter()
                results = backend.generate(requests)
                times.append(time.perf_counter() - started)
                gen += sum(r.completion_tokens for r in results)
                prompt += sum(r.prompt_tokens for r in results)
            # Median batch time: robust to other processes sharing the CPU.
            batch_s = statistics.median(times)
            per_batch_gen, per_batch_prompt = gen / args.repeats, prompt / args.repeats
            print(f"{size:>5} {size / batch_s:>8.2f} {per_batch_gen / batch_s:>10.1f} "
                  f"{per_batch_prompt / batch_s:>13.0f} {batch_s:>8.3f}")

        images = [png(96, 64, 7)]
        english = ReportSections("The lungs are clear. No pleural effusion.", "No acute abnormality.")
        en, ar = build_requests(prompts, images, context, InferenceSettings(), sampling, english)
        assert ar is not None
        en_ids, ar_ids = backend.count_prompt_tokens(en), backend.count_prompt_tokens(ar)
        shared = shared_prefix(en_ids, ar_ids)
        print()
        print(f"{'request':>10} {'prompt tokens':>14} {'shared prefix':>14} {'reusable':>9}")
        print(f"{'english':>10} {len(en_ids):>14} {'-':>14} {'-':>9}")
        print(f"{'arabic':>10} {len(ar_ids):>14} {shared:>14} {shared / len(ar_ids):>9.1%}")
        backend.close()


if __name__ == "__main__":
    main()
