#!/usr/bin/env bash
# The H200 runs of docs/results/h200-smollm2-*: SmolLM2-135M-Instruct in bf16 on CUDA, every method (the predicted
# ones with the shipped predictor), ratios 0.5 0.3 0.2 0.1 (+ full), >= 200 questions per cell:
#   needle at ~4K tokens (67 contexts x 3 needles = 201), needle at ~7K (201), squad (28 contexts x <= 8 = ~220).
# Resumable: rerun the same command after a timeout and it continues. Two halves, each under 10 minutes:
#   bash scripts/run_results_h200.sh needle   # needle 4K + 7K   (estimate ~5-6 min)
#   bash scripts/run_results_h200.sh squad    # squad            (estimate ~3 min)
# Cuts, if time is short (both halves take the same ones, resuming keeps what exists):
#   METHODS="full kvzip kvzip+ kvzip-head predicted predicted-prefill snapkv h2o streaming random" (drop some)
#   RATIOS="0.5 0.3 0.1"   BATCH=24 (contexts per batch: fewer generate calls, more rows per decode step)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PART=${1:-all}
R=${RESULTS:-docs/results}
METHODS=${METHODS:-"full kvzip kvzip-uniform kvzip+ kvzip-head kvzip-head-duo predicted predicted-prefill random streaming snapkv h2o"}
RATIOS=${RATIOS:-"0.5 0.3 0.2 0.1"}
BATCH=${BATCH:-17}            # needle: 67 contexts = 4 batches of <= 17 (51 rows per generate)
SQUAD_BATCH=${SQUAD_BATCH:-7}  # squad: 8 questions per context -> 56 rows per generate
COMMON=(--model smollm2-135m --device "${DEVICE:-cuda}" --dtype bfloat16 --methods $METHODS --ratios $RATIOS)
if [[ $PART == needle || $PART == all ]]; then
    $PY -m kvzip_cache.eval "${COMMON[@]}" --tasks needle --num-contexts 67 --context-tokens 4000 \
        --batch-contexts "$BATCH" --out $R/h200-smollm2-needle-4k
    $PY -m kvzip_cache.eval "${COMMON[@]}" --tasks needle --num-contexts 67 --context-tokens 7000 \
        --batch-contexts "$BATCH" --out $R/h200-smollm2-needle-7k
fi
if [[ $PART == squad || $PART == all ]]; then
    $PY -m kvzip_cache.eval "${COMMON[@]}" --tasks squad --num-contexts 28 --max-questions 8 \
        --batch-contexts "$SQUAD_BATCH" --out $R/h200-smollm2-squad
fi
