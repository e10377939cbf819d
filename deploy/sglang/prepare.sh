#!/usr/bin/env bash
# Convert the released BiMediX2 checkpoint into a folder SGLang and transformers both load.
#   deploy/sglang/prepare.sh /models/BiMediX2-8B-Bi /models/clip-vit-large-patch14-336 /models/BiMediX2-8B-Bi-prepared
# Both inputs are local folders (downloaded beforehand with `huggingface-cli download`); nothing is
# fetched here. The research-only licence of BiMediX2 applies to the output.
set -euo pipefail
SRC=${1:?released BiMediX2 folder (model_type llava_llama)}
CLIP=${2:?local openai/clip-vit-large-patch14-336 folder (safetensors)}
DST=${3:?output folder}
taqrir model prepare "$SRC" "$DST" --vision-tower "$CLIP"
