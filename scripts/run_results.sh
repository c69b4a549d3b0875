#!/usr/bin/env bash
# The evaluation runs published in docs/results/, in priority order, on the CPU (2 cores: several hours in all;
# the sessions that made them ran the SmolLM2/Gemma lines and the Qwen lines side by side, one thread each).
# Each run is resumable: rerunning this script continues where it stopped. Usage: bash scripts/run_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=docs/results
ALL="full kvzip kvzip-head random streaming snapkv h2o"
# The methods of the predictor issue (#13), added to these runs later (resuming keeps the earlier rows); the
# predicted ones use the predictor shipped for --model (scores/predictors.json).
NEW="predicted predicted-prefill kvzip+"
# Ratio 1.0 evicts nothing: every method equals `full` there (a test checks it), so most sweeps skip it.
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task squad --num-contexts 4 --max-questions 8 \
    --methods $ALL $NEW --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-squad
$PY -m kvzip_cache.eval --model smollm2-135m --task squad --num-contexts 3 --max-questions 8 \
    --methods $ALL kvzip-uniform kvzip+ predicted predicted-prefill --ratios 0.5 0.3 0.2 0.1 --out $R/smollm2-squad
$PY -m kvzip_cache.eval --model smollm2-135m --task needle --num-contexts 3 \
    --methods full kvzip kvzip-uniform kvzip-head random streaming snapkv h2o kvzip+ predicted predicted-prefill \
    --out $R/smollm2-needle
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task needle --num-contexts 2 \
    --methods $ALL $NEW --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-needle
$PY -m kvzip_cache.eval --model gemma3-270m --task needle --num-contexts 2 \
    --methods full kvzip streaming snapkv h2o --ratios 0.5 0.3 0.1 --out $R/gemma3-270m-needle
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task gsm8k --num-contexts 3 \
    --methods full kvzip snapkv h2o --ratios 0.3 --out $R/qwen2.5-coder-1.5b-gsm8k
# Eviction while decoding (#18): the same full context, the answer compressed as it grows (512-token answers, so
# that GSM8K's worked solutions are not cut; about 2 h on 2 cores).
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task gsm8k --methods full --ratios 1.0 --num-contexts 48 \
    --batch-contexts 8 --max-new-tokens 512 --decode-ratios 0.3 --decode-window 32 \
    --out $R/qwen2.5-coder-1.5b-gsm8k-decode
$PY -m kvzip_cache.eval --model qwen2.5-coder-1.5b --task hotpotqa --num-contexts 4 --context-tokens 2500 \
    --max-questions 4 --methods $ALL --ratios 0.5 0.3 0.1 --out $R/qwen2.5-coder-1.5b-hotpotqa
$PY -m kvzip_cache.eval --model gemma3-270m --task squad --num-contexts 2 --max-questions 8 \
    --methods full kvzip streaming snapkv h2o --ratios 0.5 0.3 0.1 --out $R/gemma3-270m-squad
