#!/usr/bin/env bash
# The shipped score predictors (scores/predictor-*.safetensors, scores/predictors.json) and their held-out reports
# (docs/results/predictors/), on the CPU (2 cores), in minutes: SmolLM2-135M 17, Qwen2.5-Coder-1.5B 14 (fewer
# texts), Gemma-3-270m 3 and Qwen2.5-Coder-0.5B 10 (24 texts each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=docs/results/predictors
$PY -m kvzip_cache.train_predictor --model smollm2-135m --compare-features --out scores --update-shipped --report $R/smollm2-135m.json
$PY -m kvzip_cache.train_predictor --model qwen2.5-coder-1.5b --train-texts 12 --eval-texts 4 --out scores --update-shipped \
    --report $R/qwen2.5-coder-1.5b.json
$PY -m kvzip_cache.train_predictor --model gemma3-270m --train-texts 24 --eval-texts 6 --out scores --update-shipped \
    --report $R/gemma3-270m.json
$PY -m kvzip_cache.train_predictor --model qwen2.5-coder-0.5b --train-texts 24 --eval-texts 6 --out scores --update-shipped \
    --report $R/qwen2.5-coder-0.5b.json
