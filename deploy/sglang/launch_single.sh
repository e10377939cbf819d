#!/usr/bin/env bash
# One GPU (>= 24 GiB for bf16 8B + CLIP): SGLang's OpenAI-compatible server on :30000.
#   deploy/sglang/launch_single.sh /models/BiMediX2-8B-Bi-prepared
set -euo pipefail
MODEL=${1:?prepared checkpoint folder (taqrir model prepare)}
PORT=${PORT:-30000}
export HF_HUB_OFFLINE=1
exec python -m sglang.launch_server \
  --model-path "$MODEL" \
  --served-model-name BiMediX2-8B-Bi \
  --chat-template llava_llama_3 \
  --host 0.0.0.0 --port "$PORT" \
  --dtype bfloat16 \
  --mem-fraction-static "${MEM_FRACTION:-0.85}" \
  --grammar-backend "${GRAMMAR_BACKEND:-xgrammar}"
