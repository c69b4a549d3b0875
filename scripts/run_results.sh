#!/usr/bin/env bash
# The evaluation runs published in docs/results/, in priority order, on the CPU (2 cores take a few hours).
# Each run is resumable: rerunning this script continues where it stopped. Usage: bash scripts/run_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=docs/results
BASELINES="full kvzip kvzip-head random streaming snapkv h2o"
# Ratio 1.0 evicts nothing: every method equals `full` there (a test checks it), so the sweeps skip it.
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task squad --num-contexts 2 --max-questions 8 \
    --methods $BASELINES --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-squad
$PY -m kvzip_cache.eval --model smollm2-135m --task squad --num-contexts 3 --max-questions 8 \
    --methods $BASELINES kvzip-uniform --ratios 0.5 0.3 0.2 0.1 --out $R/smollm2-squad
$PY -m kvzip_cache.eval --model gemma3-270m --task needle --num-contexts 2 \
    --methods $BASELINES --ratios 0.5 0.3 0.1 --out $R/gemma3-270m-needle
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task needle --num-contexts 2 \
    --methods $BASELINES --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-needle
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task hotpotqa --num-contexts 2 --context-tokens 2500 \
    --max-questions 4 --methods $BASELINES --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-hotpotqa
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task gsm8k --num-contexts 6 \
    --methods full kvzip snapkv h2o --ratios 0.5 0.3 --out $R/qwen2.5-coder-1.5b-gsm8k
$PY -m kvzip_cache.eval --model gemma3-270m --task squad --num-contexts 2 --max-questions 8 \
    --methods $BASELINES --ratios 0.5 0.3 0.1 --out $R/gemma3-270m-squad
