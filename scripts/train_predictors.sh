#!/usr/bin/env bash
# The shipped score predictors (scores/predictor-*.safetensors, scores/predictors.json) and their held-out reports
# (docs/results/predictors/). SmolLM2-135M is trained on the GPU on 1M+ tokens (scripts/gpu_predictor_session.sh,
# scripts/predictor_study.py); the other three on the CPU (2 cores), as far as it allows: the varied corpus
# (kvzip_cache.tools.corpus) at contexts of 512 to 2,048 tokens, the MLP with the rank objective.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=docs/results/predictors
COMMON=(--out scores --update-shipped --lengths 512 1024 2048)
$PY -m kvzip_cache.train_predictor --model gemma3-270m --corpus-tokens ${GEMMA_TOKENS:-32768} "${COMMON[@]}" \
    --report $R/gemma3-270m.json
$PY -m kvzip_cache.train_predictor --model qwen2.5-coder-0.5b --corpus-tokens ${QWEN05_TOKENS:-24576} "${COMMON[@]}" \
    --report $R/qwen2.5-coder-0.5b.json
$PY -m kvzip_cache.train_predictor --model qwen2.5-coder-1.5b --corpus-tokens ${QWEN15_TOKENS:-12288} "${COMMON[@]}" \
    --report $R/qwen2.5-coder-1.5b.json
