#!/usr/bin/env bash
# Run PaliGemma on one image with the seed's command line; edit the defaults below or override them
# from the environment (MODEL_PATH=... PROMPT=... ./run_inference.sh).
set -euo pipefail
cd "$(dirname "$0")"

MODEL_PATH="${MODEL_PATH:-paligemma/assets/shapes-tiny}"  # the shipped model; or a hub download, e.g. ~/paligemma-3b-pt-224
PROMPT="${PROMPT:-caption en}"                           # or "detect circle", "answer en how many shapes?"
IMAGE_FILE_PATH="${IMAGE_FILE_PATH:-images/shapes.png}"
MAX_TOKENS_TO_GENERATE="${MAX_TOKENS_TO_GENERATE:-100}"
TEMPERATURE="${TEMPERATURE:-0.8}"
TOP_P="${TOP_P:-0.9}"
DO_SAMPLE="${DO_SAMPLE:-False}"
ONLY_CPU="${ONLY_CPU:-False}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

exec "$PYTHON" run_inference.py \
    --model_path "$MODEL_PATH" \
    --prompt "$PROMPT" \
    --image_file_path "$IMAGE_FILE_PATH" \
    --max_tokens_to_generate "$MAX_TOKENS_TO_GENERATE" \
    --temperature "$TEMPERATURE" \
    --top_p "$TOP_P" \
    --do_sample "$DO_SAMPLE" \
    --only_cpu "$ONLY_CPU"
