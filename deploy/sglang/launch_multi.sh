#!/usr/bin/env bash
# Several GPUs: one SGLang worker per GPU (data parallel), behind sglang-router, which routes by
# cache awareness so a study's English and Arabic requests land on the worker that holds their
# shared prefix (system prompt + image tokens + English prompt).
#   NUM_GPUS=4 deploy/sglang/launch_multi.sh /models/BiMediX2-8B-Bi-prepared
set -euo pipefail
MODEL=${1:?prepared checkpoint folder (taqrir model prepare)}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
PORT=${PORT:-30000}
export HF_HUB_OFFLINE=1
exec python -m sglang_router.launch_server \
  --model-path "$MODEL" \
  --served-model-name BiMediX2-8B-Bi \
  --chat-template llava_llama_3 \
  --dp-size "$NUM_GPUS" \
  --host 0.0.0.0 --port "$PORT" \
  --dtype bfloat16 \
  --grammar-backend "${GRAMMAR_BACKEND:-xgrammar}"
